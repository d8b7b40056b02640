"""The attention tap: one wrapper per attention module, shared by every consumer.

Recording, guidance and editing are *consumers*. Each says, per call, whether it needs the explicit attention
probabilities (:meth:`Consumer.wants`). Where none does, the processor that was there runs untouched (fused SDPA,
IP-Adapter, a user's own). Where one does, the original processor still runs, and the tap intercepts the one
softmax inside it: its ``F.scaled_dot_product_attention`` call (diffusers' processors, and ``dispatch_attention_fn``'s
native backend) or ``Attention.get_attention_scores`` (the classic processors). So the probabilities are computed
from q and k exactly as the model scores them, after its norms and rotary embeddings, with its own scale and mask;
the consumers read them, keep them in the autograd graph or return a replacement, and the processor carries on with
``probs @ v``. A processor that computes attention by other means is refused by name, never replaced.

Each call is *placed*: the step index is counted from the scheduler's own ``set_timesteps`` and ``step`` calls (a
Heun or KDPM2 correction evaluation is the pass ``correction`` of its step), never matched against timesteps; the
pass is told by the code that runs it (:meth:`Tap.pass_`: guidance, inversion, user) or, inside the pipeline's own
loop, read from the pipeline (``cfg`` when the batch is [unconditional; conditional], or the ``cache_context`` name
``cond`` / ``uncond`` of pipelines that run the halves apart).
"""

from __future__ import annotations

import functools
import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from probe.families import Family, family_of
from probe.families.layout import Layer, Split, TapError, attention_modules, denoiser
from probe.tap.layers import attention_layers

PASSES = ("cfg", "cond", "uncond", "guidance", "inversion", "correction", "user")
"""cfg: the pipeline's pass on [unconditional; conditional]; cond / uncond: one half alone; guidance: a guidance
objective's own evaluation; inversion: an inversion's pass; correction: a second-order scheduler's extra evaluation;
user: a pass the caller runs and names itself."""

CACHE_HOOKS = ("fbc_", "first_block_cache", "pyramid_attention_broadcast", "faster_cache", "mag_cache", "taylorseer",
               "teacache")  # name prefixes of diffusers' caching hooks


