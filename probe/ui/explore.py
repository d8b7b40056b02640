"""Explore a recording in a notebook: pick a sample, step, layer, head and token and see the maps the model drew.

Two parts, kept apart so the numbers can be tested without a browser:

- :class:`ViewModel` computes. Given :class:`Controls` it returns a :class:`View`: the token's cross-attention map,
  the self-attention map of one query pixel and the subjects' overlap statistics (from :mod:`probe.analysis.overlap`).
  It reads only the slice it shows (``.isel`` / ``.sel`` on the recording's lazy arrays, then ``.values``), so a
  zarr recording far larger than memory opens at once and each control change reads one sample's chunks.
- :class:`Explorer` draws: ipywidgets controls wired to the view model, two image panels (click a pixel to pick the
  query; ``ipyevents`` gives the click, x / y sliders do the same without it), the statistics and a PNG export.
"""

from __future__ import annotations

import html
import io
import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr

from probe.analysis.maps import aggregate_self_attention, recorded_step, resize
from probe.analysis.overlap import (
    PAIR_STATISTICS,
    center_of_mass,
    intensity,
    pair_indices,
    pair_overlap,
    self_cross_overlap,
    spread,
)
from probe.analysis.subjects import subject_maps, word_tokens
from probe.prompts import subjects_of, token_indices, word_occurrences
from probe.record import full_self

ALL = "all"
MEAN = "mean"
DISPLAY = 288  # panel width in screen pixels: small images are enlarged, large ones shrunk
MARKER = (0, 255, 255)  # the query pixel's outline
CACHE_SLICES = 8  # step slices kept, so changing only the token or the query pixel reads nothing again
PAIR_COLUMNS = ("a", "b", *PAIR_STATISTICS)
SUBJECT_COLUMNS = ("subject", "tokens", "intensity", "spread", "com_y", "com_x")


@dataclass(frozen=True)
class Controls:
    """What is shown. ``step`` is a step coordinate (not a position); ``layer`` is ``"all"``, a resolution group
    (``"res16"``) or ``"res16/<cross layer name>"``; ``head`` None is the head mean; ``token`` an index into the
    sample's tokens; ``query`` (y, x) a pixel of :attr:`ViewModel.query_grid`."""

    sample: int = 0
    step: int = 0
    layer: str = ALL
    head: int | None = None
    token: int = 0
    query: tuple[int, int] = (0, 0)


@dataclass
class View:
    """Everything one setting of the controls shows, as arrays and numbers (no drawing)."""

    controls: Controls
    prompt: str
    seed: int
    timestep: float
    token_text: str
    image: np.ndarray | None  # (iy, ix, 3) uint8, None when the recording holds no images
    cross: np.ndarray  # (H, W) float32: the token's map
    cross_source: str
    self_map: np.ndarray | None  # (h, w) float32: attention of the query pixel over the keys
    self_query: tuple[int, int] | None  # the query pixel on the self map's grid
    self_source: str
    subjects: list[str]
    subject_maps: np.ndarray  # (S, H, W) float32, the subjects' maps the statistics are computed on
    pairs: pd.DataFrame  # one row per subject pair: PAIR_COLUMNS
    subject_stats: pd.DataFrame  # one row per subject: SUBJECT_COLUMNS


def _block(layer: str) -> str:
    """The transformer block of a layer name, so the self layer beside a cross layer is found (``attn1``/``attn2``)."""
    head, _, last = layer.rpartition(".")
    return head if head and last.startswith("attn") else layer


def _groups(tree: xr.DataTree, kind: str) -> list[str]:
    """A kind's group names, finest grid first."""
    if kind not in tree.children:
        return []
    return sorted(tree[kind].children, key=lambda n: -int(tree[f"{kind}/{n}"].ds.sizes["y"]))


