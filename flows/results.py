"""Tables and figures of a `reproduce_paper` run: `write_results(results, out_dir)` writes
`results.md` (mean ± standard deviation over the replicate seeds) and its PNGs under `figures/`.

Perplexities are held-out (the test split); a domain average is the mean of the per-domain
perplexities; a relative gain of A over B is `(ppl_B − ppl_A) / ppl_B`, computed per seed, then
averaged (positive: A is better). Of an extension: the initial domains' change is
`ppl_after / ppl_before − 1` (before: the MoE before the extension), `worst` the largest over the
initial domains; the gap closed on the new domain is `(ppl_before − ppl_after) / (ppl_before −
ppl_expert)` (expert: the new domain's dense expert; 1 = as good as the expert).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flows import names

NEXUS = names.moe("nexus")
BASELINES = (names.SEED, names.SEED_CONTINUED, names.DENSE_MERGE, names.moe("linear"))
MODELS = (*BASELINES, NEXUS)
OWN_DOMAIN = "expert (own domain)"
"""The row of each domain's own expert on its domain."""


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
        self.seeds = [str(s) for s in results["seeds"] if str(s) in results["replicates"]]
        self.runs = [results["replicates"][s] for s in self.seeds]
        first = self.runs[0]["pipeline"]
        self.domains: list[str] = list(first["domains"])
        self.models = [m for m in MODELS if m in first["perplexity"]]
        self.budgets: list[int] = list(results["budgets"])
        self.new_domains: list[str] = list(results["domains"])
        self.variants: list[str] = list(results["routers"])
        self.recipes: list[str] = list(results["recipes"])
        self.tokens_per_step: int = results.get("tokens_per_step", 1)

    def ppl(self, model: str) -> list[dict[str, float]]:
        """Per seed: {domain: perplexity, "average": mean over the initial domains}."""
        out = []
        for run in self.runs:
            table = run["pipeline"]["perplexity"]
            row = (
                {d: table[names.expert(d)][d] for d in self.domains}
                if model == OWN_DOMAIN
                else dict(table[model])
            )
            out.append({**row, "average": average(row, self.domains)})
        return out

    def extensions(self, domain: str, variant: str, recipe: str, budget: int) -> list[dict]:
        return [run["extensions"][f"{domain}/{variant}/{recipe}/{budget}"] for run in self.runs]


def initial_change(ext: Mapping[str, Any], model: str, domains: Sequence[str]) -> tuple[float, float]:
    """(average, worst) relative change of the initial domains' perplexity, `model` vs `before`."""
    ppl = ext["perplexity"]
    changes = [ppl[model][d] / ppl[names.BEFORE][d] - 1 for d in domains]
    return float(np.mean(changes)), float(max(changes))


def gap_closed(ext: Mapping[str, Any], model: str) -> float:
    new, ppl = ext["domain"], ext["perplexity"]
    before, expert = ppl[names.BEFORE][new], ppl[names.expert(new)][new]
    return (before - ppl[model][new]) / (before - expert) if before != expert else float("nan")


def new_expert_shares(ext: Mapping[str, Any], model: str) -> dict[str, float]:
    """The new expert's top-1 share (layer mean) of every domain's tokens."""
    from nexus.evaluation.routing import RoutingAnalysis

    routing = RoutingAnalysis.from_dict(ext["routing_analysis"][model])
    shares = routing.layer_mean("top1_share")[:, routing.experts.index(ext["domain"])]
    return dict(zip(routing.domains, shares.tolist()))


def divergence_summary(ext: Mapping[str, Any], model: str) -> tuple[float, float, float]:
    """(mean, median first divergent position, share of divergent tokens) over the earlier domains'
    prompts (a never-diverging prompt counts as the continuation length)."""
    from nexus.evaluation.divergence import Divergence

    parts = [Divergence.from_dict(v) for v in ext.get("divergence", {}).get(model, {}).values()]
    if not parts:
        return float("nan"), float("nan"), float("nan")
    pooled = Divergence(
        [f for p in parts for f in p.first], float(np.mean([p.share for p in parts])), parts[0].new_tokens
    )
    return pooled.mean_first, pooled.median_first, pooled.share


