"""What a recording keeps and how its images are made, in one object that :func:`probe.record.record`,
:func:`~probe.record.estimate`, :func:`~probe.record.plan`, :func:`probe.sweep` and the ``probe record`` command share,
so each of them states these settings once and they cannot drift apart."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class RecordSettings:
    """``steps``: denoising steps; ``guidance_scale``: classifier-free guidance (each None: the model's own, see
    :func:`probe.models.generation`); ``kinds``: attention kinds recorded
    (``cross``, ``self``; SD3 / FLUX also ``text_image``, ``text_text``); ``layers``: None (all) or names, globs,
    ``re:`` patterns or resolutions; ``heads``: ``"mean"``, ``"all"`` or head indices; ``keep_steps``: step indices
    kept (None: all); ``keep_padding``: keep the padding tokens' columns; ``self_keys``: sum self-attention keys onto
    a side × side grid; ``self_queries``: keep these (y, x) query points only; ``self_store``: ``"maps"`` or ``"qk"``
    (a UNet's self-attention as q and k, maps made on read)."""

    steps: int | None = None
    guidance_scale: float | None = None
    kinds: object = ("cross", "self")
    layers: object = None
    heads: object = "mean"
    keep_steps: object = None
    keep_padding: bool = False
    self_keys: int | None = None
    self_queries: object = None
    self_store: str = "maps"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def split(cls, keywords: Mapping, settings: RecordSettings | None = None) -> tuple[RecordSettings, dict]:
        """``settings`` (default: the defaults) with the fields named in ``keywords`` replaced, and the keywords left
        over (the pipeline's). A field given both ways must agree, so neither silently wins."""
        if settings is not None and not isinstance(settings, cls):
            raise TypeError(f"settings must be a probe.record.RecordSettings, not {type(settings).__name__}")
        base = settings or cls()
        own = {k: v for k, v in keywords.items() if k in cls.names()}
        clash = [k for k, v in own.items() if settings is not None and getattr(settings, k) != v]
        if clash:
            raise ValueError(f"{', '.join(clash)} given both in settings= and as keywords, with different values; "
                             "give each once")
        return replace(base, **own), {k: v for k, v in keywords.items() if k not in own}

    @classmethod
    def only(cls, keywords: Mapping, settings: RecordSettings | None, caller: str) -> RecordSettings:
        """:meth:`split` for a caller that takes nothing but settings (:func:`~probe.record.plan`, sweeps): any other
        keyword is an error. Steps or guidance left None stay None: each caller takes the model's own once it has
        the pipeline (:func:`probe.models.generation`), as :func:`probe.record.record` does."""
        chosen, unknown = cls.split(keywords, settings)
        if unknown:
            raise TypeError(f"{caller} got unknown keywords {sorted(unknown)}; its recording settings are "
                            f"{cls.names()}")
        return chosen
