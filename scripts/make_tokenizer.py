"""Generate the project's CLIP tokenizer files (vocab.json, merges.txt) once.

The BPE is trained with `tokenizers` on the shapes world's words and the public prompt lists,
so those words are single tokens and any other word falls back to smaller pieces. Training
breaks ties by hash order, so the files are generated once and shipped under
``probe/assets/tokenizer``; never rebuild them at import time.

    python scripts/make_tokenizer.py [path/to/ssd_prompts.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parents[1] / "probe" / "assets" / "tokenizer"
EXTRA = (
    "a an the and of with on in photo picture painting drawing cat dog bird car tree house red green "
    "blue yellow orange purple white black brown pink grey circle square triangle ellipse star big small "
    "left right above below next to a cat and a dog"
)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def main() -> None:
    corpus = [EXTRA]
    if len(sys.argv) > 1:
        lists = json.loads(Path(sys.argv[1]).read_text())
        corpus += [p for prompts in lists.values() for p in prompts]
    words = sorted({w for line in corpus for w in line.lower().split()})
    alphabet = list(bytes_to_unicode().values())
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(words)] * 2, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    # CLIP's layout: bytes, bytes + </w>, merges in rank order, then the two special tokens.
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    for m in merges:
        vocab_list.append(m.replace(" ", ""))
    vocab_list = list(dict.fromkeys(vocab_list)) + ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    print(f"{len(vocab_list)} tokens, {len(merges)} merges, {len(words)} words -> {OUT}")


if __name__ == "__main__":
    main()
