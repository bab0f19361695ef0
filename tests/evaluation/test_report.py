"""The comparison report from plain data: tables, relative gains, figures, HTML."""

import json

import numpy as np
import pytest

from nexus.evaluation.report import relative_gains, write_report


def results() -> dict:
    share = np.array([[[0.75, 0.25], [0.125, 0.875]]] * 2)
    return {
        "title": "Demo run",
        "metadata": {"run_id": "abc123"},
        "perplexity": {
            "seed": {
                "code": {"perplexity": 10.0, "bits_per_byte": 1.5},
                "prose": {"perplexity": 20.0, "bits_per_byte": 2.0},
            },
            "moe-linear": {
                "code": {"perplexity": 8.0, "bits_per_byte": 1.2},
                "prose": {"perplexity": 16.0, "bits_per_byte": 1.8},
            },
            "nexus": {
                "code": {"perplexity": 6.0, "bits_per_byte": 1.0},
                "prose": {"perplexity": 16.0, "bits_per_byte": 1.7},
            },
        },
        "baselines": {"linear-router": "moe-linear", "seed": "seed"},
        "extension": {
            "perplexity": {"moe-linear+new": {"new": 30.0}, "nexus+new": {"new": 24.0}},
            "baselines": {"linear-router": "moe-linear+new"},
            "note": "After 50 finetuning steps.",
        },
        "routing": {
            "nexus": {
                "domains": ["code", "prose"],
                "experts": ["code", "prose"],
                "mean_prob": share.tolist(),
                "top1_share": share.tolist(),
                "tokens": {"code": 64, "prose": 64},
            }
        },
        "embeddings": {
            "nexus": {
                "names": ["code", "prose"],
                "domain_similarity": [[1, 0.5], [0.5, 1]],
                "expert_similarity": [[1, 0.1], [0.1, 1]],
                "layer": 1,
            }
        },
        "lm_eval": {"nexus": {"nexus_heldout_code": {"bits_per_byte": 1.01}}},
    }


def test_relative_gains():
    gains = relative_gains({"base": {"x": 10.0, "y": 20.0}, "m": {"x": 8.0, "y": 21.0}}, "base")
    assert gains == {
        "m": {
            "x": pytest.approx(20.0),
            "y": pytest.approx(-5.0),
            "mean": pytest.approx(100 * (15 - 14.5) / 15),
        }
    }


def test_write_report(tmp_path):
    paths = write_report(results(), tmp_path / "report")
    md = paths["markdown"].read_text()
    assert md.startswith("# Demo run")
    assert "| nexus | 6.000 | 16.000 | 11.000 |" in md  # perplexity with the mean over domains
    assert "| nexus | 25.000 | 0.000 | 8.333 |" in md  # % gain vs the linear router (mean ppl: 12 vs 11)
    assert "| nexus | 40.000 | 20.000 | 26.667 |" in md  # % gain vs the seed (mean: 15 vs 11)
    assert "| nexus+new | 20.000 | 20.000 |" in md  # extension gain
    assert "| code | 0.750 | 0.250 | 64 |" in md  # routing table
    assert "After 50 finetuning steps." in md and "nexus_heldout_code bits_per_byte" in md
    figures = {k for k in paths if k.startswith("figures/")}
    assert {
        "figures/perplexity.png",
        "figures/routing_nexus_top1_share.png",
        "figures/routing_nexus_mean_prob.png",
        "figures/routing_nexus_layers.png",
        "figures/embeddings_nexus.png",
    } <= figures
    for name in figures:
        assert f"]({name})" in md and f'src="{name}"' in paths["html"].read_text()
        assert paths[name].stat().st_size > 10_000
    assert json.loads(paths["json"].read_text())["baselines"]["seed"] == "seed"
