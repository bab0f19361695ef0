"""Figures for the evaluation report (matplotlib, Agg backend; each function writes one PNG).

- `plot_routing`: grouped bars (x: token domain, bars: experts) and a domain × expert heatmap of
  the layer-averaged routing metric (the paper's Figures 4/5);
- `plot_routing_layers`: the same heatmap for every MoE layer;
- `plot_embedding_similarity`: domain vs projected expert embedding cosine similarities (Figure 8);
- `plot_perplexity`: held-out perplexity per domain, one bar per model;
- `plot_curves`: mean ± spread curves, one panel per quantity (e.g. perplexity vs finetuning budget).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from nexus.evaluation.embeddings import EmbeddingGeometry
from nexus.evaluation.routing import METRICS, RoutingAnalysis

plt.rcParams.update({"font.size": 11, "axes.titlesize": 13, "axes.labelsize": 12, "figure.dpi": 110})


def _heatmap(
    fig,
    ax,
    matrix: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    title: str,
    xlabel: str,
    ylabel: str,
    vmin: float,
    vmax: float,
    cmap: str,
    cbar_label: str,
) -> None:
    """Annotated heatmap with tick labels and its own colour bar."""
    image = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    for (i, j), value in np.ndenumerate(matrix):
        red, green, blue, _ = image.cmap(image.norm(value))
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # text colour from the cell's luminance
        ax.text(
            j, i, f"{value:.2f}", ha="center", va="center", fontsize=9, color="white" if dark else "black"
        )
    fig.colorbar(image, ax=ax, label=cbar_label, fraction=0.046, pad=0.04)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _grouped_bars(ax, values: np.ndarray, groups: Sequence[str], series: Sequence[str]) -> None:
    """values: (groups, series); one bar per series inside each group, with a legend."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for j, name in enumerate(series):
        ax.bar(x + (j - (len(series) - 1) / 2) * width, values[:, j], width, label=name)
    ax.set_xticks(x, groups, rotation=20, ha="right")
    ax.grid(axis="y", alpha=0.3)


def plot_routing(
    analysis: RoutingAnalysis, path: str | Path, metric: str = "top1_share", title: str = "Routing per domain"
) -> Path:
    """Layer-averaged `metric` ("top1_share" or "mean_prob") as grouped bars and as a heatmap."""
    values, label = analysis.layer_mean(metric), METRICS[metric]
    fig, (bars, heat) = plt.subplots(
        1, 2, figsize=(6 + 1.6 * len(analysis.domains), 4.8), gridspec_kw={"width_ratios": [1.3, 1]}
    )
    _grouped_bars(bars, values, analysis.domains, analysis.experts)
    bars.set(
        ylim=(0, 1),
        xlabel="token domain (held-out data)",
        ylabel=label,
        title=f"{label}, mean over {analysis.mean_prob.shape[0]} layers",
    )
    bars.legend(title="expert", fontsize=9, title_fontsize=10)
    _heatmap(
        fig,
        heat,
        values,
        analysis.domains,
        analysis.experts,
        "domain × expert",
        "expert",
        "token domain",
        0.0,
        1.0,
        "viridis",
        label,
    )
    fig.suptitle(title)
    return _save(fig, path)


def plot_routing_layers(
    analysis: RoutingAnalysis, path: str | Path, metric: str = "top1_share", title: str = "Routing per layer"
) -> Path:
    """One domain × expert heatmap of `metric` per MoE layer."""
    data, label = getattr(analysis, metric), METRICS[metric]
    n = data.shape[0]
    fig, axes = plt.subplots(
        1,
        n,
        figsize=(1.2 + (2.2 + 0.9 * len(analysis.experts)) * n, 1.8 + 0.6 * len(analysis.domains)),
        squeeze=False,
    )
    for layer, ax in enumerate(axes[0]):
        _heatmap(
            fig,
            ax,
            data[layer],
            analysis.domains,
            analysis.experts,
            f"layer {layer}",
            "expert",
            "token domain" if layer == 0 else "",
            0.0,
            1.0,
            "viridis",
            label,
        )
    fig.suptitle(f"{title}: {label}")
    return _save(fig, path)


def plot_embedding_similarity(
    geometry: EmbeddingGeometry, path: str | Path, title: str = "Domain vs expert embeddings"
) -> Path:
    """Side-by-side cosine-similarity heatmaps: domain embeddings, projected expert embeddings."""
    size = 2.5 + 0.7 * len(geometry.names)
    fig, (left, right) = plt.subplots(1, 2, figsize=(2 * size + 1.5, size))
    _heatmap(
        fig,
        left,
        geometry.domain_similarity,
        geometry.names,
        geometry.names,
        "domain embeddings $d_i$",
        "domain",
        "domain",
        -1.0,
        1.0,
        "RdBu_r",
        "cosine similarity",
    )
    _heatmap(
        fig,
        right,
        geometry.expert_similarity,
        geometry.names,
        geometry.names,
        f"expert embeddings $e_i = P_r(d_i)$, block {geometry.layer}",
        "expert",
        "expert",
        -1.0,
        1.0,
        "RdBu_r",
        "cosine similarity",
    )
    fig.suptitle(title)
    return _save(fig, path)


def plot_perplexity(
    table: Mapping[str, Mapping[str, float]],
    path: str | Path,
    title: str = "Held-out perplexity per domain (lower is better)",
    ylabel: str = "perplexity",
) -> Path:
    """table: {model: {domain: value}}; grouped bars, one group per domain."""
    models = list(table)
    domains = list(dict.fromkeys(d for m in models for d in table[m]))
    values = np.array([[table[m].get(d, np.nan) for m in models] for d in domains], dtype=float)
    fig, ax = plt.subplots(figsize=(3 + 0.5 * len(models) * len(domains), 4.5))
    _grouped_bars(ax, values, domains, models)
    ax.set(xlabel="held-out domain", ylabel=ylabel, title=title)
    ax.legend(title="model", fontsize=9, title_fontsize=10)
    return _save(fig, path)


def plot_curves(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]]],
    path: str | Path,
    xlabel: str,
    ylabels: Mapping[str, str],
    title: str = "",
    references: Mapping[str, Mapping[str, float]] | None = None,
    reference_label: str = "{} (reference)",
) -> Path:
    """panels: {panel title: {series: (x, mean, spread)}}: one line with error bars per series;
    `references`: {panel title: {series: y}}, a dashed horizontal line in that series' colour,
    labelled `reference_label.format(series)`."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for i, (label, (x, mean, spread)) in enumerate(series.items()):
            ax.errorbar(x, mean, yerr=spread, marker="o", capsize=4, label=label, color=f"C{i}")
            if label in (references or {}).get(name, {}):
                ax.axhline(
                    references[name][label],
                    linestyle="--",
                    color=f"C{i}",
                    label=reference_label.format(label),
                )
        ax.set(title=name, xlabel=xlabel, ylabel=ylabels[name])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