def _subject_tokens(texts: list[str], encoders: list[str] | None, prompt: str) -> list[tuple[str, list[int]]]:
    """The prompt's subject nouns with their token indices (:func:`probe.analysis.subjects.word_tokens`: every copy
    of a word, SD3's CLIP and T5 alike); none where the prompt's nouns cannot be found, and a word missing from the
    tokens is left out (its statistics cannot be shown)."""
    try:
        words = subjects_of(prompt)
    except ValueError:
        return []
    words = [w for w in words if word_occurrences(texts, w)]
    try:
        return list(zip(words, word_tokens(texts, words, encoders, prompt)))
    except ValueError:
        return []


class ViewModel:
    """The numbers behind the explorer: for given :class:`Controls`, what is shown (see :meth:`view`).

    ``tree`` is a recording (:func:`probe.record` or :func:`probe.open_recording`); it needs cross-attention,
    self-attention and images are shown where recorded.
    """

    def __init__(self, tree: xr.DataTree):
        self.tree = tree
        for g in tree["self"].children if "self" in tree.children else ():
            full_self(tree[f"self/{g}"].ds, "the explorer")
        self.cross_groups = _groups(tree, "cross")
        self.self_groups = _groups(tree, "self")
        if not self.cross_groups:
            raise ValueError("this recording has no cross-attention; record it with kinds including 'cross'")
        first = tree[f"cross/{self.cross_groups[0]}"].ds
        if not first.sizes.get("sample"):
            raise ValueError("this recording holds no samples (0 generations), so there is nothing to show; record at "
                             "least one prompt and seed (probe.record(pipe, prompt, seeds=[0]))")
        self.steps = [int(s) for s in first["step"].values]
        self.timesteps = {int(s): float(t) for s, t in zip(first["step"].values, first["timestep"].values)}
        self.prompts = [str(p) for p in first["prompt"].values]
        self.seeds = [int(s) for s in first["seed"].values]
        self.layers = {g: [str(n) for n in tree[f"cross/{g}"].ds["layer"].values] for g in self.cross_groups}
        self.self_layers = {g: [str(n) for n in tree[f"self/{g}"].ds["layer"].values] for g in self.self_groups}
        self.grids = {f"{kind}/{g}": (int(tree[f"{kind}/{g}"].ds.sizes["y"]), int(tree[f"{kind}/{g}"].ds.sizes["x"]))
                      for kind, groups in (("cross", self.cross_groups), ("self", self.self_groups)) for g in groups}
        heads = [set(int(h) for h in tree[f"{kind}/{g}"].ds["head"].values)
                 for kind, groups in (("cross", self.cross_groups), ("self", self.self_groups)) for g in groups
                 if "head" in tree[f"{kind}/{g}"].ds.dims]
        self.heads = sorted(set.intersection(*heads)) if heads else []
        self.has_images = "images" in tree.children
        self.query_grid = self.grids[f"self/{self.self_groups[0]}"] if self.self_groups else None
        self._samples: dict[int, tuple[list[str], list[str] | None, np.ndarray | None]] = {}
        self._slices: OrderedDict[tuple, np.ndarray] = OrderedDict()

    # -- options for the controls ---------------------------------------------------------------------------------

    def layer_options(self) -> list[tuple[str, str]]:
        """(label, value) for every choice of layers: all, each resolution's mean, each layer."""
        n_all = sum(map(len, self.layers.values()))
        options = [(f"all layers (mean of {n_all})", ALL)]
        for g in self.cross_groups:
            options.append((f"{g} (mean of {len(self.layers[g])})", g))
            options += [(f"{g} · {_block(name)}", f"{g}/{name}") for name in self.layers[g]]
        return options

    def tokens(self, sample: int) -> list[str]:
        """The sample's token texts (padding slots, empty, are not among them)."""
        return [t for t in self._sample(sample)[0] if t]

    def subjects(self, sample: int) -> list[tuple[str, list[int]]]:
        """The prompt's subject nouns (:func:`probe.prompts.subjects_of`) with their token indices."""
        texts, encoders, _ = self._sample(sample)
        return _subject_tokens(texts, encoders, self.prompts[sample])

    def default_controls(self, sample: int = 0) -> Controls:
        """The last step, every layer, the head mean, the first subject's token and the centre pixel."""
        subjects = self.subjects(sample)
        token = subjects[0][1][0] if subjects else min(1, len(self.tokens(sample)) - 1)
        grid = self.query_grid or (1, 1)
        return Controls(sample, self.steps[-1], ALL, None, token, (grid[0] // 2, grid[1] // 2))

    # -- reading --------------------------------------------------------------------------------------------------

    def _sample(self, sample: int) -> tuple[list[str], list[str] | None, np.ndarray | None]:
        """Token texts, their encoders (SD3: "clip" / "t5"; None with one encoder) and the image of one sample, read
        once when the sample is first shown."""
        if sample not in self._samples:
            if not 0 <= sample < len(self.prompts):
                raise IndexError(f"sample {sample} not in 0 … {len(self.prompts) - 1}")
            ds = self.tree[f"cross/{self.cross_groups[0]}"].ds
            tokens = [str(t) for t in ds["token_text"].isel(sample=sample).values]
            encoders = ([str(e) for e in ds["encoder"].isel(sample=sample).values] if "encoder" in ds.coords
                        else None)
            image = np.asarray(self.tree["images"]["image"].isel(sample=sample).values) if self.has_images else None
            self._samples = {sample: (tokens, encoders, image)}  # one sample at a time: memory stays flat
        return self._samples[sample]

    def _read(self, kind: str, group: str, layers: list[str] | None, c: Controls, query=None) -> np.ndarray:
        """One group's float32 slice at the controls' sample and step, layer-mean and head-selected (or head-mean):
        cross (y, x, token), self (y, x, ky, kx), or with ``query`` (y, x) the self keys (ky, kx) of that pixel."""
        key = (kind, group, tuple(layers or ()), c.sample, c.step, c.head, query)
        if key in self._slices:
            self._slices.move_to_end(key)
            return self._slices[key]
        attn = self.tree[f"{kind}/{group}"]["attn"].isel(sample=c.sample).sel(step=c.step)
        if layers is not None:
            attn = attn.sel(layer=layers)
        if c.head is not None:
            attn = attn.sel(head=c.head)
        if query is not None:
            attn = attn.isel(y=query[0], x=query[1])
        values = np.asarray(attn.values, np.float32)  # the only read
        axes = tuple(i for i, d in enumerate(attn.dims) if d in ("layer", "head"))
        values = values.mean(axes)
        self._slices[key] = values
        if len(self._slices) > CACHE_SLICES:
            self._slices.popitem(last=False)
        return values

    def _cross_parts(self, layer: str) -> list[tuple[str, list[str] | None, int]]:
        """(group, layers or None for all of them, number of layers) that a layer choice averages."""
        if layer == ALL:
            return [(g, None, len(self.layers[g])) for g in self.cross_groups]
        group, _, name = layer.partition("/")
        if group not in self.layers or (name and name not in self.layers[group]):
            raise ValueError(f"unknown layer choice {layer!r}; choose one of {[v for _, v in self.layer_options()]}")
        return [(group, [name], 1)] if name else [(group, None, len(self.layers[group]))]

    def _self_parts(self, layer: str) -> tuple[list[tuple[str, list[str] | None, int]], str]:
        """The self layers shown beside a layer choice, and a note of what they are."""
        if layer == ALL:
            parts = [(g, None, len(self.self_layers[g])) for g in self.self_groups]
            return parts, f"self · all layers (mean of {sum(n for *_, n in parts)})" if parts else "no self-attention"
        group, _, name = layer.partition("/")
        if group not in self.self_layers:
            return [], f"no self-attention recorded at {group}"
        mean = [(group, None, len(self.self_layers[group]))]
        if not name:
            return mean, f"self/{group} (mean of {len(self.self_layers[group])})"
        same = [n for n in self.self_layers[group] if _block(n) == _block(name)]
        if same:
            return [(group, same[:1], 1)], f"self/{group} · {same[0]}"
        return mean, f"self/{group} (mean of {len(self.self_layers[group])}; no self layer in this block)"

    @staticmethod
    def _combine(parts: list[tuple[np.ndarray, int]], grid: tuple[int, int]) -> np.ndarray:
        """Mean over layers of maps (..., h, w) on different grids: each group's mean resized to ``grid`` (bilinear,
        as the figures do) and weighted by its number of layers."""
        total = sum(n for _, n in parts)
        out = 0
        for values, n in parts:
            t = torch.from_numpy(values)
            if tuple(t.shape[-2:]) != grid:
                t = resize(t, grid)
            out = out + t * (n / total)
        return out.numpy().astype(np.float32)

    # -- the view -------------------------------------------------------------------------------------------------

    def view(self, c: Controls) -> View:
        """The arrays and numbers shown for ``c``."""
        if c.step not in self.timesteps:
            raise ValueError(f"step {c.step} not recorded; steps are {self.steps}")
        tokens = self.tokens(c.sample)
        if not 0 <= c.token < len(tokens):
            raise IndexError(f"token {c.token} not in 0 … {len(tokens) - 1} ({tokens})")
        cross_parts = self._cross_parts(c.layer)
        grid = max((self.grids[f"cross/{g}"] for g, *_ in cross_parts), key=lambda hw: hw[0])
        reads = [(self._read("cross", g, layers, c), n) for g, layers, n in cross_parts]
        cross_all = self._combine([(np.moveaxis(v, -1, 0), n) for v, n in reads], grid)  # (T, H, W)
        cross = cross_all[c.token]

        subjects = self.subjects(c.sample)
        by_token = torch.from_numpy(np.moveaxis(cross_all, 0, -1))  # (H, W, T)
        maps = subject_maps(by_token, [ix for _, ix in subjects])  # (S, H, W), S = 0 without subjects

        self_parts, self_source = self._self_parts(c.layer)
        self_map, self_query, self_full = None, None, None
        if self_parts and self.query_grid is not None:
            qh, qw = self.query_grid
            if not (0 <= c.query[0] < qh and 0 <= c.query[1] < qw):
                raise IndexError(f"query pixel {c.query} outside the {qh}×{qw} query grid")
            single = len(self_parts) == 1 and len(cross_parts) == 1
            pieces = []
            for g, layers, n in self_parts:
                h, w = self.grids[f"self/{g}"]
                q = (c.query[0] * h // qh, c.query[1] * w // qw)
                if single and (h, w) == grid:  # self-cross needs the whole slice: read it once, take the query
                    self_full = self._read("self", g, layers, c)
                    pieces.append((self_full[q], n))
                else:
                    pieces.append((self._read("self", g, layers, c, query=q), n))
                self_query = q
            if len(self_parts) > 1:
                self_query = c.query
                self_map = self._combine(pieces, self.query_grid)
            else:
                self_map = pieces[0][0]

        pairs, subject_stats = _statistics(subjects, maps, self_full)
        *_, image = self._sample(c.sample)
        n_layers = sum(n for *_, n in cross_parts)
        cross_source = (f"cross/{cross_parts[0][0]} · {cross_parts[0][1][0]}" if cross_parts[0][1]
                        else f"cross · {c.layer if c.layer != ALL else 'all layers'} (mean of {n_layers})")
        if c.head is not None:
            cross_source += f" · head {c.head}"
            self_source += f" · head {c.head}" if self_parts else ""
        return View(c, self.prompts[c.sample], self.seeds[c.sample], self.timesteps[c.step], tokens[c.token], image,
                    cross, cross_source, self_map, self_query, self_source, [w for w, _ in subjects],
                    maps.numpy(), pairs, subject_stats)


def _statistics(subjects: list[tuple[str, list[int]]], maps: torch.Tensor, self_full: np.ndarray | None
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The subjects' statistics from :mod:`probe.analysis.overlap`: per pair overlap and distance, per subject its own.

    ``self_cross`` needs the self-attention at the maps' grid (one resolution shown); NaN otherwise.
    """
    words = [w for w, _ in subjects]
    aggregated = (aggregate_self_attention(maps, torch.from_numpy(self_full)[None])
                  if self_full is not None and len(subjects) else None)
    rows = []
    for i, j in pair_indices(len(subjects)):
        a, b = maps[i], maps[j]
        cross_self = (float(self_cross_overlap(maps[[i, j]], aggregated[[i, j]])) if aggregated is not None
                      else math.nan)
        overlap = pair_overlap(a, b)
        rows.append({"a": words[i], "b": words[j], **{k: float(overlap[k]) for k in PAIR_STATISTICS[:-1]},
                     "self_cross": cross_self})
    centres = center_of_mass(maps) if len(subjects) else torch.zeros(0, 2)
    own = [{"subject": w, "tokens": ix, "intensity": float(intensity(maps[k])), "spread": float(spread(maps[k])),
            "com_y": float(centres[k, 0]), "com_x": float(centres[k, 1])} for k, (w, ix) in enumerate(subjects)]
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS)), pd.DataFrame(own, columns=list(SUBJECT_COLUMNS))


# -- drawing ---------------------------------------------------------------------------------------------------------


def _unit(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] for colouring only (NaN as 0); the numbers shown elsewhere are the raw ones."""
    values = np.nan_to_num(np.asarray(values, np.float32))
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def render_panel(heat: np.ndarray, image: np.ndarray | None = None, cell: tuple[int, int] | None = None,
                 cell_grid: tuple[int, int] | None = None, width: int = DISPLAY) -> np.ndarray:
    """A map coloured with the figures' colormap, over the image where there is one, with the query pixel
    outlined: (height, ``width``, 3) uint8. Small grids are enlarged without smoothing so their pixels stay visible.
    """
    from matplotlib import colormaps
    from PIL import Image

    from probe.plots import CMAP, OVERLAY_ALPHA  # the figures' colours (imported here: matplotlib is drawn late)

    if image is not None:
        h, w = image.shape[:2]
        up = resize(torch.from_numpy(np.asarray(heat, np.float32)), (h, w)).numpy()
        colour = colormaps[CMAP](_unit(up))[..., :3]
        rgb = ((1 - OVERLAY_ALPHA) * image / 255 + OVERLAY_ALPHA * colour) * 255
    else:
        h, w = heat.shape
        rgb = colormaps[CMAP](_unit(heat))[..., :3] * 255
    height = max(1, round(width * h / w))
    resample = Image.NEAREST if width >= w else Image.LANCZOS
    out = np.asarray(Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8)).resize((width, height), resample))
    if cell is not None and cell_grid is not None:
        out = out.copy()
        gh, gw = cell_grid
        y0, y1 = cell[0] * height // gh, max((cell[0] + 1) * height // gh - 1, cell[0] * height // gh)
        x0, x1 = cell[1] * width // gw, max((cell[1] + 1) * width // gw - 1, cell[1] * width // gw)
        out[y0:y1 + 1, [x0, x1]] = MARKER
        out[[y0, y1], x0:x1 + 1] = MARKER
    return out


def panels(view: View, width: int = DISPLAY) -> tuple[np.ndarray, np.ndarray | None]:
    """The two panels of a view: the token's map and the query pixel's self-attention (None if not recorded)."""
    grid = view.self_map.shape if view.self_map is not None else None
    cross = render_panel(view.cross, view.image, view.self_query, grid, width)
    own = (render_panel(view.self_map, view.image, view.self_query, grid, width) if view.self_map is not None
           else None)
    return cross, own


def png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array, for an image widget."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def titles(view: View) -> tuple[str, str]:
    """What each panel shows, in words: two lines each (what, then from which layers)."""
    c = view.controls
    cross = f"{view.token_text!r} · step {c.step} (t={view.timestep:g})\n{view.cross_source}"
    if view.self_map is None:
        return cross, f"no query pixel\n{view.self_source}"
    y, x = view.self_query
    h, w = view.self_map.shape
    return cross, f"query pixel y={y}, x={x} of {h}×{w}\n{view.self_source}"


def statistics_table(view: View) -> pd.DataFrame:
    """The statistics shown: one row per subject pair and per subject, for display and export."""
    pairs = view.pairs.assign(subjects=[f"{a} · {b}" for a, b in zip(view.pairs.a, view.pairs.b)])
    pairs = pairs.set_index("subjects").drop(columns=["a", "b"])
    own = view.subject_stats.set_index("subject").drop(columns=["tokens"])
    return pd.concat([pairs, own], axis=0)


def view_figure(view: View, width: int = DISPLAY):
    """The view as one matplotlib figure (both panels, their titles, the statistics), for saving as PNG."""
    from matplotlib.figure import Figure

    cross, own = panels(view, width)
    cross_title, self_title = titles(view)
    table = statistics_table(view)
    fig = Figure(figsize=(9.5, 4.6 + 0.22 * len(table)))
    grid = fig.add_gridspec(2, 2, height_ratios=[4.2, 0.4 + 0.22 * len(table)])
    for k, (rgb, title) in enumerate(((cross, cross_title), (own, self_title))):
        ax = fig.add_subplot(grid[0, k])
        ax.axis("off")
        if rgb is not None:
            ax.imshow(rgb)
        else:
            ax.text(0.5, 0.5, title, ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=7, wrap=True)
    fig.suptitle(f"{view.prompt} · seed {view.seed}", fontsize=10)
    ax = fig.add_subplot(grid[1, :])
    ax.axis("off")
    if len(table):
        shown = table.map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
        ax.table(cellText=shown.values, rowLabels=list(shown.index), colLabels=list(shown.columns),
                 loc="center", fontsize=7).auto_set_font_size(False)
    fig.subplots_adjust(left=0.12, right=0.98, top=0.9, bottom=0.02)
    return fig


def _stats_html(view: View) -> str:
    """The statistics as two HTML tables side by side: subject pairs, then each subject."""
    if not view.subjects:
        return f"<i>no subjects found in {view.prompt!r}</i>"
    number = {"float_format": lambda v: f"{v:.4g}", "na_rep": "–", "border": 0, "index_names": False}
    pairs = view.pairs.assign(pair=[f"{a} · {b}" for a, b in zip(view.pairs.a, view.pairs.b)])
    pairs = pairs.set_index("pair").drop(columns=["a", "b"]).to_html(**number)
    own = view.subject_stats.set_index("subject").to_html(**number)
    return (f"<b>subjects at step {view.controls.step}</b> (probe.analysis.overlap)"
            f"<div style='display:flex;gap:32px;align-items:flex-start'>{pairs}{own}</div>")


# -- the widget ------------------------------------------------------------------------------------------------------


class Explorer:
    """Controls wired to a :class:`ViewModel`; displays itself in a notebook (``self.widget``).

    Controls: ``sample``, ``step``, ``layer``, ``head``, ``token``, ``query_y`` / ``query_x``; panels
    ``cross_image`` / ``self_image``; ``stats``; ``export_button`` saves the view to ``export_path``. ``view`` is
    what is shown now. Set a control's ``.value`` and everything follows, as after a click in the browser.
    """

    def __init__(self, recording: xr.DataTree | ViewModel, controls: Controls | None = None, width: int = DISPLAY):
        w = _widgets()

        self.model = recording if isinstance(recording, ViewModel) else ViewModel(recording)
        self.width = width
        c = controls or self.model.default_controls()
        m = self.model
        wide = w.Layout(width="auto", min_width="420px")
        style = {"description_width": "70px"}
        self.sample = w.Dropdown(options=[(f"{i}: {p} · seed {s}", i) for i, (p, s) in enumerate(zip(m.prompts,
                                          m.seeds))], value=c.sample, description="sample", layout=wide, style=style)
        self.step = w.SelectionSlider(options=[(str(s), s) for s in m.steps], value=c.step, description="step",
                                      continuous_update=False, layout=wide, style=style)
        self.layer = w.Dropdown(options=m.layer_options(), value=c.layer, description="layers", layout=wide,
                                style=style)
        self.head = w.Dropdown(options=[("mean", MEAN)] + [(f"head {h}", h) for h in m.heads],
                               value=MEAN if c.head is None else c.head, description="head", style=style)
        if not m.heads:
            self.head.layout.display = "none"
        self.token = w.Dropdown(options=self._token_options(c.sample), value=c.token, description="token",
                                style=style)
        qh, qw = m.query_grid or (1, 1)
        self.query_y = w.IntSlider(value=c.query[0], min=0, max=qh - 1, description="query y",
                                   continuous_update=False, style=style)
        self.query_x = w.IntSlider(value=c.query[1], min=0, max=qw - 1, description="query x",
                                   continuous_update=False, style=style)
        self.cross_image = w.Image(format="png")
        self.self_image = w.Image(format="png")
        self.cross_title = w.HTML(layout=w.Layout(height="2.8em", overflow="hidden"))
        self.self_title = w.HTML(layout=w.Layout(height="2.8em", overflow="hidden"))
        self.stats = w.HTML()
        self.export_path = w.Text(value="explorer.png", description="file", style=style)
        self.export_button = w.Button(description="save PNG", icon="download")
        self.export_status = w.HTML()
        self.export_button.on_click(lambda _: self._export_clicked())
        self.click_events = self._click_events([self.cross_image, self.self_image])
        for name in ("sample", "step", "layer", "head", "token", "query_y", "query_x"):
            control = getattr(self, name)
            control.add_class(f"probe-{name.replace('_', '-')}")
        for part, name in ((self.cross_image, "cross"), (self.self_image, "self"), (self.stats, "stats"),
                           (self.cross_title, "cross-title"), (self.self_title, "self-title"),
                           (self.export_button, "export")):
            part.add_class(f"probe-{name}")
        query = [self.query_y, self.query_x] if m.query_grid else []
        hint = "click a pixel or move the sliders to pick the query" if self.click_events else "move the sliders"
        panel_box = w.Layout(width=f"{width + 8}px")
        self.widget = w.VBox([
            w.HBox([self.sample]), w.HBox([self.step]), w.HBox([self.layer]), w.HBox([self.token, self.head]),
            w.HBox(query + ([w.HTML(f"<small>{hint}</small>")] if query else [])),
            w.HBox([w.VBox([self.cross_title, self.cross_image], layout=panel_box),
                    w.VBox([self.self_title, self.self_image], layout=panel_box)]),
            self.stats,
            w.HBox([self.export_path, self.export_button, self.export_status]),
        ])
        self.widget.add_class("probe-explorer")
        self._holding = False
        self.view: View
        self.refresh()
        self.sample.observe(self._sample_changed, "value")
        for control in (self.step, self.layer, self.head, self.token, self.query_y, self.query_x):
            control.observe(lambda _: self._changed(), "value")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _token_options(self, sample: int) -> list[tuple[str, int]]:
        return [(f"{i}: {t}", i) for i, t in enumerate(self.model.tokens(sample))]

    def _click_events(self, images) -> list:
        """Click handlers on the panels where ``ipyevents`` is installed (the sliders work without it)."""
        try:
            from ipyevents import Event
        except ImportError:
            return []
        events = []
        for image in images:
            event = Event(source=image, watched_events=["click"])
            event.on_dom_event(lambda e, image=image: self.click(e, image))
            events.append(event)
        return events

    @contextmanager
    def _hold(self) -> Iterator[None]:
        """Change several controls and draw once (nested holds draw when the outermost ends)."""
        before, self._holding = self._holding, True
        try:
            yield
        finally:
            self._holding = before

    def controls(self) -> Controls:
        """The controls' values now."""
        head = None if self.head.value == MEAN else int(self.head.value)
        return Controls(int(self.sample.value), int(self.step.value), str(self.layer.value), head,
                        int(self.token.value), (int(self.query_y.value), int(self.query_x.value)))

    def _sample_changed(self, change) -> None:
        old_tokens = self.model.tokens(change["old"]) if change["old"] is not None else []
        previous = old_tokens[self.token.value] if self.token.value is not None and old_tokens else None
        tokens = self.model.tokens(change["new"])
        with self._hold():
            self.token.options = self._token_options(change["new"])
            if previous in tokens:
                self.token.value = tokens.index(previous)
            else:
                self.token.value = self.model.default_controls(change["new"]).token
        self._changed()

    def _changed(self) -> None:
        if not self._holding:
            self.refresh()

    def refresh(self) -> None:
        """Compute the view for the controls and draw it."""
        self.view = self.model.view(self.controls())
        cross, own = panels(self.view, self.width)
        cross_title, self_title = titles(self.view)
        self.cross_image.value = png(cross)
        self.cross_title.value = _title_html(cross_title)
        blank = np.full((max(1, cross.shape[0] // 4), self.width, 3), 255, np.uint8)
        self.self_image.value = png(own if own is not None else blank)
        self.self_title.value = _title_html(self_title)
        self.stats.value = _stats_html(self.view)

    def click(self, event: dict, image=None) -> None:
        """Pick the query pixel from a click on a panel (an ``ipyevents`` event: ``dataX`` / ``dataY`` in the
        image's own pixels, or ``relativeX`` / ``relativeY`` with ``boundingRectWidth`` / ``Height``)."""
        if self.model.query_grid is None:
            return
        qh, qw = self.model.query_grid
        if "dataX" in event and "dataY" in event:
            width, height = _png_size((image or self.cross_image).value)
            fx, fy = event["dataX"] / width, event["dataY"] / height
        else:
            fx = event["relativeX"] / max(event["boundingRectWidth"], 1)
            fy = event["relativeY"] / max(event["boundingRectHeight"], 1)
        y = min(max(int(fy * qh), 0), qh - 1)
        x = min(max(int(fx * qw), 0), qw - 1)
        with self._hold():
            self.query_y.value, self.query_x.value = y, x
        self.refresh()

    def export(self, path: str | Path) -> Path:
        """Save the view as a PNG (both panels, their titles and the statistics)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        view_figure(self.view, self.width).savefig(path, dpi=130, format="png")
        return path

    def _export_clicked(self) -> None:
        path = self.export(self.export_path.value or "explorer.png")
        self.export_status.value = f"<small>saved {path}</small>"

    def set(self, **values) -> None:
        """Set several controls at once (names of :class:`Controls`; ``query`` as (y, x)) and draw once."""
        with self._hold():
            if "sample" in values:  # first: it changes the tokens offered
                self.sample.value = int(values["sample"])
            c = replace(self.controls(), **values)
            self.step.value, self.layer.value = c.step, c.layer
            self.head.value = MEAN if c.head is None else c.head
            self.token.value = c.token
            self.query_y.value, self.query_x.value = c.query
        self.refresh()


def _widgets():
    """``ipywidgets``, which the explorer draws with; an optional dependency, so its absence says how to install it."""
    try:
        import ipywidgets
    except ImportError as err:
        raise ImportError('the explorer draws with ipywidgets, which is not installed; install the notebook extras: '
                          'pip install "probe[notebooks]" (or pip install ipywidgets)') from err
    return ipywidgets


def _title_html(title: str) -> str:
    lines = [html.escape(line) for line in title.split("\n")]
    style = "white-space:nowrap;overflow:hidden;text-overflow:ellipsis;line-height:1.3em;font-size:12px"
    return "".join(f"<div style='{style}' title='{line}'>{line}</div>" for line in lines)


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def explore(recording: xr.DataTree | str | Path, **controls) -> Explorer:
    """An interactive view of a recording in a notebook: see where each token attends, at each step and layer.

    ``recording``: a tree from :func:`probe.record` or a path (opened lazily with :func:`probe.open_recording`;
    only what is shown is read). Keywords set the first view (names of :class:`Controls`; ``token`` may be a word).
    Needs ``ipywidgets`` (``pip install probe[notebooks]``); ``ipyevents`` adds picking the query pixel by click.
    """
    _widgets()  # before anything is read
    if isinstance(recording, (str, Path)):
        from probe.record import open_recording

        recording = open_recording(recording)
    model = ViewModel(recording)
    sample = int(controls.get("sample", 0))
    base = model.default_controls(sample)
    if isinstance(controls.get("token"), str):
        controls["token"] = token_indices(model.tokens(sample), controls["token"])[0]
    if controls.get("step") is not None:
        controls["step"] = recorded_step(model.steps, int(controls["step"]))
    return Explorer(model, replace(base, **{k: v for k, v in controls.items() if v is not None}))
