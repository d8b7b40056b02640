"""Out-of-core analysis: lazy results equal eager ones, and a store far larger than the memory limit is analysed in
memory that does not grow with the store."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import probe
from probe.analysis import lazy
from probe.analysis.maps import aggregate_self_attention, normalize, token_map
from probe.analysis.overlap import com_distance, compactness, kl_divergence, self_cross_overlap, soft_iou

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle and a blue square", "a cat and a dog"]
HEADROOM_MB = 160  # address space the analysis may take beyond the baseline of its imports and warm-up
STEPS = 10  # synthetic maps per sample: 10 steps × (cross + self at 16² and 8²), 3.6 MB on disk


@pytest.fixture(scope="module")
def recording(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("rec") / "rec.zarr"
    probe.record(tiny, PROMPTS, seeds=[0, 1], steps=3, out=path, progress=False)
    return path


def test_lazy_overlap_equals_the_eager_computation(recording):
    stats = lazy.overlap(recording)
    assert stats["soft_iou"].chunks is not None  # lazy until computed
    stats = stats.compute()
    tree = probe.open_recording(recording)
    cross = torch.from_numpy(tree["cross/res16"]["attn"].values.astype(np.float32)).mean(2)  # (s, step, y, x, T)
    keys = torch.from_numpy(tree["self/res16"]["attn"].values.astype(np.float32)).mean(2)
    words = [["circle", "square"], ["cat", "dog"]]
    lazy_maps = lazy.subject_maps(tree["cross/res16"])
    assert lazy_maps.chunks is not None and lazy_maps.dims == ("sample", "step", "subject", "y", "x")
    for s, prompt in enumerate(np.repeat(PROMPTS, 2)):
        pieces = [[[str(t) for t in tree["cross/res16"]["token_text"].values[s]].index(w)] for w in words[s // 2]]
        assert prompt.split()[-1] == words[s // 2][1]
        maps = torch.stack([token_map(cross[s], ix) for ix in pieces], -3)  # (step, 2, y, x)
        a, b = maps[:, 0], maps[:, 1]
        np.testing.assert_allclose(lazy_maps.isel(sample=s).values, maps.numpy(), rtol=1e-6)
        aggregated = aggregate_self_attention(maps, keys[s].reshape(3, 1, 16, 16, 256))
        fa, fb = normalize(a, "minmax"), normalize(b, "minmax")  # centres and KL without the floor
        expected = {"soft_iou": soft_iou(a, b), "com_distance": com_distance(fa, fb),
                    "kl_sym": kl_divergence(fa, fb, "sym"), "compactness": compactness(a, b),
                    "self_cross": self_cross_overlap(maps, aggregated)}
        for name, value in expected.items():
            np.testing.assert_allclose(stats[name].isel(sample=s, pair=0).values, value.numpy(), rtol=1e-5,
                                       err_msg=name)
        assert list(stats["subject_word"].values[s]) == words[s // 2]
    table = lazy.overlap_table(recording, step=-1, workers=2)
    assert len(table) == 4 and set(table["subject_b"]) == {"square", "dog"}
    np.testing.assert_allclose(table["soft_iou"], stats["soft_iou"].isel(step=-1, pair=0).values, rtol=1e-6)


def test_subjects_can_be_given_and_missing_words_are_errors(recording):
    stats = lazy.overlap(recording, subjects={PROMPTS[0]: ["red", "blue", "square"], PROMPTS[1]: ["cat", "dog"]},
                         self_group=None).compute()
    assert stats.sizes["pair"] == 3 and "self_cross" not in stats
    assert np.isnan(stats["soft_iou"].isel(sample=2, pair=1)).all()  # the second prompt has two subjects
    with pytest.raises(ValueError, match="'horse' .* is not in 'a red circle and a blue square'"):
        lazy.overlap(recording, subjects=lambda p: ["horse"])


ANALYSE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    import xarray as xr
    from probe.analysis import lazy

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    warm, path, headroom = sys.argv[1], sys.argv[2], int(sys.argv[3])
    lazy.overlap_table(warm, workers=2)  # imports, kernels, thread pools, zarr's event loop: the baseline
    base = status("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (base + headroom, base + headroom))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM from here on: the peak resident memory of the analysis alone
    rss_before = status("VmRSS")
    table = lazy.overlap_table(path, workers=2)
    report = {"base_vm": base, "limit": base + headroom, "rss_before": rss_before, "peak_rss": status("VmHWM"),
              "peak_vm": status("VmPeak"), "rows": len(table), "finite": bool(np.isfinite(table["soft_iou"]).all())}
    try:
        xr.open_zarr(path, group="self/res16", consolidated=False)["attn"].load()
        report["eager"] = "loaded"
    except MemoryError:
        report["eager"] = "MemoryError"
    print(json.dumps(report))
""")


def _analyse(warm: Path, path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", ANALYSE, str(warm), str(path), str(HEADROOM_MB * 2**20)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_store_four_times_the_memory_limit_is_analysed_in_flat_memory(tmp_path, tiny):
    """RLIMIT_AS = the analysing process's own address space after its imports and a warm-up (torch, dask and zarr
    map ~3 GB that does not depend on the data, so a limit below it would only measure imports) + 160 MB. The
    large store is ≥ 4× those 160 MB, the eager load of its self-attention fails under the same limit, and the
    analysis' own peak resident memory (VmHWM reset after the warm-up) is the same as for a store 4× smaller."""
    template = probe.record(tiny, PROMPTS, seeds=[0], steps=STEPS, progress=False)
    warm, small, large = tmp_path / "warm.zarr", tmp_path / "small.zarr", tmp_path / "large.zarr"
    lazy.synthetic_store(warm, 2, template)
    sizes = {"small": lazy.synthetic_store(small, 48, template), "large": lazy.synthetic_store(large, 192, template)}
    assert sizes["large"] >= 4 * HEADROOM_MB * 2**20
    runs = {"small": _analyse(warm, small), "large": _analyse(warm, large)}
    mb = {name: {k: round(v / 2**20, 1) for k, v in r.items() if type(v) is int and k != "rows"}
          for name, r in runs.items()}
    print(json.dumps({"store_mb": {k: round(v / 2**20) for k, v in sizes.items()}, "runs": mb}))
    for name, n in (("small", 48), ("large", 192)):
        assert runs[name]["rows"] == n * STEPS and runs[name]["finite"]
    assert runs["large"]["eager"] == "MemoryError"  # the limit binds: the data does not fit under it
    used = {name: r["peak_rss"] - r["rss_before"] for name, r in runs.items()}  # the analysis' own peak
    # 4× the data, the same peak but for per-chunk bookkeeping (task graph, the table's rows): 4–6% of the data's
    # size here, more on a loaded machine; holding the data would add all of it
    assert used["large"] - used["small"] < 0.10 * (sizes["large"] - sizes["small"]), mb
    assert used["large"] < HEADROOM_MB * 2**20