def _row_cells(rep: Replicates, exts: list[dict], model: str) -> list[str]:
    new = exts[0]["domain"]
    changes = [initial_change(e, model, rep.domains) for e in exts]
    shares = [new_expert_shares(e, model) for e in exts]
    others = [max(v for d, v in s.items() if d != new) for s in shares]
    fdt = [divergence_summary(e, model) for e in exts]
    return [
        fmt(e["perplexity"][model][new] for e in exts),
        fmt((gap_closed(e, model) for e in exts), 0, True),
        fmt((c[0] for c in changes), 1, True),
        fmt((c[1] for c in changes), 1, True),
        fmt((s[new] for s in shares), 2),
        fmt(others, 2),
        fmt((f[0] for f in fdt), 1),
        fmt((f[1] for f in fdt), 1),
        fmt((f[2] for f in fdt), 2),
    ]


EXTENSION_HEADER = [
    "new-domain ppl",
    "gap closed",
    "initial: avg change",
    "initial: worst",
    "new expert: own share",
    "new expert: largest other share",
    "FDT mean",
    "FDT median",
    "divergent share",
]


def extension_table(rep: Replicates, domain: str) -> list[str]:
    """Per router variant and recipe: right after appending (0 steps), then after each budget."""
    rows = []
    for variant in rep.variants:
        for recipe in rep.recipes:
            first = rep.extensions(domain, variant, recipe, rep.budgets[0])
            rows.append([variant, recipe, "0 (appended)", *_row_cells(rep, first, names.APPENDED)])
            for budget in rep.budgets:
                exts = rep.extensions(domain, variant, recipe, budget)
                rows.append(
                    [
                        variant,
                        recipe,
                        f"{budget} ({budget * rep.tokens_per_step:,})",
                        *_row_cells(rep, exts, names.AFTER),
                    ]
                )
    return _table(["router", "recipe", "finetune steps (tokens)", *EXTENSION_HEADER], rows)


def targets_table(rep: Replicates, default: str) -> list[str]:
    """The issue's acceptance targets, per new domain, for the default recipe at every budget."""
    rows = []
    for domain in rep.new_domains:
        for variant in rep.variants:
            for budget in rep.budgets:
                exts = rep.extensions(domain, variant, default, budget)
                worst = [initial_change(e, names.AFTER, rep.domains)[1] for e in exts]
                gaps = [gap_closed(e, names.AFTER) for e in exts]
                own = [new_expert_shares(e, names.AFTER)[domain] for e in exts]
                appended = [new_expert_shares(e, names.APPENDED) for e in exts]
                largest = [max(s, key=s.get) == domain for s in appended]
                rows.append(
                    [
                        domain,
                        variant,
                        budget,
                        _verdict(worst, lambda v: v <= 0.02, 1, True),
                        _verdict(gaps, lambda v: v >= 0.8, 0, True),
                        _verdict(own, lambda v: v >= 0.5, 2),
                        f"{sum(largest)}/{len(largest)} seeds",
                    ]
                )
    return _table(
        [
            "new domain",
            "router",
            "finetune steps",
            "initial domains within 2 % (worst)",
            "gap closed >= 80 %",
            "own share >= 0.50",
            "own domain largest right after appending",
        ],
        rows,
    )


def _verdict(values: list[float], ok: Callable[[float], bool], digits: int, percent: bool = False) -> str:
    mean = mean_std(values)[0]
    return f"{fmt(values, digits, percent)} ({'met' if ok(mean) else 'missed'})"


def router_gains_table(rep: Replicates) -> list[str]:
    """Nexus vs each linear variant on the new domain and on the initial domains (per recipe, budget)."""
    rows = []
    others = [v for v in rep.variants if v != "nexus"]
    for domain in rep.new_domains:
        for recipe in rep.recipes:
            for budget in rep.budgets:
                nexus = rep.extensions(domain, "nexus", recipe, budget)
                row = [domain, recipe, budget]
                for other in others:
                    base = rep.extensions(domain, other, recipe, budget)
                    row.append(
                        fmt(
                            (
                                gain(
                                    n["perplexity"][names.AFTER][domain], b["perplexity"][names.AFTER][domain]
                                )
                                for n, b in zip(nexus, base)
                            ),
                            1,
                            True,
                        )
                    )
                rows.append(row)
    return _table(
        ["new domain", "recipe", "finetune steps", *(f"Nexus vs {o} on the new domain" for o in others)], rows
    )


def precomputed_check(rep: Replicates) -> str:
    """How often the precomputed Nexus router's greedy output differed from the live router's."""
    checks = [
        d
        for run in rep.runs
        for e in run["extensions"].values()
        for d in e.get("divergence", {}).get("precomputed router", {}).values()
    ]
    diverged = sum(1 for d in checks for f in d["first"] if f is not None)
    prompts = sum(len(d["first"]) for d in checks)
    return (
        f"Precomputed vs live Nexus router (every Nexus MoE before an extension, {prompts} prompts): "
        f"{diverged} prompts diverged, divergent-token share "
        f"{max((d['share'] for d in checks), default=float('nan')):.3f} at most."
    )


