"""The comparison report of one pipeline run: Markdown + HTML + PNG figures + results.json.

`write_report(results, out_dir)` takes plain data (what the flows collect):

    {
      "title": "Nexus demo",                                   # optional
      "metadata": {"run_id": ..., ...},                        # optional, shown as a list
      "perplexity": {model: {domain: {"perplexity": .., "bits_per_byte": ..} | float}},
      "baselines": {"linear": "moe-linear", "seed": "seed"},   # model names to compare against
      "extension": {"perplexity": {...}, "baselines": {...}, "note": "..."},   # optional, same shape
      "routing": {model: RoutingAnalysis | its to_dict()},     # optional
      "embeddings": {model: EmbeddingGeometry | its to_dict()},  # optional
      "lm_eval": {model: {task: {metric: value}}},             # optional
    }

Relative gain of model m over baseline b on a domain: `(ppl_b - ppl_m) / ppl_b` (positive = m
has the lower perplexity).
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nexus.evaluation.embeddings import EmbeddingGeometry
from nexus.evaluation.routing import METRICS, RoutingAnalysis

Block = tuple  # ("h2", text) | ("p", text) | ("table", rows) | ("img", relative path, caption)


def _slug(name: str) -> str:
    """A model name as a file-name part: `moe:nexus (after)` -> `moe-nexus-after`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


def _metric(table: Mapping[str, Mapping[str, Any]], key: str) -> dict[str, dict[str, float]]:
    """{model: {domain: value}} of `key` from per-domain dicts (or plain floats = perplexity)."""
    return {
        m: {
            d: float(v[key] if isinstance(v, Mapping) else (v if key == "perplexity" else math.nan))
            for d, v in row.items()
        }
        for m, row in table.items()
    }


def _with_mean(table: dict[str, dict[str, float]]) -> tuple[list[str], dict[str, dict[str, float]]]:
    domains = list(dict.fromkeys(d for row in table.values() for d in row))
    out = {
        m: {**row, "mean": sum(row.get(d, math.nan) for d in domains) / len(domains)}
        for m, row in table.items()
    }
    return [*domains, "mean"], out


def _value_rows(table: dict[str, dict[str, float]], add_mean: bool = True) -> list[list[Any]]:
    """Header + one row per model; the columns are the domains (and their mean)."""
    columns, with_mean = _with_mean(table)
    if add_mean:
        table = with_mean
    else:
        columns = list(dict.fromkeys(c for row in table.values() for c in row))
    return [["model", *columns]] + [[m, *(table[m].get(c, math.nan) for c in columns)] for m in table]


def relative_gains(ppl: Mapping[str, Mapping[str, float]], baseline: str) -> dict[str, dict[str, float]]:
    """{model: {domain: % lower perplexity than `baseline`}} for the other models; "mean" compares
    the mean perplexities over domains."""
    _, ppl = _with_mean({m: dict(r) for m, r in ppl.items()})
    base = ppl[baseline]
    return {
        m: {d: 100 * (base[d] - v) / base[d] for d, v in row.items() if d in base}
        for m, row in ppl.items()
        if m != baseline
    }


def _perplexity_blocks(section: Mapping[str, Any], heading: str) -> list[Block]:
    ppl = _metric(section["perplexity"], "perplexity")
    blocks: list[Block] = [
        ("h2", heading),
        ("p", ("Held-out perplexity (lower is better; `mean` is the arithmetic mean over domains).")),
        ("table", _value_rows(ppl)),
    ]
    bpb = _metric(section["perplexity"], "bits_per_byte")
    if any(not math.isnan(v) for row in bpb.values() for v in row.values()):
        blocks += [("p", "Bits per byte (tokenizer-independent)."), ("table", _value_rows(bpb))]
    for role, name in (section.get("baselines") or {}).items():
        if name in ppl:
            blocks += [
                ("p", f"Relative gain vs {role} baseline `{name}`, % lower perplexity (positive = better)."),
                ("table", _value_rows(relative_gains(ppl, name), add_mean=False)),
            ]
    if section.get("note"):
        blocks.append(("p", section["note"]))
    return blocks


def _routing_blocks(routing: Mapping[str, Any], figures: Path) -> list[Block]:
    from nexus.evaluation.plots import plot_routing, plot_routing_layers

    blocks: list[Block] = [("h2", "Routing specialization")]
    for model, data in routing.items():
        analysis = data if isinstance(data, RoutingAnalysis) else RoutingAnalysis.from_dict(data)
        blocks.append(("h3", f"`{model}`"))
        for metric, label in METRICS.items():
            png = plot_routing(
                analysis, figures / f"routing_{_slug(model)}_{metric}.png", metric, f"{model}: {label}"
            )
            blocks += [
                (
                    "p",
                    (
                        f"{label.capitalize()} per expert (columns) for each domain's held-out tokens "
                        "(rows), averaged over layers."
                    ),
                ),
                ("table", [[_fmt(c) for c in row] for row in analysis.table(metric)]),
                ("img", f"figures/{png.name}", f"{model}: {label}"),
            ]
        png = plot_routing_layers(
            analysis, figures / f"routing_{_slug(model)}_layers.png", "top1_share", model
        )
        blocks.append(("img", f"figures/{png.name}", f"{model}: top-1 share per layer"))
    return blocks


