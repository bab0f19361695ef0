"""Typed configs validate themselves and round-trip through plain dicts (config.json)."""

import pytest

from nexus.config import ModelConfig, MoEConfig, tiny
from nexus.errors import ConfigError


def test_round_trip_through_dict():
    cfg = tiny().with_moe(expert_names=["a", "b"], router="linear", top_k=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.dense() == tiny() and cfg.moe.n_experts == 2


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(d_model=30, n_heads=4), "not divisible by n_heads"),
        (dict(n_heads=4, n_kv_heads=3), "not divisible by n_kv_heads"),
        (dict(n_layers=0), "n_layers must be >= 1"),
    ],
)
def test_invalid_model_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**bad)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(expert_names=["a", "a"]), "duplicates"),
        (dict(expert_names=["a"], top_k=2), "exceeds the number of experts"),
        (dict(router="hash"), "'nexus' or 'linear'"),
        (dict(dispatch="masks"), "'sorted' or 'grouped_mm'"),
    ],
)
def test_invalid_moe_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        MoEConfig(**bad)


def test_unknown_keys_are_named_with_their_source():
    with pytest.raises(ConfigError, match=r"ckpt/config.json: moe: unknown key\(s\) \['topk'\]"):
        ModelConfig.from_dict({**tiny().to_dict(), "moe": {"topk": 1}}, source="ckpt/config.json")


def test_package_exports_resolve_lazily():
    import nexus
    import nexus.upcycling  # importing the submodule must not shadow the function of the same package

    assert callable(nexus.upcycle) and nexus.upcycle.__module__ == "nexus.upcycling"
    assert nexus.ModelConfig is ModelConfig
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        nexus.nope  # noqa: B018
