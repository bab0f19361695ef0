"""Tables and figures of a `bam_experiment` run: `write_bam_results(results, out_dir)` writes `bam.md`
(mean ± standard deviation over the replicate seeds) and `figures/bam-*.png`.

Perplexities are held-out (the test split); an average is the mean over the domains; a relative
gain of A over B is `(ppl_B − ppl_A) / ppl_B`, per seed, then averaged (positive: A is better).
Step-time ratios divide the MoE stage's wall time per step by the FFN-only MoE's of the same router
and seed (both routers of a variant train at once on the 2 cores; validation and saving included),
over the seeds where both stages trained in the run (a stage reused from an earlier run is not timed).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows import names
from flows.results import _table, average, fmt, gain, mean_std, rewrite_main
from nexus.config import DEFAULT_ROUTER

BASE = "ffn-only"


class BamRuns:
    """Accessors over `results["replicates"]`: per seed, per variant, per router."""

    def __init__(self, results: Mapping[str, Any]) -> None:
        self.results = results
        self.seeds = [s for s in map(str, results["seeds"]) if s in results["replicates"]]
        self.runs = [results["replicates"][s] for s in self.seeds]
        first = self.runs[0]
        self.domains: list[str] = list(first["pipeline"]["domains"])
        self.variants = [v for v in results["variants"] if any(v in run["variants"] for run in self.runs)]
        self.routers = [names.moe_kind(m) for m in first["variants"][BASE]["checkpoints"]]

    def stages(self, variant: str) -> list[dict]:
        """The variant's stage result of every seed that ran it."""
        return [run["variants"][variant] for run in self.runs if variant in run["variants"]]

    def seeds_of(self, variant: str) -> list[str]:
        return [s for s, run in zip(self.seeds, self.runs) if variant in run["variants"]]

    def ppl(self, variant: str, router: str) -> list[dict[str, float]]:
        """Per seed: {domain: perplexity, "average": mean over the domains}."""
        rows = [dict(stage["perplexity"][names.moe(router)]) for stage in self.stages(variant)]
        return [{**row, "average": average(row, self.domains)} for row in rows]

    def base_runs(self, variant: str) -> list[dict]:
        """The FFN-only stage of each seed that ran `variant` (the seeds line up with `stages`)."""
        return [run["variants"][BASE] for run in self.runs if variant in run["variants"]]

    def gains(self, variant: str, router: str, column: str = "average") -> list[float]:
        base = [{**s["perplexity"][names.moe(router)]} for s in self.base_runs(variant)]
        base = [{**b, "average": average(b, self.domains)} for b in base]
        return [gain(p[column], b[column]) for p, b in zip(self.ppl(variant, router), base)]

    def step_ratio(self, variant: str, router: str) -> list[float]:
        """Per seed whose two stages were both timed (a stage reused from an earlier run was not)."""
        key = names.moe(router)
        pairs = [
            (s["training"][key]["seconds_per_step"], b["training"][key]["seconds_per_step"])
            for s, b in zip(self.stages(variant), self.base_runs(variant))
        ]
        return [s / b for s, b in pairs if s is not None and b is not None]

    def facts(self, variant: str, router: str) -> dict:
        return self.stages(variant)[0]["models"][names.moe(router)]

    def expert_ppl(self) -> list[dict[str, float]]:
        rows = [
            {d: run["pipeline"]["perplexity"][names.expert(d)][d] for d in self.domains} for run in self.runs
        ]
        return [{**r, "average": average(r, self.domains)} for r in rows]


def perplexity_table(runs: BamRuns) -> list[str]:
    cols = [*runs.domains, "average"]
    rows = [
        [f"`{v}`", r, len(runs.seeds_of(v)), *(fmt(p[c] for p in runs.ppl(v, r)) for c in cols)]
        for r in runs.routers
        for v in runs.variants
    ]
    experts = runs.expert_ppl()
    rows.append(["`expert (own domain)`", "–", len(runs.seeds), *(fmt(p[c] for p in experts) for c in cols)])
    return _table(["variant", "router", "seeds", *cols], rows)


def summary_table(runs: BamRuns) -> list[str]:
    dense_kv = runs.facts(BASE, runs.routers[0])["kv_bytes_per_token"]
    rows = []
    for router in runs.routers:
        for v in runs.variants:
            facts = runs.facts(v, router)
            params = facts["params"]
            rows.append(
                [
                    f"`{v}`",
                    router,
                    fmt(p["average"] for p in runs.ppl(v, router)),
                    "–" if v == BASE else fmt(runs.gains(v, router), percent=True),
                    "1" if v == BASE else step_cell(runs.step_ratio(v, router)),
                    f"{facts['kv_bytes_per_token']:,} ({facts['kv_bytes_per_token'] / dense_kv:g}×)",
                    f"{params['total'] / 1e6:.2f}M",
                    f"{params['active_inference'] / 1e6:.2f}M",
                ]
            )
    return _table(
        [
            "variant",
            "router",
            "avg ppl",
            "gain vs `ffn-only`",
            "step time vs `ffn-only`",
            "KV cache bytes/token (vs dense)",
            "params total",
            "params active (inference)",
        ],
        rows,
    )


