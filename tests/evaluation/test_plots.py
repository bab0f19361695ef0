"""Every plot writes a non-trivial PNG of the expected size."""

import numpy as np
from matplotlib import image

from nexus.evaluation.embeddings import EmbeddingGeometry
from nexus.evaluation.plots import (
    plot_curves,
    plot_embedding_similarity,
    plot_perplexity,
    plot_routing,
    plot_routing_layers,
)
from nexus.evaluation.routing import RoutingAnalysis


def sample_routing() -> RoutingAnalysis:
    share = np.array(
        [
            [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],
            [[0.6, 0.3, 0.1], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7]],
        ]
    )
    return RoutingAnalysis(
        ["code", "prose", "dictionary"],
        ["code", "prose", "dictionary"],
        share * 0.9 + 0.1 / 3,
        share,
        {"code": 100, "prose": 100, "dictionary": 100},
    )


def test_plots_write_pngs(tmp_path):
    geometry = EmbeddingGeometry(
        ["code", "prose"], np.array([[1, 0.4], [0.4, 1]]), np.array([[1, -0.2], [-0.2, 1]]), 1
    )
    paths = [
        plot_routing(sample_routing(), tmp_path / "routing.png"),
        plot_routing(sample_routing(), tmp_path / "routing_prob.png", metric="mean_prob"),
        plot_routing_layers(sample_routing(), tmp_path / "layers.png"),
        plot_embedding_similarity(geometry, tmp_path / "sub" / "embeddings.png"),
        plot_perplexity(
            {"seed": {"code": 9.0, "prose": 12.0}, "nexus": {"code": 7.5, "prose": 11.0}},
            tmp_path / "ppl.png",
        ),
        plot_curves(
            {
                "new": {"nexus": ([0, 1, 2], [9.0, 7.0, 6.5], [0.2, 0.1, 0.1])},
                "old": {"nexus": ([0, 1, 2], [5.0, 5.5, 5.2], [0.1, 0.1, 0.1])},
            },
            tmp_path / "curves.png",
            "steps",
            {"new": "ppl", "old": "ppl"},
            references={"old": {"nexus": 4.8}},
        ),
    ]
    for path in paths:
        pixels = image.imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 400
        assert pixels[..., :3].std() > 0.05  # not blank
    assert image.imread(paths[2]).shape[1] > image.imread(paths[4]).shape[1] * 0.8  # one panel per layer
    assert image.imread(paths[5]).shape[1] > 2 * image.imread(paths[5]).shape[0]  # two panels side by side
