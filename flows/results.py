"""Tables and figures of a `reproduce_paper` run: `write_results(results, out_dir)` writes
`results.md` (mean ± standard deviation over the replicate seeds) and its PNGs under `figures/`.

Perplexities are held-out (the test split); a domain average is the mean of the per-domain
perplexities; a relative gain of A over B is `(ppl_B − ppl_A) / ppl_B`, computed per seed, then
averaged (positive: A is better).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BASELINES = ("seed", "seed continued", "dense merge", "moe:linear")
MODELS = (*BASELINES, "moe:nexus")


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    arr = np.asarray(list(values), dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def fmt(values: Iterable[float], digits: int = 1, percent: bool = False) -> str:
    mean, std = mean_std(values)
    scale, unit = (100.0, " %") if percent else (1.0, "")
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}{unit}"


def gain(ppl: float, baseline: float) -> float:
    """Relative improvement of `ppl` over `baseline` (positive: lower perplexity)."""
    return (baseline - ppl) / baseline


def average(ppl: Mapping[str, float], domains: Sequence[str]) -> float:
    return float(np.mean([ppl[d] for d in domains]))


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


class Replicates:
    """Accessors over `results["replicates"]` (one entry per seed)."""

    def __init__(self, results: Mapping[str, Any]) -> None:
        self.results = results
        self.runs = [results["replicates"][str(s)] for s in results["seeds"] if str(s) in results["replicates"]]
        first = self.runs[0]["pipeline"]
        self.domains: list[str] = list(first["domains"])
        self.models = [m for m in MODELS if m in first["perplexity"]]
        self.routers = [m.removeprefix("moe:") for m in self.models if m.startswith("moe:")]
        self.budgets: list[int] = list(results["budgets"])
        self.mid_budget = self.budgets[len(self.budgets) // 2]  # where the finetuning-mix ablation runs
        self.new: str = results["domain"]

    def ppl(self, model: str) -> list[dict[str, float]]:
        """Per seed: {domain: perplexity, "average": mean over the initial domains}."""
        out = []
        for run in self.runs:
            table = run["pipeline"]["perplexity"]
            row = ({d: table[f"expert:{d}"][d] for d in self.domains} if model == "expert (own domain)"
                   else dict(table[model]))
            out.append({**row, "average": average(row, self.domains)})
        return out

    def extension(self, router: str, steps: int, model: str = "after") -> list[dict[str, float]]:
        return [run["extensions"][f"{router}/{steps}"]["perplexity"][model] for run in self.runs]


def main_table(rep: Replicates) -> list[str]:
    cols = [*rep.domains, "average"]
    rows = [[f"`{m}`", *(fmt(r[c] for r in rep.ppl(m)) for c in cols)]
            for m in (*rep.models[:-2], "expert (own domain)", *rep.models[-2:])]
    return _table(["model", *cols], rows)


def gains_table(rep: Replicates) -> list[str]:
    cols = [*rep.domains, "average"]
    nexus = rep.ppl("moe:nexus")
    rows = []
    for base in [m for m in BASELINES if m in rep.models]:
        other = rep.ppl(base)
        rows.append([f"vs `{base}`", *(fmt((gain(a[c], b[c]) for a, b in zip(nexus, other)), 1, True) for c in cols)])
    return _table(["Nexus MoE", *cols], rows)


def extension_rows(rep: Replicates) -> tuple[list[str], dict]:
    """Table of the new domain's and the old domains' perplexity per budget, and the curves."""
    tokens = rep.results.get("tokens_per_step", 1)
    curves: dict[str, dict] = {f"new domain `{rep.new}`": {}, "initial domains (average)": {}}
    rows = []
    for router in rep.routers:
        points = [(0, rep.extension(router, rep.budgets[0], "appended"))]
        points += [(steps, rep.extension(router, steps)) for steps in rep.budgets]
        before = [average(p, rep.domains) for p in rep.extension(router, rep.budgets[0], "before")]
        for steps, per_seed in points:
            old = [average(p, rep.domains) for p in per_seed]
            rows.append([router, steps, f"{steps * tokens / 1000:.0f}k", fmt(p[rep.new] for p in per_seed),
                         fmt(old), fmt((gain(o, b) for o, b in zip(old, before)), 1, True)])
        x = [s * tokens / 1000 for s, _ in points]
        for panel, value in zip(curves, (lambda p: p[rep.new], lambda p: average(p, rep.domains))):
            stats = [mean_std(value(p) for p in per_seed) for _, per_seed in points]
            curves[panel][router] = (x, [m for m, _ in stats], [s for _, s in stats])
    header = ["router", "finetune steps", "tokens", f"`{rep.new}` ppl", "initial domains avg ppl",
              "initial domains: gain over the MoE before the extension"]
    return _table(header, rows), curves


def extension_gains(rep: Replicates) -> list[str]:
    if not {"nexus", "linear"} <= set(rep.routers):
        return []
    rows = []
    for steps in ["appended", *rep.budgets]:
        model, budget = ("appended", rep.budgets[0]) if steps == "appended" else ("after", steps)
        pairs = list(zip(rep.extension("nexus", budget, model), rep.extension("linear", budget, model)))
        rows.append([steps if steps != "appended" else "0 (appended)",
                     fmt((gain(n[rep.new], lin[rep.new]) for n, lin in pairs), 1, True),
                     fmt((gain(average(n, rep.domains), average(lin, rep.domains)) for n, lin in pairs), 1, True)])
    return _table(["finetune steps", f"Nexus vs linear on `{rep.new}`", "Nexus vs linear, initial domains avg"], rows)


def routing_table(rep: Replicates) -> list[str]:
    """Own-domain expert's top-1 share per domain (paper Fig. 4), and the new expert's share of the
    new domain's tokens after each extension (Fig. 5)."""
    from nexus.evaluation.routing import RoutingAnalysis

    rows = []
    for router in rep.routers:
        shares = [RoutingAnalysis.from_dict(run["pipeline"]["routing_analysis"][f"moe:{router}"]).own_expert_share()
                  for run in rep.runs]
        rows.append([f"`moe:{router}`", *(fmt((s[d] for s in shares), 2) for d in rep.domains), "–"])
        for steps in [0, *rep.budgets]:
            key, model = (f"{router}/{rep.budgets[0]}", "appended") if steps == 0 else (f"{router}/{steps}", "after")
            ext = [RoutingAnalysis.from_dict(run["extensions"][key]["routing_analysis"][model]).own_expert_share()
                   for run in rep.runs]
            rows.append([f"`moe:{router}` + `{rep.new}`, {steps} steps", *(fmt((s[d] for s in ext), 2) for d in rep.domains),
                         fmt((s[rep.new] for s in ext), 2)])
    return _table(["model", *rep.domains, rep.new], rows)


