import pytest
import torch

from nexus.model.moe import RoutingInfo
from nexus.training.routing_stats import routing_counts, share_metrics


def _info(expert_index):
    n_tokens = expert_index.shape[0]
    zero = torch.zeros(())
    return RoutingInfo(expert_index, torch.full((n_tokens, 3), 1 / 3), zero, zero, zero)


def test_counts_per_layer_domain_and_expert():
    domains = torch.tensor([0, 0, 1, 1])
    layer0 = _info(torch.tensor([[0], [0], [2], [1]]))
    layer1 = _info(torch.tensor([[1, 2], [1, 0], [2, 0], [2, 1]]))  # top-2
    counts = routing_counts([layer0, layer1], domains, n_domains=3)
    assert counts.shape == (2, 3, 3)
    assert counts[0].tolist() == [[2, 0, 0], [0, 1, 1], [0, 0, 0]]
    assert counts[1].tolist() == [[1, 2, 1], [1, 1, 2], [0, 0, 0]]


def test_share_metrics_normalise_per_domain_and_skip_unseen_domains():
    counts = torch.tensor([[[2, 0], [1, 3], [0, 0]], [[1, 1], [0, 4], [0, 0]]])
    m = share_metrics(counts, ["a", "b", "c"], ["x", "y"])
    assert m["val/routing/layer0/a/x"] == 1.0 and m["val/routing/layer0/b/y"] == 0.75
    assert m["val/routing/mean/a/x"] == pytest.approx(0.75) and m["val/routing/mean/b/y"] == pytest.approx(
        0.875
    )
    assert not any("/c/" in k for k in m)


def test_dense_models_have_no_routing_metrics():
    assert share_metrics(routing_counts([], torch.tensor([0, 1]), 2), ["a", "b"], []) == {}