@dataclass(frozen=True)
class Call:
    """What a consumer knows about one attention call."""

    layer: Layer
    step: int  # index of the denoising step (-1 outside any pipeline run)
    timestep: float  # the schedule's timestep of that step (nan when unknown)
    pass_: str  # one of PASSES
    batch: int  # batch size of this call (both CFG halves in a "cfg" pass)
    conditional_first: bool = False  # a "cfg" batch is [conditional; unconditional] (the family says so)
    only_conditional: bool = False  # the tensors handed with this call hold the conditional rows alone
    only_columns: bool = False  # their keys are the consumer's own columns (Consumer.columns), in its order

    @property
    def cfg(self) -> bool:
        return self.pass_ == "cfg"

    def conditional_rows(self, n: int) -> slice:
        """The conditional rows of a batch of ``n``: one half of a ``cfg`` pass (the second unless the family puts
        the conditional half first), all of a conditional one, all of a tensor that holds them alone."""
        if self.only_conditional:
            return slice(0, n)
        if self.pass_ == "cfg":
            return slice(0, n // 2) if self.conditional_first else slice(n // 2, n)
        if self.pass_ == "uncond":
            raise TapError(f"{self.layer.name}: an unconditional pass has no conditional rows")
        return slice(0, n)

    def conditional(self, probs: torch.Tensor) -> torch.Tensor:
        """The conditional rows of a (batch, …) tensor (:meth:`conditional_rows`)."""
        return probs[self.conditional_rows(probs.shape[0])]


class Consumer:
    """Base class: override :meth:`wants` and :meth:`on_probs`. A consumer that returns replacements sets
    ``replaces = True``; read-only consumers let the tap keep the fused attention kernel."""

    replaces = False
    mean_heads = False  # True: it reads only the mean over heads; the tap may hand it (batch, 1, queries, keys)
    conditional_only = False  # True: it reads only Call.conditional rows; the tap may hand those alone
    batched = False  # True: a small read-only block may reach it at the end of the denoiser call (see BATCHED_BLOCK)
    layer_keys: frozenset | None = None  # the layer keys it may ever want (None: any): other calls pass it by unasked

    def columns(self, call: Call) -> torch.Tensor | None:
        """The key columns of the call's block that this read-only consumer reads: a (rows, columns) index tensor,
        one row per batch row it reads (the conditional ones where ``conditional_only``), or None for every key.
        Where all of a call's consumers give the same one, the tap may score only those keys and hand
        (rows, heads, queries, columns) with ``Call.only_columns`` set: a softmax row's cost then follows the
        columns kept, not the keys it normalises over."""
        return None

    def wants(self, call: Call) -> bool:
        return False

    def on_probs(self, call: Call, probs: torch.Tensor) -> torch.Tensor | None:
        """``probs``: (batch, heads, image queries, keys) of the call's layer kind. Return a replacement or None."""
        return None

    def reads_qk(self, call: Call) -> bool:
        """True where this consumer wants the scores' inputs (:meth:`on_qk`) instead of the probabilities."""
        return False

    def on_qk(self, call: Call, query: torch.Tensor, key: torch.Tensor, scale: float, mask: torch.Tensor | None,
              split: Split) -> None:
        """Every query and every key of the call's softmax, (batch, heads, tokens, dim), as the model scores them,
        with its scale, its mask as handed to the softmax (None, a boolean keep-mask or an additive bias) and where
        the image and text tokens sit (``split``)."""

    def on_step(self, step: int, timestep: float) -> None:
        """Called when the pipeline's loop reaches a new step."""


@dataclass
class _State:
    net: object = None
    latent_hw: tuple[int, int] | None = None
    text_tokens: int | None = None
    image_grid: tuple[int, int] | None = None
    schedule: list[float] = field(default_factory=list)  # the run's timesteps, read once at set_timesteps
    iteration: int = 0  # scheduler.step calls of this run
    steps_done: int = 0  # first-order scheduler.step calls of this run
    cache_name: str | None = None
    told: list[tuple[str, int]] = field(default_factory=list)  # (pass, step) set by the code running the pass
    announced: int | None = None  # the last step whose start consumers were told of
    placed: tuple[str, int, float] | None = None  # (pass, step, timestep) of the denoiser call running now


def attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None,
                    scale: float | None = None) -> torch.Tensor:
    """softmax(QKᵀ·scale + mask) over keys (scale 1/√d unless given; a boolean mask keeps where True), as SDPA
    computes it (float32 softmax for half inputs)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query @ key.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if scores.dtype in (torch.float16, torch.bfloat16):
        return scores.float().softmax(-1).to(query.dtype)
    return scores.softmax(-1)


class _Intercept:
    """Stands in for the one softmax of a wanted call; later attention calls of the processor (IP-Adapter's image
    branch) go to the real functions."""

    def __init__(self, attn, calls: list[tuple[Call, list[Consumer]]], split, pending: list | None = None):
        self.attn, self.split, self.pending = attn, split, pending  # pending: where small blocks wait (or None)
        self.calls = [(call, probs) for call, cs in calls if (probs := [c for c in cs if not c.reads_qk(call)])]
        self.qk_calls = [(call, qk) for call, cs in calls if (qk := [c for c in cs if c.reads_qk(call)])]
        self.fired = False

    def hand_qk(self, query: torch.Tensor, key: torch.Tensor, scale: float, mask) -> None:
        """Every query and key, (batch, heads, tokens, dim), the mask and the split, to consumers that read q and k."""
        for call, consumers in self.qk_calls:
            for consumer in consumers:
                consumer.on_qk(call, query, key, scale, mask, self.split)

    def sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if self.fired:
            return _REAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)
        if is_causal or dropout_p or enable_gqa:
            raise TapError(f"{(self.calls or self.qk_calls)[0][0].layer.name}: causal, dropout or grouped-query "
                           "attention is not something the tap computes explicitly")
        self.hand_qk(query, key, query.shape[-1] ** -0.5 if scale is None else scale, attn_mask)
        if not self.calls:  # q and k were all that was wanted: the kernel runs as it would have
            self.fired = True
            return _REAL_SDPA(query, key, value, attn_mask=attn_mask, scale=scale)
        read_only = not any(c.replaces for _, consumers in self.calls for c in consumers)
        if read_only and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)):
            fused = _fused_with_lse(query, key, value, attn_mask, scale)
            if fused is not None:  # the kernel's own output; only the wanted blocks are scored again
                out, lse = fused
                self.fired = True
                self.read(query, key, attn_mask, scale, lse)
                return out
        probs = self.consume(attention_probs(query, key, attn_mask, scale))
        return probs.to(value.dtype) @ value

    def read(self, query, key, mask, scale, lse) -> None:
        """Hand read-only consumers the blocks they want: exp(q·kᵀ·scale + mask − logsumexp) for those keys. A small
        block whose consumers all take it late waits in ``pending`` to be scored with other layers' of its shape."""
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
        for call, consumers in self.calls:
            rows, keys = self.split.block(call.layer.kind)
            if rows is None or keys is None:
                continue
            only_conditional = all(c.conditional_only for c in consumers)  # a CFG pass: half the rows to score
            batch = call.conditional_rows(query.shape[0]) if only_conditional else slice(None)
            # (batch, heads, tokens, dim): the fused kernel took nothing else
            q, k = query[batch, :, rows].float(), key[batch, :, keys].float()
            m = None if mask is None else mask.float().expand(*query.shape[:2], -1, -1)[batch, :, rows, keys]
            columns = _agreed_columns(call, consumers, k.shape[0], only_conditional)
            if only_conditional or columns is not None:
                call = Call(call.layer, call.step, call.timestep, call.pass_, call.batch, call.conditional_first,
                            only_conditional, columns is not None)
            block = _Block(call, consumers, q, k, m, lse[batch, :, rows, None].float(), scale, columns,
                           all(c.mean_heads for c in consumers), query.dtype)
            if (self.pending is not None and m is None and all(c.batched for c in consumers)
                    and q.shape[-2] * k.shape[-2] < BATCHED_BLOCK):
                self.pending.append(block)
            else:
                block.hand(_score([block]))

    def scores(self, query, key, attention_mask=None):
        """``Attention.get_attention_scores``: (batch·heads, queries, keys) probabilities."""
        if self.fired:
            return type(self.attn).get_attention_scores(self.attn, query, key, attention_mask)
        heads = self.attn.heads
        if self.qk_calls:
            mask = attention_mask  # (batch·heads or 1, queries or 1, keys) → (batch or 1, heads or 1, …)
            if mask is not None:
                mask = mask.unflatten(0, (-1, heads)) if mask.shape[0] % heads == 0 else mask[:, None]
            self.hand_qk(query.view(-1, heads, *query.shape[1:]), key.view(-1, heads, *key.shape[1:]),
                         self.attn.scale, mask)
        probs = type(self.attn).get_attention_scores(self.attn, query, key, attention_mask)
        if not self.calls:
            self.fired = True
            return probs
        shaped = probs.view(-1, heads, *probs.shape[1:])
        return self.consume(shaped).reshape(probs.shape)

    def consume(self, probs: torch.Tensor) -> torch.Tensor:
        self.fired = True
        for call, consumers in self.calls:
            view = self.split.view(probs, call.layer.kind)
            if view is None:
                continue
            changed = False
            for consumer in consumers:
                replaced = consumer.on_probs(call, view)
                if replaced is not None:
                    view, changed = replaced, True
            if changed:
                probs = self.split.write(probs, call.layer.kind, view)
        return probs


