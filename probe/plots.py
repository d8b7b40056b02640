"""Figures. Functions here draw; they compute nothing that ``probe.analysis.maps`` / ``probe.analysis.overlap`` do
not."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from probe.analysis.maps import resize, word_map

CMAP = "inferno"
OVERLAY_ALPHA = 0.6


def _upsampled(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return resize(torch.from_numpy(np.asarray(values, np.float32)), size).numpy()


def _overlay(ax, image: np.ndarray, heat: np.ndarray, title: str) -> None:
    ax.imshow(image)
    ax.imshow(_upsampled(heat, image.shape[:2]), cmap=CMAP, alpha=OVERLAY_ALPHA)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def cross_groups(tree) -> list[str]:
    """Cross-attention group paths of a recording, finest grid first."""
    if "cross" not in tree.children:
        raise ValueError("this recording has no cross-attention (it was recorded with kinds without 'cross')")
    names = sorted(tree["cross"].children, key=lambda n: -int(n.removeprefix("res").split("x")[0]))
    return [f"cross/{n}" for n in names]


def _at_step(maps, step: int):
    """``step`` is a step index; a negative one counts back from the last recorded step."""
    return maps.isel(step=step) if step < 0 else maps.sel(step=step)


def token_overlay(tree, word: str, step: int = -1, sample: int = 0):
    """One panel per resolution: the generated image under ``word``'s map (layer mean) at ``step``."""
    groups = cross_groups(tree)
    image = np.asarray(tree["images"]["image"].isel(sample=sample).values)
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(2.6 * (len(groups) + 1), 2.9), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title(str(tree["images"]["prompt"].values[sample]), fontsize=9)
    axes[0, 0].axis("off")
    for ax, group in zip(axes[0, 1:], groups):
        maps = _at_step(word_map(tree[group], sample, word), step).mean("layer")
        if "head" in maps.dims:
            maps = maps.mean("head")
        _overlay(ax, image, maps.values, f"{word!r} · {group.split('/')[1]} · step {int(maps.step)}")
    fig.tight_layout()
    return fig


def token_maps_over_steps(tree, words: list[str], group: str, sample: int = 0, max_steps: int = 8):
    """Grid words × steps of layer-mean maps: how each word's attention settles during denoising."""
    steps = np.asarray(tree[group]["step"].values)
    steps = steps[np.linspace(0, len(steps) - 1, min(max_steps, len(steps))).round().astype(int)]
    fig, axes = plt.subplots(len(words), len(steps), figsize=(1.6 * len(steps), 1.7 * len(words)), squeeze=False)
    for row, word in enumerate(words):
        maps = word_map(tree[group], sample, word).mean("layer")
        if "head" in maps.dims:
            maps = maps.mean("head")
        for col, step in enumerate(steps):
            ax = axes[row, col]
            ax.imshow(maps.sel(step=step).values, cmap=CMAP)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"step {step}", fontsize=8)
            if col == 0:
                ax.set_ylabel(word, fontsize=9)
    fig.suptitle(f"{group} · {tree[group]['prompt'].values[sample]}", fontsize=10)
    fig.tight_layout()
    return fig


# -- studies (probe.studies) -----------------------------------------------------------------------------------

PALETTE = "colorblind"
CHANCE_STYLE = {"color": "0.5", "linestyle": "--", "linewidth": 1}


def _short_layer(layer: str) -> str:
    """``up_blocks.1.attentions.0.transformer_blocks.0`` → ``up1.0.0`` for axis labels."""
    for long, short in (("_blocks.", ""), ("_block.", ""), ("attentions.", ""), ("transformer_blocks.", "")):
        layer = layer.replace(long, short)
    return layer


