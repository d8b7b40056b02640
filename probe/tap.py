"""The attention tap: one processor per attention module, shared by every consumer.

Recording, guidance and editing are *consumers*. Each says, per call, whether it needs the
explicit attention probabilities (:meth:`Consumer.wants`); only then does the tap compute
``softmax(QKᵀ·scale)``, hand the probabilities to the consumers (which may read them, keep
them in the autograd graph, or return a replacement), and multiply by V. Every other call
runs ``F.scaled_dot_product_attention`` exactly as diffusers' ``AttnProcessor2_0`` does.

Layer identity comes from the module's name; the denoising step from the timestep that the
pipeline passes to the denoiser (looked up in ``pipe.scheduler.timesteps``), never from a
call counter, so extra forward passes (guidance) and skipped layers cannot shift it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from probe.models import Layer, attention_layers, denoiser


@dataclass
class Call:
    """What a consumer knows about one attention call."""

    layer: Layer
    step: int  # index into the scheduler's timesteps (-1 when the timestep is not among them)
    timestep: float
    cfg: bool  # the batch is [unconditional…, conditional…]
    batch: int  # batch size of this call (both CFG halves)

    def conditional(self, probs: torch.Tensor) -> torch.Tensor:
        """The conditional half of a (batch, …) tensor (all of it without CFG)."""
        return probs[probs.shape[0] // 2 :] if self.cfg else probs


class Consumer:
    """Base class: override :meth:`wants` and :meth:`on_probs`."""

    def wants(self, call: Call) -> bool:
        return False

    def on_probs(self, call: Call, probs: torch.Tensor) -> torch.Tensor | None:
        """``probs``: (batch, heads, queries, keys). Return a replacement or None."""
        return None

    def on_step(self, step: int, timestep: float) -> None:
        """Called when the denoiser is called at a new step."""


@dataclass
class _State:
    timestep: float | None = None
    step: int = -1
    latent_hw: tuple[int, int] | None = None
    schedule: tuple[float, ...] = ()
    index: dict[float, int] = field(default_factory=dict)
    cfg: bool | None = None  # set by a consumer that runs its own forward passes (e.g. guidance)


class _TapProcessor:
    """The processor installed on one attention module."""

    def __init__(self, tap: Tap, layer: Layer):
        self.tap, self.layer = tap, layer
        self.fused = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        call = self.tap._call(self.layer, hidden_states)
        consumers = [c for c in self.tap.consumers if c.wants(call)] if call is not None else []
        if not consumers:
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return _explicit(attn, hidden_states, encoder_hidden_states, attention_mask, temb, call, consumers)


def _explicit(attn: Attention, hidden_states, encoder_hidden_states, attention_mask, temb, call, consumers):
    """AttnProcessor2_0 with the probabilities made explicit and passed through the consumers."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch, sequence_length, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    probs = attention_probs(query, key, attention_mask)
    for consumer in consumers:
        replaced = consumer.on_probs(call, probs)
        if replaced is not None:
            probs = replaced
    hidden_states = (probs.to(value.dtype) @ value).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)

    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None,
                    scale: float | None = None) -> torch.Tensor:
    """softmax(QKᵀ·scale + mask) over keys (scale 1/√d unless given), as SDPA computes it (float32 softmax for
    half inputs)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query @ key.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    if scores.dtype in (torch.float16, torch.bfloat16):
        return scores.float().softmax(-1).to(query.dtype)
    return scores.softmax(-1)


class Tap:
    """Context manager that installs the tap on a pipeline's denoiser and removes it exactly.

    >>> with Tap(pipe, [recorder]):
    ...     pipe(prompt)
    """

    def __init__(self, pipe, consumers=(), height: int | None = None, width: int | None = None):
        self.pipe = pipe
        self.net = denoiser(pipe)
        self.consumers = list(consumers)
        self.layers = {layer.name: layer for layer in attention_layers(pipe, height, width)}
        self.state = _State()
        self._saved: dict | None = None
        self._hook = None

    def __enter__(self) -> Tap:
        if any(isinstance(p, _TapProcessor) for p in self.net.attn_processors.values()):
            raise RuntimeError("a Tap is already installed on this denoiser; nest consumers in one Tap instead")
        self._saved = dict(self.net.attn_processors)
        processors = {}
        for key, old in self._saved.items():
            name = key.removesuffix(".processor")
            processors[key] = _TapProcessor(self, self.layers[name]) if name in self.layers else old
        self.net.set_attn_processor(processors)
        self._hook = self.net.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.net.set_attn_processor(self._saved)
        self._hook.remove()
        self._saved = self._hook = None
        self.state = _State()

    @contextmanager
    def conditional_only(self):
        """Within this block the denoiser's batch holds conditional samples only (no CFG halves).

        Guidance runs its own forward passes on the conditional latents; consumers then see
        ``call.cfg == False`` and ``call.conditional`` returns the whole batch.
        """
        before, self.state.cfg = self.state.cfg, False
        try:
            yield self
        finally:
            self.state.cfg = before

    # -- step tracking ---------------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        self.state.latent_hw = tuple(sample.shape[-2:])
        if t != self.state.timestep:
            self.state.timestep = t
            self.state.step = self._step_of(t)
            for consumer in self.consumers:
                consumer.on_step(self.state.step, t)

    def _step_of(self, t: float) -> int:
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        if timesteps is None:
            return -1
        schedule = tuple(float(x) for x in timesteps)
        if schedule != self.state.schedule:
            self.state.schedule = schedule
            self.state.index = {x: i for i, x in reversed(list(enumerate(schedule)))}
        return self.state.index.get(t, -1)

    def _call(self, layer: Layer, hidden_states: torch.Tensor) -> Call | None:
        if self.state.latent_hw is None:
            return None
        lh, lw = self.state.latent_hw
        queries = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states[0, 0].numel()
        factor = round((lh * lw / queries) ** 0.5)
        grid = (-(-lh // factor), -(-lw // factor))
        if grid != layer.grid:
            layer = Layer(layer.name, layer.kind, grid, layer.heads)
            self.layers[layer.name] = layer
        cfg = self.state.cfg
        if cfg is None:
            cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        return Call(layer, self.state.step, self.state.timestep, cfg, hidden_states.shape[0])