_REAL_SDPA = torch.nn.functional.scaled_dot_product_attention


LOG2E = 1.4426950408889634


CACHED_BLOCK = 1 << 16  # queries × keys of one head from which scoring a head at a time is faster (it stays in cache)
# queries × keys of one head below which a block waits for the end of the denoiser call and is scored together with
# the other layers' blocks of its shape: there the cost is per call (kernel launches, Python), not per score
BATCHED_BLOCK = 1 << 18


@dataclass
class _Block:
    """One call's block as the fused kernel left it, ready to score: q and k (all of the block's keys; ``columns``
    chooses among them), the additive mask, the log-sum-exp ``floor``; then handed to ``consumers`` as ``call``."""

    call: Call
    consumers: list[Consumer]
    q: torch.Tensor
    k: torch.Tensor
    mask: torch.Tensor | None
    floor: torch.Tensor
    scale: float
    columns: torch.Tensor | None
    mean: bool  # every consumer reads the mean over heads
    dtype: torch.dtype

    def shape(self) -> tuple:
        """What blocks scored together share."""
        return (self.q.shape, self.k.shape, self.q.device, self.scale, self.mean, self.dtype,
                None if self.columns is None else id(self.columns), tuple(map(id, self.consumers)))

    def hand(self, probs: torch.Tensor) -> None:
        for consumer in self.consumers:
            if consumer.on_probs(self.call, probs) is not None:
                raise TapError(f"{type(consumer).__name__} returned replaced probabilities without declaring "
                               "replaces = True")


