"""Generate and record: every (prompt, seed) sample's attention maps into an ``xarray.DataTree``, in memory or
streamed to a store (:func:`record`)."""

from __future__ import annotations

import errno
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import xarray as xr
from tqdm.auto import tqdm

from probe import checks
from probe.checks import disk_full, room_for
from probe.images import to_uint8
from probe.models import Generation, generation, load
from probe.record.config import RecordSettings
from probe.record.plan import Plan, plan
from probe.record.recorder import Recorder
from probe.record.schema import batch_datasets, recording_attrs
from probe.record.store import append_zarr, open_recording, write_netcdf
from probe.tap import Tap
from probe.writes import check_out, replacing


def record(pipe, prompts, *, seeds, settings: RecordSettings | None = None, out: str | Path | None = None,
           max_bytes: int | None = None, batch_size: int = 1, progress: bool = True, force: bool = False,
           **keywords) -> xr.DataTree:
    """Generate every (prompt, seed) sample and record its attention maps.

    What is recorded is ``settings`` (a :class:`~probe.record.config.RecordSettings`), or its fields given as
    keywords (``steps=``, ``kinds=``, ``layers=``, ``heads=``, ``keep_steps=`` …). ``steps`` and ``guidance_scale``
    not given are the model's own (:func:`probe.models.generation`: the pipeline's defaults, so the images are those
    ``pipe(prompt, generator=…)`` makes), and the recording's attrs hold what ran. ``layers``: None (all), or names /
    globs / ``re:`` patterns / resolutions (see :func:`probe.models.select_layers`). ``heads``: ``"mean"``, ``"all"``
    or a list of indices. ``keep_steps``: step indices to keep (default all). ``out``: a ``.zarr`` path written batch by
    batch (the tree returned then reads lazily from it) or a ``.nc`` path written at the end; either is written
    beside ``out`` and swapped in when complete (a failed or killed run leaves ``out`` as it was), ``out`` is checked
    before anything is generated, and a file or folder there that is not a probe recording is replaced only with
    ``force=True``.
    Self-attention at a size one can afford (a FLUX layer's image→image map is 4,096² per head and step):
    ``self_keys=16`` sums each query's attention onto a 16×16 grid of key cells (rows still sum to their mass),
    ``self_queries=[(0.5, 0.25), …]`` keeps only those query points ((y, x) fractions of the image; dims
    ``point``, ``ky``, ``kx`` with the cell of each point in ``query_y``, ``query_x``). Both reduce on the device.
    ``self_store="qk"`` keeps a self layer's q and k as the model scores them instead of its maps (h·w·2·dim values
    per head instead of (h·w)², and no extra arithmetic while generating); on a joint softmax (SD3, FLUX …) every
    token's q and every key, so that :func:`probe.analysis.lazy.maps_from_qk` makes any relation's maps on read,
    lazily.
    Other keywords (height, width, negative_prompt …) go to the pipeline call.
    """

    pipe = load(pipe)
    chosen, pipeline_kwargs = RecordSettings.split(keywords, settings)
    own = [*RecordSettings.names(), *checks.keyword_names(record)]
    checks.pipeline_keywords(pipe, pipeline_kwargs, "record", {
        "prompt": "from prompts=", "generator": "each sample's from its seed", "output_type": "images are stored",
        "num_images_per_prompt": "one image per (prompt, seed) sample: give more seeds",
        "latents": "the seed draws each sample's initial noise, so latents= would give every seed the same one; for "
                   "noise of your own use probe.steer.guide.generate(pipe, prompt, ..., init_noise=tensor)"}, own=own)
    run = generation(pipe, chosen.steps, chosen.guidance_scale, caller="record")
    chosen = replace(chosen, steps=run.steps, guidance_scale=run.guidance_scale)
    batch_size = checks.whole_number(batch_size, "batch_size", "the number of samples generated together")
    max_bytes = checks.byte_limit(max_bytes)
    height, width = pipeline_kwargs.get("height"), pipeline_kwargs.get("width")
    p = plan(pipe, prompts, seeds=seeds, settings=chosen, height=height, width=width,
             max_sequence_length=pipeline_kwargs.get("max_sequence_length"))
    if max_bytes is not None and p.nbytes > max_bytes:
        parts = ", ".join(f"{g}: {b / 1e6:.1f} MB" for g, b in sorted(p.group_bytes().items(), key=lambda kv: -kv[1]))
        raise MemoryError(
            f"this recording needs an estimated {p.nbytes / 1e6:.1f} MB, over max_bytes={max_bytes / 1e6:.1f} MB "
            f"({parts}). Drop the largest groups (kinds=('cross',), layers=[16] …), keep fewer steps "
            "(keep_steps=…), average heads (heads='mean') or record fewer samples."
        )
    if out is not None:
        out = check_out(out, (".zarr", ".nc"), force=force)
        room_for(out, p.nbytes)
    attrs = recording_attrs(pipe, run.steps, run.guidance_scale, p, pipeline_kwargs)
    try:
        with replacing(out, suffixes=(".zarr", ".nc"), force=force, what="recording") if out else nullcontext() as tmp:
            zarr_tmp = tmp if out is not None and out.suffix == ".zarr" else None
            tree = _generate(pipe, p, run, batch_size, progress, attrs, zarr_tmp, pipeline_kwargs)
            if out is not None and zarr_tmp is None:
                write_netcdf(tree, tmp)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise disk_full(err, out) from err
        raise
    return open_recording(out) if out is not None and out.suffix == ".zarr" else tree


def _generate(pipe, p: Plan, run: Generation, batch_size: int, progress: bool, attrs: dict, zarr_path: Path | None,
              pipeline_kwargs: dict) -> xr.DataTree | None:
    """Run every batch of the plan; each batch appended to ``zarr_path`` as it finishes, or all kept in memory and
    returned as one tree."""
    height, width = pipeline_kwargs.get("height"), pipeline_kwargs.get("width")
    device = pipe._execution_device
    batches: list[dict] = []
    with tqdm(total=len(p.samples), desc="recording", unit="sample", disable=not progress) as bar:
        for start in range(0, len(p.samples), batch_size):
            batch = slice(start, min(start + batch_size, len(p.samples)))
            recorder = Recorder(p, batch, device, run.steps)
            with Tap(pipe, [recorder], height=height, width=width) as tap:
                result = pipe(
                    prompt=[prompt for prompt, _ in p.samples[batch]],
                    generator=[torch.Generator(device).manual_seed(s) for _, s in p.samples[batch]],
                    output_type="np",
                    **run.pipeline_kwargs(),
                    **pipeline_kwargs,
                )
                timesteps = [tap.timestep_of(s) for s in range(run.steps)]
            groups = batch_datasets(p, batch, recorder.to_host(), to_uint8(result.images), timesteps)
            if zarr_path is not None:
                append_zarr(zarr_path, groups, attrs, first=start == 0)
            else:
                batches.append(groups)
            bar.update(batch.stop - batch.start)
    if zarr_path is not None:
        return None
    # one batch is taken as it is: concatenating it alone copies every map (160 ms of a 0.7 s generation on the
    # built-in model with self maps)
    joined = batches[0] if len(batches) == 1 else {g: xr.concat([b[g] for b in batches], "sample") for g in batches[0]}
    return xr.DataTree.from_dict({"/": xr.Dataset(attrs=attrs), **joined})