def ablation_table(results: Mapping[str, Any], rep: Replicates) -> list[str]:
    from nexus.evaluation.routing import RoutingAnalysis

    seeds = [s for s in results["ablations"]]
    if not seeds:
        return []

    def stats(source: Callable[[str], dict], router: str) -> tuple[list[float], list[float]]:
        avg = [average(source(s)["perplexity"][f"moe:{router}"], rep.domains) for s in seeds]
        own = [float(np.mean(list(RoutingAnalysis.from_dict(source(s)["routing_analysis"][f"moe:{router}"])
                                   .own_expert_share().values()))) for s in seeds]
        return avg, own

    variants: dict[str, Callable[[str], dict]] = {
        "default (0.05, proportional)": lambda s: results["replicates"][s]["pipeline"]}
    for name in results["ablations"][seeds[0]]:
        variants[name] = lambda s, name=name: results["ablations"][s][name]
    rows = []
    for name, source in variants.items():
        nexus_avg, nexus_own = stats(source, "nexus")
        linear_avg, linear_own = stats(source, "linear")
        rows.append([name, fmt(nexus_avg), fmt(linear_avg), fmt((gain(n, lin) for n, lin in zip(nexus_avg, linear_avg)), 1, True),
                     fmt(nexus_own, 2), fmt(linear_own, 2)])
    return _table(["MoE stage", "Nexus avg ppl", "linear avg ppl", "Nexus vs linear", "Nexus own-domain share",
                   "linear own-domain share"], rows)