def probe_accuracy(table: pd.DataFrame):
    """Probe accuracy (Wilson interval) per layer, cross vs self features; rows targets, columns step bins.

    ``table``: :func:`probe.analysis.probes.probe_features`'s output. The dashed line is chance (majority class).
    """
    table = table.assign(
        where=[f"{r}·{_short_layer(str(la))}" for r, la in zip(table.resolution, table.layer)],
        features=[f"{k} {f}" for k, f in zip(table.kind, table.feature)],
    )
    targets = list(dict.fromkeys(table.target))
    bins = list(dict.fromkeys(table.step_bin))
    order = list(dict.fromkeys(table.sort_values("resolution", ascending=False, kind="stable")["where"]))
    hues = list(dict.fromkeys(table.features))
    colours = dict(zip(hues, sns.color_palette(PALETTE, len(hues))))
    n_rows, n_cols = max(len(targets), 1), max(len(bins), 1)
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False, sharey=True,
                             figsize=(max(3.2, 0.35 * len(order) + 1.5) * n_cols, 2.6 * n_rows))
    width = 0.8 / max(len(hues), 1)
    for (row, target), (col, step_bin) in ((r, c) for r in enumerate(targets) for c in enumerate(bins)):
        ax = axes[row, col]
        part = table[(table.target == target) & (table.step_bin == step_bin)]
        for k, hue in enumerate(hues):
            sub = part[part.features == hue]
            x = np.array([order.index(w) for w in sub["where"]]) + (k - (len(hues) - 1) / 2) * width
            yerr = np.clip([sub.accuracy - sub.ci_low, sub.ci_high - sub.accuracy], 0, None)
            ax.errorbar(x, sub.accuracy, yerr=yerr, fmt="o", ms=3, lw=1, color=colours[hue],
                        label=hue if row == col == 0 else None)
        if len(part):
            ax.axhline(part.chance.iloc[0], **CHANCE_STYLE)
        ax.set_xticks(range(len(order)), order, rotation=90, fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{target} · {step_bin}", fontsize=9)
        if col == 0:
            ax.set_ylabel("accuracy")
        sns.despine(ax=ax)
    if hues:
        fig.legend(loc="upper center", ncol=len(hues), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def overlap_auc(association: pd.DataFrame, columns: int = 5):
    """ROC AUC of each metric for each failure (a subject missing, subjects mixed), per step, with its bootstrap
    interval as a band; an outcome that no image (or every image) showed has no line."""
    metrics = list(dict.fromkeys(association.metric))
    outcomes = list(dict.fromkeys(association.outcome))
    rows = max(1, -(-len(metrics) // columns))
    fig, axes = plt.subplots(rows, columns, squeeze=False, sharex=True, sharey=True,
                             figsize=(2.4 * columns, 2.1 * rows + 0.4))
    colours = dict(zip(outcomes, sns.color_palette(PALETTE, len(outcomes))))
    for ax, metric in zip(axes.flat, metrics):
        for outcome in outcomes:
            part = association[(association.metric == metric) & (association.outcome == outcome)].sort_values("step")
            ax.fill_between(part.step, part.ci_low, part.ci_high, color=colours[outcome], alpha=0.2, lw=0)
            ax.plot(part.step, part.auc, color=colours[outcome], marker="o", ms=2, lw=1, label=outcome)
        ax.axhline(0.5, **CHANCE_STYLE)
        ax.set_ylim(0, 1)
        ax.set_title(metric, fontsize=9)
        sns.despine(ax=ax)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("AUC")
    counts = association.groupby("outcome", sort=False).n_cases.last()
    handles = [plt.Line2D([], [], color=colours[o], marker="o", ms=3, label=f"{o} ({counts[o]} images)")
               for o in outcomes]
    fig.legend(handles=handles, loc="upper center", ncol=len(outcomes), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return fig


EXAMPLE_GROUPS = {"every subject present": "all_present", "a subject missing": "missing", "subjects mixed": "mixed"}


def overlap_examples(examples):
    """Images where every subject is present, where one is missing and where the two are mixed, each with its two
    subjects' maps; a group without images is named in the figure's title instead of drawn empty.
    ``examples``: :class:`probe.studies.overlap.Example` objects."""
    found = {title: [e for e in examples if getattr(e, flag)] for title, flag in EXAMPLE_GROUPS.items()}
    groups = [(title, group) for title, group in found.items() if group] or [("no examples", [])]
    empty = [title for title, group in found.items() if not group]
    rows, width = max(1, *(len(g) for _, g in groups)), len(groups)
    fig, axes = plt.subplots(rows, 3 * width, squeeze=False, figsize=(4.75 * width, 1.9 * rows + 0.8))
    for ax in axes.flat:
        ax.axis("off")
    if empty:
        fig.suptitle("none in this run: " + "; ".join(empty), fontsize=9, y=0.995)
    for side, (title, group) in enumerate(groups):
        fig.text(0.02 + side / width, 0.99 - (0.25 if empty else 0) / fig.get_figheight(), title, fontsize=10,
                 va="top", weight="bold")
        for row, example in enumerate(group):
            ax = axes[row, 3 * side]
            ax.imshow(example.image)
            ax.set_title(example.prompt.replace(" and ", "\n"), fontsize=7)
            for k in range(2):
                panel = axes[row, 3 * side + 1 + k]
                _overlay(panel, example.image, example.maps[k], f"{example.words[k]}: {example.statuses[k]}")
                panel.title.set_fontsize(7)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.6 if empty else 0.35) / fig.get_figheight()))
    return fig


# -- guidance, self-cross and editing studies (probe.studies) ----------------------------------------------------

INITNO_LABELS = {False: "seed noise", True: "INITNO"}
INITNO_MARKERS = {False: "o", True: "s"}


def _error(table: pd.DataFrame, value: str, low: str, high: str) -> np.ndarray:
    """Asymmetric error bars (2, n) from interval columns; NaN intervals draw no bar."""
    return np.clip(np.nan_to_num([table[value] - table[low], table[high] - table[value]]), 0, None)


def outcome_rates(summary: pd.DataFrame, outcomes=("missing",), baseline: str | None = "ae"):
    """Per outcome a panel: its rate per method with the bootstrap 95% interval, seed noise vs INITNO side by side.

    ``summary``: :func:`probe.studies.guidance.outcome_summary`'s table (``{outcome}_rate``, ``_ci_low``, ``_ci_high``).
    The dashed line is the ``baseline`` method's rate without INITNO.
    """
    methods = list(dict.fromkeys(summary.method))
    initnos = sorted(set(summary.initno))
    colours = dict(zip(initnos, sns.color_palette(PALETTE, max(len(initnos), 1))))
    fig, axes = plt.subplots(1, len(outcomes), squeeze=False, sharey=True,
                             figsize=(max(3.5, 0.55 * len(methods) + 1.5) * len(outcomes), 3.4))
    width = 0.6 / max(len(initnos), 1)
    for ax, outcome in zip(axes[0], outcomes):
        rate, low, high = f"{outcome}_rate", f"{outcome}_ci_low", f"{outcome}_ci_high"
        for k, initno in enumerate(initnos):
            part = summary[summary.initno == initno]
            x = np.array([methods.index(m) for m in part.method]) + (k - (len(initnos) - 1) / 2) * width
            ax.errorbar(x, part[rate], yerr=_error(part, rate, low, high), fmt=INITNO_MARKERS.get(initno, "o"),
                        ms=5, lw=1.2, capsize=3, color=colours[initno], label=INITNO_LABELS.get(initno, str(initno)))
        base = summary[(summary.method == baseline) & ~summary.initno.astype(bool)]
        if len(base):
            ax.axhline(base[rate].iloc[0], **CHANCE_STYLE)
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(f"images with a subject {outcome}")
        ax.set_title(f"{outcome} (95% bootstrap CI)", fontsize=9)
        sns.despine(ax=ax)
    if len(initnos) > 1:
        axes[0, 0].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def overlap_vs_outcome(summary: pd.DataFrame, outcomes=("missing",), metric: str = "soft_iou_t10",
                       skip: Sequence[str] = ("overlap methods (pooled)",)):
    """Per outcome a panel: mean overlap early in denoising vs the outcome's rate, one point per (method, initno)
    with its interval. If lowering overlap lowers the failure, the points rise from left to right.

    Colour is the method, the marker seed noise vs INITNO; rows whose method is in ``skip`` (averages of the
    others) are left out.
    """
    summary = summary[~summary.method.isin(skip)]
    methods = list(dict.fromkeys(summary.method))
    colours = dict(zip(methods, sns.color_palette(PALETTE, len(methods))))
    fig, axes = plt.subplots(1, len(outcomes), squeeze=False, sharex=True, figsize=(4.2 * len(outcomes) + 1.6, 3.6))
    for ax, outcome in zip(axes[0], outcomes):
        rate = f"{outcome}_rate"
        for _, row in summary.iterrows():
            ax.errorbar(row[metric], row[rate],
                        yerr=_error(row.to_frame().T, rate, f"{outcome}_ci_low", f"{outcome}_ci_high"),
                        fmt=INITNO_MARKERS.get(bool(row.initno), "o"), ms=6, capsize=3, color=colours[row.method])
        ax.set_xlabel(f"mean {metric.removesuffix('_t10').replace('_', ' ')} at step 10 of 50 (scaled)")
        ax.set_ylabel(f"images with a subject {outcome}")
        ax.set_ylim(-0.02, 1.02)
        sns.despine(ax=ax)
    handles = [plt.Line2D([], [], color=colours[m], marker="o", ls="", label=m) for m in methods]
    handles += [plt.Line2D([], [], color="black", marker=INITNO_MARKERS[k], ls="", label=label)
                for k, label in INITNO_LABELS.items() if k in set(summary.initno.astype(bool))]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    return fig


def edit_success(summary: pd.DataFrame):
    """Editing: success rate (with interval) and structure IoU per injected fraction of the steps; one line per
    injection × layer set, rows edit kinds, columns metric × origin; the dashed line is no injection."""
    edits = list(dict.fromkeys(summary.edit))
    origins = list(dict.fromkeys(summary.origin))
    metrics = (("success_rate", "success rate"), ("iou", "structure IoU"))
    panels = [(m, o) for m in metrics for o in origins]
    injected = summary[summary.inject != "none"]
    lines = list(dict.fromkeys(zip(injected.inject, injected.layer_set)))
    colours = dict(zip(lines, sns.color_palette(PALETTE, max(len(lines), 1))))
    fig, axes = plt.subplots(max(len(edits), 1), max(len(panels), 1), squeeze=False, sharey=True,
                             figsize=(2.8 * max(len(panels), 1), 2.4 * max(len(edits), 1) + 0.4))
    for row, edit in enumerate(edits):
        for col, ((metric, label), origin) in enumerate(panels):
            ax = axes[row, col]
            part = summary[(summary.edit == edit) & (summary.origin == origin)]
            for inject, layer_set in lines:
                sub = part[(part.inject == inject) & (part.layer_set == layer_set)].sort_values("fraction")
                yerr = (_error(sub, metric, "success_ci_low", "success_ci_high") if metric == "success_rate"
                        else None)
                ax.errorbar(sub.fraction, sub[metric], yerr=yerr, marker="o", ms=3, lw=1, capsize=2,
                            color=colours[inject, layer_set],
                            label=f"{inject} · {layer_set}" if row == col == 0 else None)
            none = part[part.inject == "none"]
            if len(none):
                ax.axhline(none[metric].iloc[0], **CHANCE_STYLE, label="none" if row == col == 0 else None)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlim(0, 1.05)
            ax.set_title(f"{edit} · {origin} · {label}", fontsize=8)
            if row == len(edits) - 1:
                ax.set_xlabel("injected fraction of steps")
            sns.despine(ax=ax)
    if lines:
        fig.legend(loc="upper center", ncol=min(len(lines) + 1, 4), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    return fig


def image_row(images: dict, title: str | None = None, size: float = 2.2):
    """Images side by side, each titled with its key (e.g. method → image). PIL images or H×W×3 arrays."""
    fig, axes = plt.subplots(1, max(len(images), 1), squeeze=False, figsize=(size * max(len(images), 1), size + 0.4))
    for ax, (name, image) in zip(axes[0], images.items()):
        ax.imshow(np.asarray(image))
        ax.set_title(str(name), fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def arm_outcomes(summary: pd.DataFrame, categories=("all_present", "missing", "mixed"), title: str = ""):
    """Each arm's outcome rates side by side (95% interval over object sets), one row per arm in the table's order:
    the timing and factorial experiments, whose arms are not points on one dose axis."""
    colours = dict(zip(categories, sns.color_palette(PALETTE, len(categories))))
    fig, ax = plt.subplots(figsize=(5.6, 0.45 * len(summary) + 1.4))
    ys = np.arange(len(summary))[::-1]
    for k, c in enumerate(categories):
        rate = f"{c}_rate"
        ax.errorbar(summary[rate], ys + (k - 1) * 0.22, xerr=_error(summary, rate, f"{c}_ci_low", f"{c}_ci_high"),
                    fmt="o", ms=5, capsize=3, color=colours[c], label=c.replace("_", " "))
    ax.set_yticks(ys, summary.arm)
    ax.set_xlabel("share of images")
    ax.set_xlim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    sns.despine(ax=ax)
    fig.tight_layout()
    return fig


def dose_response(summary: pd.DataFrame, categories=("all_present", "missing", "mixed")):
    """The intervention study: each outcome's rate (95% interval over object sets) against the soft IoU the arm
    achieved at the intervened layers and steps, one point per arm; a causal dose–response reads left to right."""
    colours = dict(zip(categories, sns.color_palette(PALETTE, len(categories))))
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    dosed = summary[summary.dose.notna()].sort_values("iou_after")
    for c in categories:
        rate = f"{c}_rate"
        ax.errorbar(dosed.iou_after, dosed[rate], yerr=_error(dosed, rate, f"{c}_ci_low", f"{c}_ci_high"),
                    fmt="o-", ms=5, lw=1.2, capsize=3, color=colours[c], label=c.replace("_", " "))
        for name, marker in (("none", "s"), ("sham", "D")):
            arm = summary[summary.arm == name]
            if len(arm):
                ax.errorbar(arm.iou_after, arm[rate], yerr=_error(arm, rate, f"{c}_ci_low", f"{c}_ci_high"),
                            fmt=marker, mfc="none", ms=7, capsize=3, color=colours[c])
    ax.set_xlabel("achieved soft IoU of the two subjects' maps (intervened layers and steps)")
    ax.set_ylabel("share of images")
    ax.set_ylim(-0.02, 1.02)
    handles, labels = ax.get_legend_handles_labels()
    handles += [plt.Line2D([], [], color="grey", marker=m, mfc="none", ls="", label=n)
                for n, m in (("none", "s"), ("sham", "D"))]
    ax.legend(handles=handles, fontsize=8, frameon=False, loc="upper right")
    sns.despine(ax=ax)
    fig.tight_layout()
    return fig