def step_cell(ratios: list[float]) -> str:
    """Mean ± std of the timed seeds' step-time ratios, and how many seeds that is."""
    return f"{fmt(ratios, 2)} (n={len(ratios)})" if ratios else "not timed"


def baseline_routers(runs: BamRuns) -> list[str]:
    """The routers the default (Nexus) router is compared with; none when it was not run."""
    return [r for r in runs.routers if r != DEFAULT_ROUTER] if DEFAULT_ROUTER in runs.routers else []


def router_table(runs: BamRuns) -> list[str]:
    """Nexus vs each baseline router for each variant (positive: Nexus has the lower perplexity)."""
    baselines = baseline_routers(runs)
    if not baselines:
        return []
    rows = []
    for baseline in baselines:
        for v in runs.variants:
            nexus, other = runs.ppl(v, DEFAULT_ROUTER), runs.ppl(v, baseline)
            rows.append(
                [
                    f"`{v}`" if len(baselines) == 1 else f"`{v}` vs {baseline}",
                    *(
                        fmt((gain(n[c], b[c]) for n, b in zip(nexus, other)), percent=True)
                        for c in [*runs.domains, "average"]
                    ),
                ]
            )
    return _table(["variant", *runs.domains, "average"], rows)


def write_bam_results(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write `bam.md` and `figures/bam-*.png` for a `bam_experiment` result; returns their paths."""
    from nexus.evaluation.plots import plot_perplexity
    from nexus.io import atomic_write_text

    out, runs = Path(out_dir), BamRuns(results)
    fig, seeds = out / "figures", ", ".join(runs.seeds)
    cols = [*runs.domains, "average"]
    paths = {
        "perplexity": plot_perplexity(
            {
                f"{v} ({r})": {c: mean_std(p[c] for p in runs.ppl(v, r))[0] for c in cols}
                for r in runs.routers
                for v in runs.variants
            },
            fig / "bam-perplexity.png",
            f"BAM vs FFN-only MoE: held-out perplexity, mean over seeds {seeds}",
        ),
        "gain": plot_perplexity(
            {
                f"{v} ({r})": {c: 100 * mean_std(runs.gains(v, r, c))[0] for c in cols}
                for r in runs.routers
                for v in runs.variants
                if v != BASE
            },
            fig / "bam-gain.png",
            f"Perplexity gain over the FFN-only MoE of the same router (seeds {seeds})",
            ylabel="gain (%), positive = better",
        ),
    }
    lines = [
        f"# BAM attention experts: `{results['experiment']}`, seeds {seeds}",
        "",
        f"Regenerate: `{command(results)}`.",
        "",
        f"Wall time {results.get('seconds', 0) / 60:.1f} min; per replicate "
        + ", ".join(f"seed {s}: {r['seconds'] / 60:.1f} min" for s, r in results["replicates"].items())
        + ".",
        "Every cell: mean ± standard deviation over the seeds. Perplexity on the held-out test split.",
        "",
        "## Held-out perplexity",
        "",
        *perplexity_table(runs),
        "",
        f"![perplexity]({paths['perplexity'].relative_to(out)})",
        "",
        "## Gains, step time, KV cache and parameters",
        "",
        *summary_table(runs),
        "",
        f"![gain]({paths['gain'].relative_to(out)})",
        "",
    ]
    routers = router_table(runs)
    if routers:
        vs = ", ".join(baseline_routers(runs))
        lines += [f"## Nexus vs {vs} router (positive: Nexus has the lower perplexity)", "", *routers, ""]
    paths["markdown"] = out / "bam.md"
    atomic_write_text(paths["markdown"], "\n".join(lines) + "\n")
    return paths


def command(results: Mapping[str, Any]) -> str:
    """The `python -m flows.bam` command line that produces `results`."""
    return " ".join(
        [
            "python -m flows.bam",
            f"--experiment {results['experiment']}",
            "--seeds",
            *map(str, results["seeds"]),
            "--ablation-seeds",
            *map(str, results["ablation_seeds"]),
            *results["overrides"],
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.bam_results BAM_JSON [OUT_DIR]`: rewrite the tables and figures of a run."""
    return rewrite_main("flows.bam_results", write_bam_results, argv)


if __name__ == "__main__":
    raise SystemExit(main())