def extension_ablation_table(results: Mapping[str, Any], rep: Replicates) -> list[str]:
    """The finetuning mix at the middle budget: the replicate's default (new share 0.5) vs the ablations."""
    ablations = results.get("extension_ablations", {})
    seeds = list(ablations)
    if not seeds:
        return []
    variants: dict[str, Callable[[str, str], dict]] = {
        "new share 0.5 (default)": lambda s, router: results["replicates"][s]["extensions"][f"{router}/{rep.mid_budget}"]}
    for name in ablations[seeds[0]]:
        variants[name] = lambda s, router, name=name: ablations[s][name][router]
    rows = []
    for name, source in variants.items():
        row = [name]
        for router in rep.routers:
            after = [source(s, router)["perplexity"]["after"] for s in seeds]
            before = [average(source(s, router)["perplexity"]["before"], rep.domains) for s in seeds]
            old = [average(p, rep.domains) for p in after]
            row += [fmt(p[rep.new] for p in after), fmt(old), fmt((gain(o, b) for o, b in zip(old, before)), 1, True)]
        rows.append(row)
    header = ["finetuning mix", *(f"{r}: {c}" for r in rep.routers for c in
                                  (f"`{rep.new}` ppl", "initial avg ppl", "initial vs before"))]
    return _table(header, rows)