def _score(blocks: list[_Block]) -> torch.Tensor:
    """The blocks of one shape scored in one go: (blocks × batch, heads or 1, queries, keys or columns)."""
    first = blocks[0]

    def joined(part: str) -> torch.Tensor:
        return getattr(first, part) if len(blocks) == 1 else torch.cat([getattr(b, part) for b in blocks])

    q, k, floor = joined("q"), joined("k"), joined("floor")
    m = None if first.mask is None else joined("mask")
    if first.columns is not None:  # only the keys that are read: a text block of 77 keys may be read at 8
        columns = first.columns if len(blocks) == 1 else first.columns.repeat(len(blocks), 1)
        k = k.gather(-2, columns[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1]))
        m = None if m is None else m.gather(-1, columns[:, None, None, :].expand(*m.shape[:-1], -1))
    if first.mean:
        return _head_mean(q, k, m, floor, first.scale).to(first.dtype)
    return _exp_scores(q, k, m, floor, first.scale).to(first.dtype)


def _score_pending(pending: list[_Block]) -> None:
    """Score the waiting blocks, those of one shape together, and hand each its rows."""
    groups: dict[tuple, list[_Block]] = {}
    for block in pending:
        groups.setdefault(block.shape(), []).append(block)
    for blocks in groups.values():
        scored, n = _score(blocks), blocks[0].q.shape[0]
        for i, block in enumerate(blocks):
            block.hand(scored[i * n : (i + 1) * n])


def _head_mean(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, floor: torch.Tensor,
               scale: float) -> torch.Tensor:
    """Mean over heads of :func:`_exp_scores`, (batch, 1, queries, keys), the 1/heads inside the exponent (the
    log-sum-exp raised by ln heads) and the heads summed by adds: a large block one head at a time, so that it stays
    in cache; a small one all heads at once, in fewer kernels."""
    heads = q.shape[1]
    floor = floor + math.log(heads) if heads > 1 else floor
    if q.shape[-2] * k.shape[-2] < CACHED_BLOCK:
        return _head_sum(_exp_scores(q, k, mask, floor, scale))[:, None]
    total = None
    for h in range(heads):
        head = _exp_scores(q[:, h], k[:, h], None if mask is None else mask[:, h], floor[:, h], scale)
        total = head if total is None else total.add_(head)
    return total[:, None]