def ablation_table(results: Mapping[str, Any], rep: Replicates) -> list[str]:
    """The `paper` recipe with one factor changed (seeds of `recipe_ablations`, smallest budget)."""
    ablations = results.get("recipe_ablations", {})
    seeds = list(ablations)
    if not seeds:
        return []
    budget = rep.budgets[0]
    recipes = [*(["paper (as is)"] if "paper" in rep.recipes else []), *ablations[seeds[0]]]
    rows = []
    for domain in rep.new_domains:
        for variant in rep.variants:
            for name in recipes:
                exts = (
                    [
                        results["replicates"][s]["extensions"][f"{domain}/{variant}/paper/{budget}"]
                        for s in seeds
                    ]
                    if name == "paper (as is)"
                    else [ablations[s][name][f"{domain}/{variant}"] for s in seeds]
                )
                rows.append([domain, variant, name, *_row_cells(rep, exts, names.AFTER)])
    return _table(["new domain", "router", "recipe", *EXTENSION_HEADER], rows)


def cosine_table(rep: Replicates) -> list[str]:
    """MiniLM cosine of every new domain's embedding with each initial domain's (from the run's files)."""
    from nexus.evaluation.embeddings import EmbeddingGeometry

    rows = []
    for domain in rep.new_domains:
        ext = rep.extensions(domain, "nexus", rep.recipes[0], rep.budgets[0])[0]
        geometry = EmbeddingGeometry.from_dict(ext["embeddings"][names.APPENDED])
        i = geometry.names.index(domain)
        rows.append(
            [domain, *(f"{geometry.domain_similarity[i][geometry.names.index(d)]:.2f}" for d in rep.domains)]
        )
    return _table(["new domain", *rep.domains], rows)


def main_table(rep: Replicates) -> list[str]:
    cols = [*rep.domains, "average"]
    rows = [
        [f"`{m}`", *(fmt(r[c] for r in rep.ppl(m)) for c in cols)]
        for m in (*rep.models[:-2], OWN_DOMAIN, *rep.models[-2:])
    ]
    return _table(["model", *cols], rows)


def gains_table(rep: Replicates) -> list[str]:
    cols = [*rep.domains, "average"]
    nexus = rep.ppl(NEXUS)
    rows = []
    for base in [m for m in BASELINES if m in rep.models]:
        other = rep.ppl(base)
        rows.append(
            [f"vs `{base}`", *(fmt((gain(a[c], b[c]) for a, b in zip(nexus, other)), 1, True) for c in cols)]
        )
    return _table(["Nexus MoE", *cols], rows)