def write_results(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write `results.md` and `figures/*.png` for a `reproduce_paper` result; returns their paths."""
    from nexus.evaluation.embeddings import EmbeddingGeometry
    from nexus.evaluation.plots import plot_curves, plot_embedding_similarity, plot_perplexity, plot_routing
    from nexus.evaluation.routing import RoutingAnalysis
    from nexus.io import atomic_write_text

    out, rep = Path(out_dir), Replicates(results)
    fig = out / "figures"
    first = rep.runs[0]
    seeds = ", ".join(str(s) for s in results["seeds"] if str(s) in results["replicates"])
    paths = {"perplexity": plot_perplexity({m: mean_std_row(rep.ppl(m)) for m in rep.models}, fig / "perplexity.png",
                                           f"Held-out perplexity, mean over seeds {seeds} (lower is better)")}
    table, curves = extension_rows(rep)
    before = {panel: {} for panel in curves}
    for router in rep.routers:
        old = [average(p, rep.domains) for p in rep.extension(router, rep.budgets[0], "before")]
        before["initial domains (average)"][router] = mean_std(old)[0]
    paths["extension"] = plot_curves(curves, fig / "extension_curves.png", "finetuning tokens (thousands)",
                                     {p: "held-out perplexity" for p in curves},
                                     f"Extension with `{rep.new}`: mean ± std over seeds {seeds}", before,
                                     "{} MoE before the extension")
    for router in rep.routers:
        paths[f"routing_{router}"] = plot_routing(
            RoutingAnalysis.from_dict(first["pipeline"]["routing_analysis"][f"moe:{router}"]),
            fig / f"routing_{router}.png", title=f"moe:{router} (seed {results['seeds'][0]}): top-1 routing share")
        ext = first["extensions"][f"{router}/{rep.budgets[-1]}"]["routing_analysis"]["after"]
        paths[f"routing_{router}_extended"] = plot_routing(
            RoutingAnalysis.from_dict(ext), fig / f"routing_{router}_extended.png",
            title=f"moe:{router} + {rep.new}, {rep.budgets[-1]} finetune steps: top-1 routing share")
    # Fig. 8 with the new domain: the Nexus MoE right after `rep.new`'s expert is appended
    appended = first["extensions"].get(f"nexus/{rep.budgets[0]}", {}).get("embeddings", {}).get("appended")
    if appended:
        paths["embeddings"] = plot_embedding_similarity(
            EmbeddingGeometry.from_dict(appended), fig / "embeddings.png",
            f"Domain embeddings d_i vs expert embeddings e_i (cosine): moe:nexus + {rep.new}, "
            f"appended (seed {results['seeds'][0]})")

    lines = [f"# Results: `{results['experiment']}`, seeds {seeds}", "",
             f"Regenerate: `{command(results)}`.", "",
             f"Wall time {results.get('seconds', 0) / 60:.1f} min; per replicate "
             + ", ".join(f"seed {s}: {r['seconds'] / 60:.1f} min" for s, r in results["replicates"].items()) + ".",
             "Every cell: mean ± standard deviation over the seeds. Perplexity on the held-out test split.", "",
             "## Held-out perplexity after upcycling", "", *main_table(rep), "",
             f"![perplexity]({paths['perplexity'].relative_to(out)})", "",
             "## Relative gain of the Nexus MoE (positive: Nexus has the lower perplexity)", "", *gains_table(rep), "",
             f"## Extension with `{rep.new}`", "",
             "Step 0 is the MoE right after the new expert is appended (no finetuning).", "", *table, "",
             *extension_gains(rep), "", f"![extension]({paths['extension'].relative_to(out)})", "",
             "## Routing: top-1 share of the own-domain expert (layer mean)", "", *routing_table(rep), ""]
    lines += [f"![{k}]({p.relative_to(out)})" for k, p in paths.items() if k.startswith(("routing", "embeddings"))]
    ablations = ablation_table(results, rep)
    if ablations:
        lines += ["", f"## Ablations of the MoE stage (seeds {', '.join(results['ablations'])})", "", *ablations]
    mixes = extension_ablation_table(results, rep)
    if mixes:
        seeds_run = ", ".join(results["extension_ablations"])
        lines += ["", f"## Ablation of the extension's finetuning mix ({rep.mid_budget} steps, seeds {seeds_run})",
                  "", *mixes]
    paths["markdown"] = out / "results.md"
    atomic_write_text(paths["markdown"], "\n".join(lines) + "\n")
    return paths


def command(results: Mapping[str, Any]) -> str:
    """The `python -m flows.reproduce` command line that produces `results`."""
    ablations = " ".join(map(str, results["ablations"])) if results["ablations"] else ""
    return " ".join(["python -m flows.reproduce", f"--experiment {results['experiment']}",
                     "--seeds", *map(str, results["seeds"]), "--budgets", *map(str, results["budgets"]),
                     f"--ablation-seeds {ablations}".rstrip(), *results["overrides"]])


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.results RESULTS_JSON [OUT_DIR]`: rewrite the tables and figures of a run."""
    return rewrite_main("flows.results", write_results, argv)


def rewrite_main(module: str, write: Callable[[Mapping[str, Any], Path], dict[str, Path]],
                 argv: list[str] | None = None) -> int:
    """`python -m <module> RESULTS_JSON [OUT_DIR]`: `write` the tables and figures of a run's JSON again
    (default OUT_DIR: `results/` next to it)."""
    import json
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(f"usage: python -m {module} RESULTS_JSON [OUT_DIR]", file=sys.stderr)
        return 2
    source = Path(args[0])
    paths = write(json.loads(source.read_text()), Path(args[1]) if len(args) > 1 else source.parent / "results")
    print(paths["markdown"])
    return 0


def mean_std_row(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {k: mean_std(r[k] for r in rows)[0] for k in rows[0]}


if __name__ == "__main__":
    raise SystemExit(main())