def _head_sum(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, …) summed over heads: a few heads by element-wise adds (a strided reduction over a short
    axis is several times slower on a CPU), many by ``sum``."""
    heads = x.shape[1]
    if heads > 4:
        return x.sum(1)
    total = x[:, 0] + x[:, 1] if heads > 1 else x[:, 0]
    for h in range(2, heads):
        total.add_(x[:, h])
    return total


def _agreed_columns(call: Call, consumers: list[Consumer], rows: int, only_conditional: bool) -> torch.Tensor | None:
    """The key columns (:meth:`Consumer.columns`) that every consumer of a call reads, one row per scored batch row;
    None where one reads every key or they differ."""
    if only_conditional:
        call = Call(call.layer, call.step, call.timestep, call.pass_, call.batch, call.conditional_first, True)
    first = consumers[0].columns(call)
    if first is None or first.ndim != 2 or first.shape[0] != rows:
        return None
    for consumer in consumers[1:]:
        other = consumer.columns(call)
        if other is not first and (other is None or other.shape != first.shape or not torch.equal(other, first)):
            return None
    return first


def _exp_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, floor: torch.Tensor,
                scale: float) -> torch.Tensor:
    """exp(q·kᵀ·scale + mask − logsumexp) as 2^(…·log₂e), all of it but exp2 inside one matmul (baddbmm: the
    log-sum-exp and mask as its added term, scale·log₂e as its alpha) and exp2 in place (about 2.5× faster than exp
    on a CPU): the block is as large as the attention itself, so every extra pass over it costs as much as a kernel."""
    lead, n_q, n_k = q.shape[:-2], q.shape[-2], k.shape[-2]
    bias, beta = (floor, -LOG2E) if mask is None else (mask - floor, LOG2E)  # (…, queries, 1 | keys)
    if bias.shape[:-2] != lead:
        bias = bias.expand(*lead, *bias.shape[-2:])
    bias = bias.reshape(-1, *bias.shape[-2:])
    scores = torch.baddbmm(bias, q.reshape(-1, n_q, q.shape[-1]), k.reshape(-1, n_k, k.shape[-1]).transpose(-1, -2),
                           beta=beta, alpha=scale * LOG2E)
    return torch.exp2_(scores).view(*lead, n_q, n_k)


def _fused_with_lse(query, key, value, mask, scale):
    """(output, logsumexp) from torch's fused CPU kernel (the one F.scaled_dot_product_attention runs there), else
    None: other devices take the explicit path."""
    if query.device.type != "cpu":
        return None
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, attn_mask=mask,
                                                                         scale=scale)[:2]
    except (RuntimeError, NotImplementedError):
        return None


def _wrapper_class(original) -> type:
    """A wrapper whose ``__call__`` has the original processor's signature: ``FluxAttention`` drops keyword
    arguments that its processor's ``__call__`` does not declare, so a generic ``**kwargs`` would lose them."""
    cls = type(original)
    made = _WRAPPERS.get(cls)
    if made is None:
        signature = inspect.signature(original.__call__)

        def __call__(self, attn, *args, **kwargs):
            return self.tap._run(self, attn, args, kwargs)

        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *signature.parameters.values()]
        __call__.__signature__ = inspect.Signature(params)
        made = type(f"Tapped{cls.__name__}", (_Wrapped,), {"__call__": __call__})
        _WRAPPERS[cls] = made
    return made


class _Wrapped:
    def __init__(self, tap: Tap, name: str, original):
        self.tap, self.name, self.original = tap, name, original

    def __getattr__(self, item):  # processor attributes (IP-Adapter scales …) stay reachable
        return getattr(self.__dict__["original"], item)


_WRAPPERS: dict[type, type] = {}
_MISSING = object()