def write_results(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write `results.md` and `figures/*.png` for a `reproduce_paper` result; returns their paths."""
    from nexus.evaluation.embeddings import EmbeddingGeometry
    from nexus.evaluation.plots import plot_embedding_similarity, plot_perplexity, plot_routing
    from nexus.evaluation.routing import RoutingAnalysis
    from nexus.io import atomic_write_text

    out, rep = Path(out_dir), Replicates(results)
    fig = out / "figures"
    seeds = ", ".join(rep.seeds)
    default = default_recipe(rep)
    paths = {
        "perplexity": plot_perplexity(
            {m: mean_std_row(rep.ppl(m)) for m in rep.models},
            fig / "perplexity.png",
            f"Held-out perplexity, mean over seeds {seeds} (lower is better)",
        )
    }
    for domain in rep.new_domains:
        ext = rep.extensions(domain, "nexus", default, rep.budgets[-1])[0]
        for model in (names.APPENDED, names.AFTER):
            paths[f"routing_{domain}_{model}"] = plot_routing(
                RoutingAnalysis.from_dict(ext["routing_analysis"][model]),
                fig / f"routing_nexus_{domain}_{model}.png",
                title=f"{NEXUS} + {domain} ({default}, "
                + (names.APPENDED if model == names.APPENDED else f"{rep.budgets[-1]} steps")
                + f", seed {rep.seeds[0]}): top-1 routing share",
            )
        paths[f"embeddings_{domain}"] = plot_embedding_similarity(
            EmbeddingGeometry.from_dict(ext["embeddings"][names.APPENDED]),
            fig / f"embeddings_{domain}.png",
            f"Domain vs expert embeddings (cosine): {NEXUS} + {domain}, appended (seed {rep.seeds[0]})",
        )
    steps = results.get("steps", {})
    lines = [
        f"# Results: `{results['experiment']}`, seeds {seeds}",
        "",
        f"Regenerate: `{command(results)}`.",
        "",
        f"Wall time {results.get('seconds', 0) / 60:.1f} min (seed model {results.get('seed_seconds', 0) / 60:.1f} "
        "min, 0 when cached); per replicate "
        + ", ".join(f"seed {s}: {r['seconds'] / 60:.1f} min" for s, r in results["replicates"].items())
        + ".",
        (
            f"Steps: seed {steps.get('seed')}, each expert {steps.get('expert')}, each MoE {steps.get('moe')}; "
            f"finetunes {', '.join(map(str, rep.budgets))} ({rep.tokens_per_step} tokens a step)."
        ),
        "Every cell: mean ± standard deviation over the seeds. Perplexity on the held-out test split.",
        "",
        "## Held-out perplexity after upcycling",
        "",
        *main_table(rep),
        "",
        f"![perplexity]({paths['perplexity'].relative_to(out)})",
        "",
        "## Relative gain of the Nexus MoE (positive: Nexus has the lower perplexity)",
        "",
        *gains_table(rep),
        "",
        "## New domains: MiniLM cosine with the initial domains",
        "",
        *cosine_table(rep),
        "",
    ]
    for domain in rep.new_domains:
        lines += [
            f"## Extension with `{domain}`",
            "",
            (
                "0 steps: right after appending. Shares: the new expert's top-1 share (layer mean); FDT: the "
                "position of the first divergent token (mean and median over prompts; a prompt that never "
                "diverges counts as the continuation's length) of the MoE's greedy continuations of the "
                "initial domains' held-out prompts against the MoE before the extension; divergent share: "
                "the share of generated tokens that differ."
            ),
            "",
            *extension_table(rep, domain),
            "",
        ]
    lines += [
        f"## Targets (recipe `{default}`)",
        "",
        *targets_table(rep, default),
        "",
        "## Nexus vs the linear router after the extension",
        "",
        *router_gains_table(rep),
        "",
        precomputed_check(rep),
        "",
    ]
    ablations = ablation_table(results, rep)
    if ablations:
        lines += [
            (
                f"## Recipe ablations (`paper` with one factor changed; {rep.budgets[0]} steps, seeds "
                f"{', '.join(results['recipe_ablations'])})"
            ),
            "",
            *ablations,
            "",
        ]
    lines += [f"![{k}]({p.relative_to(out)})" for k, p in paths.items() if k != "perplexity"]
    paths["markdown"] = out / "results.md"
    atomic_write_text(paths["markdown"], "\n".join(lines) + "\n")
    return paths


def default_recipe(rep: Replicates) -> str:
    """The product's default recipe (conf/config.yaml) if the run has it, else its last recipe."""
    from flows.config import compose

    name = compose(None, check=False).extension.recipe
    return name if name in rep.recipes else rep.recipes[-1]


def command(results: Mapping[str, Any]) -> str:
    """The `python -m flows.reproduce` command line that produces `results`."""
    ablations = " ".join(map(str, results["recipe_ablations"])) if results.get("recipe_ablations") else ""
    return " ".join(
        [
            "python -m flows.reproduce",
            f"--experiment {results['experiment']}",
            "--seeds",
            *map(str, results["seeds"]),
            "--budgets",
            *map(str, results["budgets"]),
            f"--ablation-seeds {ablations}".rstrip(),
            "--domains",
            *results["domains"],
            *results["overrides"],
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.results RESULTS_JSON [OUT_DIR]`: rewrite the tables and figures of a run."""
    return rewrite_main("flows.results", write_results, argv)


def rewrite_main(
    module: str, write: Callable[[Mapping[str, Any], Path], dict[str, Path]], argv: list[str] | None = None
) -> int:
    """`python -m <module> RESULTS_JSON [OUT_DIR]`: `write` the tables and figures of a run's JSON again
    (default OUT_DIR: `results/` next to it)."""
    import json
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(f"usage: python -m {module} RESULTS_JSON [OUT_DIR]", file=sys.stderr)
        return 2
    source = Path(args[0])
    paths = write(
        json.loads(source.read_text()), Path(args[1]) if len(args) > 1 else source.parent / "results"
    )
    print(paths["markdown"])
    return 0


def mean_std_row(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {k: mean_std(r[k] for r in rows)[0] for k in rows[0]}


if __name__ == "__main__":
    raise SystemExit(main())