def _embedding_blocks(embeddings: Mapping[str, Any], figures: Path) -> list[Block]:
    from nexus.evaluation.plots import plot_embedding_similarity

    blocks: list[Block] = [("h2", "Domain and expert embeddings")]
    for model, data in embeddings.items():
        geometry = data if isinstance(data, EmbeddingGeometry) else EmbeddingGeometry.from_dict(data)
        png = plot_embedding_similarity(
            geometry, figures / f"embeddings_{_slug(model)}.png", f"{model}: cosine similarity"
        )
        off = geometry.mean_off_diagonal()
        blocks += [
            (
                "p",
                (
                    f"`{model}`: mean off-diagonal cosine similarity, domains {off['domain']:.3f}, "
                    f"experts (block {geometry.layer}) {off['expert']:.3f}."
                ),
            ),
            ("img", f"figures/{png.name}", f"{model}: domain vs expert embeddings"),
        ]
    return blocks


def _lm_eval_blocks(lm_eval: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[Block]:
    keys = list(dict.fromkeys((t, m) for tasks in lm_eval.values() for t, ms in tasks.items() for m in ms))
    rows = [["model", *(f"{t} {m}" for t, m in keys)]]
    rows += [
        [model, *(tasks.get(t, {}).get(m, math.nan) for t, m in keys)] for model, tasks in lm_eval.items()
    ]
    return [("h2", "lm-eval"), ("table", rows)]


def _markdown(blocks: list[Block]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {rest[0]}\n")
        elif kind == "p":
            out.append(f"{rest[0]}\n")
        elif kind == "table":
            rows = [[_fmt(c) for c in row] for row in rest[0]]
            out.append(
                "\n".join(
                    [
                        "| " + " | ".join(rows[0]) + " |",
                        "|" + "---|" * len(rows[0]),
                        *("| " + " | ".join(r) + " |" for r in rows[1:]),
                    ]
                )
                + "\n"
            )
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})\n")
    return "\n".join(out)


def _html(blocks: list[Block], title: str) -> str:
    def inline(text: str) -> str:  # `code` spans, the only Markdown the paragraphs use
        parts = html.escape(text).split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3", "p"):
            body.append(f"<{kind}>{inline(rest[0])}</{kind}>")
        elif kind == "table":
            rows = [[html.escape(_fmt(c)) for c in row] for row in rest[0]]
            head = "".join(f"<th>{c}</th>" for c in rows[0])
            cells = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif kind == "img":
            body.append(
                f'<figure><img src="{html.escape(rest[0])}" alt="{html.escape(rest[1])}">'
                f"<figcaption>{html.escape(rest[1])}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.html, results.json and figures/*.png into `out_dir`; returns
    {"markdown", "html", "json", "figures/<name>": path, ...}."""
    from nexus.evaluation.plots import plot_perplexity

    out = Path(out_dir)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    title = results.get("title", "Nexus evaluation report")
    blocks: list[Block] = [("h1", title)]
    blocks += [("p", f"- {k}: `{v}`") for k, v in (results.get("metadata") or {}).items()]
    if results.get("perplexity"):
        blocks += _perplexity_blocks(results, "Held-out perplexity")
        png = plot_perplexity(_metric(results["perplexity"], "perplexity"), figures / "perplexity.png")
        blocks.append(("img", f"figures/{png.name}", "held-out perplexity per domain"))
    if results.get("extension"):
        blocks += _perplexity_blocks(results["extension"], "Extension: after adding the new expert")
    if results.get("routing"):
        blocks += _routing_blocks(results["routing"], figures)
    if results.get("embeddings"):
        blocks += _embedding_blocks(results["embeddings"], figures)
    if results.get("lm_eval"):
        blocks += _lm_eval_blocks(results["lm_eval"])

    paths = {"markdown": out / "report.md", "html": out / "report.html", "json": out / "results.json"}
    paths["markdown"].write_text(_markdown(blocks))
    paths["html"].write_text(_html(blocks, title))
    paths["json"].write_text(json.dumps(results, indent=1, default=_jsonable))
    paths.update({f"figures/{p.name}": p for p in sorted(figures.glob("*.png"))})
    return paths


def _jsonable(obj: Any) -> Any:
    return obj.to_dict() if hasattr(obj, "to_dict") else str(obj)