class Tap:
    """Context manager that wraps every attention processor of a pipeline's denoiser and restores them exactly.

    >>> with Tap(pipe, [recorder]):
    ...     pipe(prompt)
    """

    def __init__(self, pipe, consumers=(), height: int | None = None, width: int | None = None):
        self.pipe = pipe
        self.net = denoiser(pipe)
        self.family: Family = family_of(self.net)
        self.consumers = list(consumers)
        self.layers = {layer.key: layer for layer in attention_layers(pipe, height, width)}
        self.by_module: dict[str, list[Layer]] = {}
        for layer in self.layers.values():
            self.by_module.setdefault(layer.name, []).append(layer)
        self.state = _State(net=self.net)
        self._pending: list[_Block] = []  # small blocks of the denoiser call now running, scored at its end
        self._saved: dict | None = None
        self._undo: list = []

    # -- install / remove ----------------------------------------------------------------------------------------
    def __enter__(self) -> Tap:
        modules = attention_modules(self.net)
        if any(isinstance(m.processor, _Wrapped) for m in modules.values()):
            raise RuntimeError("a Tap is already installed on this denoiser; nest consumers in one Tap instead")
        self._refuse_caching_hooks()
        self._saved = {name: m.processor for name, m in modules.items()}
        for name, module in modules.items():
            module.processor = _wrapper_class(module.processor)(self, name, module.processor)
        hook = self.net.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        after = self.net.register_forward_hook(self._after_forward, always_call=True)
        self._undo = [hook.remove, after.remove,
                      self._patch(self.pipe.scheduler, "set_timesteps", self._on_set_timesteps),
                      self._patch(self.pipe.scheduler, "step", self._on_scheduler_step)]
        if hasattr(self.net, "cache_context"):
            self._undo.append(self._patch(self.net, "cache_context", self._on_cache_context))
        self._start_run()
        return self

    def __exit__(self, *exc) -> None:
        for name, processor in (self._saved or {}).items():
            self.net.get_submodule(name).processor = processor
        for undo in reversed(self._undo):
            undo()
        self._saved, self._undo, self._pending = None, [], []
        self.state = _State(net=self.net)

    @staticmethod
    def _patch(obj, name: str, around) -> callable:
        """Replace ``obj.name`` by ``around(original, …)`` on the instance; returns the undo."""
        had = name in vars(obj)
        original = getattr(obj, name)

        @functools.wraps(original)  # keeps the signature: pipelines inspect set_timesteps' parameters
        def patched(*args, **kwargs):
            return around(original, *args, **kwargs)

        setattr(obj, name, patched)
        return (lambda: setattr(obj, name, original)) if had else (lambda: delattr(obj, name))

    def _refuse_caching_hooks(self) -> None:
        registry = getattr(self.net, "_diffusers_hook", None)
        hooks = set(getattr(registry, "hooks", {}) or {})
        for module in self.net.modules():
            sub = getattr(module, "_diffusers_hook", None)
            hooks |= set(getattr(sub, "hooks", {}) or {})
        found = sorted(h for h in hooks if any(h.startswith(c) for c in CACHE_HOOKS))
        if getattr(self.net, "is_cache_enabled", False):
            found.append(type(getattr(self.net, "_cache_config", None)).__name__)
        if found:
            raise TapError(f"the denoiser has caching hooks {found}: they skip or reuse attention, so a recording or "
                           "guidance would miss steps and layers. Remove them first (pipe.transformer."
                           "disable_cache() or registry.remove_hook).")

    # -- placing calls: step and pass ----------------------------------------------------------------------------
    def _start_run(self) -> None:
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        self.state.schedule = [] if timesteps is None else timesteps.detach().cpu().double().tolist()
        self.state.iteration = self.state.steps_done = 0

    def _on_set_timesteps(self, original, *args, **kwargs):
        out = original(*args, **kwargs)
        self._start_run()
        return out

    def _on_scheduler_step(self, original, *args, **kwargs):
        first = self._first_order()
        out = original(*args, **kwargs)
        self.state.iteration += 1
        self.state.steps_done += first
        return out

    def _first_order(self) -> bool:
        return bool(getattr(self.pipe.scheduler, "state_in_first_order", True))

    @contextmanager
    def _on_cache_context(self, original, name, *args, **kwargs):
        before, self.state.cache_name = self.state.cache_name, name
        try:
            with original(name, *args, **kwargs):
                yield
        finally:
            self.state.cache_name = before

    @contextmanager
    def pass_(self, kind: str, step: int):
        """Within this block every denoiser call is pass ``kind`` at step ``step`` (guidance, inversion, user)."""
        if kind not in PASSES:
            raise ValueError(f"pass must be one of {PASSES}, not {kind!r}")
        self.state.told.append((kind, int(step)))
        try:
            yield self
        finally:
            self.state.told.pop()

    def _place(self) -> tuple[str, int, float]:
        """(pass, step, timestep) of the denoiser call now running."""
        s = self.state
        if s.told:
            kind, step = s.told[-1]
        else:
            first = self._first_order()
            step = s.steps_done if first else s.steps_done - 1
            if not first:
                kind = "correction"
            elif s.cache_name in ("cond", "uncond"):
                kind = s.cache_name
            else:
                kind = "cfg" if self.family.cfg_call(self.pipe, s) else "cond"
        return kind, step, self.timestep_of(step)

    def timestep_of(self, step: int) -> float:
        """The schedule's timestep of a step (first-order iterations only, so Heun's doubled timesteps count once)."""
        schedule = self.state.schedule
        if hasattr(self.pipe.scheduler, "state_in_first_order"):
            schedule = schedule[::2]  # second-order schedulers (Heun, KDPM2): [t0, t1, t1, t2, t2, …]
        return schedule[step] if 0 <= step < len(schedule) else float("nan")

    def _before_forward(self, module, args, kwargs):
        self.family.observe(self.net, args, kwargs, self.state)
        kind, step, t = self.state.placed = self._place()  # its attention calls are placed once, here
        if kind in ("cfg", "cond") and self.state.announced != step:
            self.state.announced = step
            for consumer in self.consumers:
                consumer.on_step(step, t)

    def _after_forward(self, module, args, output):
        self.state.placed = None
        pending, self._pending = self._pending, []
        if pending and output is not None:  # none are handed from a call that raised
            _score_pending(pending)

    # -- one attention call ----------------------------------------------------------------------------------------
    def _run(self, wrapped: _Wrapped, attn, args: tuple, kwargs: dict):
        original = wrapped.original
        if not self.consumers:
            return original(attn, *args, **kwargs)
        hidden = args[0] if args else kwargs.get("hidden_states")
        kind, step, t = self.state.placed or self._place()
        calls = []
        for layer in self.by_module.get(wrapped.name, ()):
            asked = [c for c in self.consumers if c.layer_keys is None or layer.key in c.layer_keys]
            if not asked:
                continue
            grid = self.family.runtime_grid(layer, hidden, self.state)
            if grid != layer.grid:
                layer = Layer(layer.name, layer.kind, grid, layer.heads)
            call = Call(layer, step, t, kind, hidden.shape[0], self.family.conditional_first)
            wanting = [c for c in asked if c.wants(call)]
            if wanting:
                calls.append((call, wanting))
        if not calls:
            return original(attn, *args, **kwargs)
        encoder = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        intercept = _Intercept(attn, calls, self.family.split(attn, hidden, encoder, self.state),
                               self._pending if self.state.placed is not None else None)
        previous = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = intercept.sdpa
        # the instance's own dict, not nn.Module's __setattr__ / __delattr__ (their checks cost more than the call)
        own = vars(attn)
        saved = own.get("get_attention_scores", _MISSING)
        patch_scores = saved is not _MISSING or hasattr(type(attn), "get_attention_scores")
        if patch_scores:
            own["get_attention_scores"] = intercept.scores
        try:
            out = original(attn, *args, **kwargs)
        finally:
            torch.nn.functional.scaled_dot_product_attention = previous
            if patch_scores:
                if saved is _MISSING:
                    del own["get_attention_scores"]
                else:
                    own["get_attention_scores"] = saved
        if not intercept.fired:
            raise TapError(
                f"{wrapped.name}: its processor {type(original).__name__} computes attention without "
                "F.scaled_dot_product_attention or Attention.get_attention_scores (a fused kernel, xformers or a "
                "non-native attention backend), so the tap cannot see its probabilities. Use diffusers' default "
                "processor (pipe.unet.set_default_attn_processor()) or the native attention backend for this run.")
        return out
