"""Mixture weights and the deterministic, resumable sampler."""

import collections

import pytest

from nexus.data.config import MixtureConfig
from nexus.data.mixture import MixtureSampler, blend, mixture_weights, stage_weights
from nexus.errors import DataError

TOKENS = {"dictionary": 600, "kernel-docs": 300, "python-docs": 90, "lore": 10, "code": 200}
INITIAL = ["dictionary", "kernel-docs", "python-docs", "lore"]


def test_weightings():
    assert mixture_weights(TOKENS)["dictionary"] == pytest.approx(600 / 1200)
    assert set(mixture_weights(TOKENS, "uniform").values()) == {0.2}
    explicit = mixture_weights(TOKENS, "explicit", {"lore": 3, "code": 1})
    assert explicit["lore"] == 0.75 and explicit["dictionary"] == 0.0
    with pytest.raises(DataError, match="unknown domains"):
        mixture_weights(TOKENS, "explicit", {"news": 1})


def test_stage_weights_general_share_and_extension_half_half():
    cfg = MixtureConfig(weighting="uniform", general_share=0.2)
    moe = stage_weights("moe", TOKENS, INITIAL, cfg)
    general = mixture_weights({d: TOKENS[d] for d in INITIAL})
    assert moe["lore"] == pytest.approx(0.8 * 0.25 + 0.2 * general["lore"]) and "code" not in moe
    ext = stage_weights("extension", TOKENS, INITIAL, MixtureConfig(), domain="code")
    assert ext["code"] == 0.5 and sum(ext[d] for d in INITIAL) == pytest.approx(0.5)
    assert ext["dictionary"] == pytest.approx(0.5 * general["dictionary"])
    assert stage_weights("expert", TOKENS, INITIAL, MixtureConfig(), domain="lore") == {"lore": 1.0}
    assert sum(stage_weights("seed", TOKENS, INITIAL, MixtureConfig()).values()) == pytest.approx(1)
    with pytest.raises(DataError, match="unknown domain 'news'"):
        stage_weights("extension", TOKENS, INITIAL, MixtureConfig(), domain="news")
    assert blend({"a": 1}, {"b": 1}, 0.25) == {"a": 0.75, "b": 0.25}


def test_empirical_shares_match_weights():
    weights = {"a": 0.6, "b": 0.3, "c": 0.1}
    sampler = MixtureSampler({"a": 50, "b": 7, "c": 3}, weights, seed=1)
    draws = sampler.take(20_000)
    counts = collections.Counter(d for d, _ in draws)
    for domain, w in weights.items():
        assert counts[domain] / 20_000 == pytest.approx(w, abs=0.015)
    assert all(0 <= i < {"a": 50, "b": 7, "c": 3}[d] for d, i in draws)


def test_each_epoch_of_a_domain_visits_every_index_once():
    sampler = MixtureSampler({"a": 10, "b": 10}, {"a": 1, "b": 0}, seed=3)
    first, second = [i for _, i in sampler.take(10)], [i for _, i in sampler.take(10)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second


def test_same_seed_same_stream_and_resume_continues_it():
    sizes, weights = {"a": 13, "b": 5, "c": 2}, {"a": 0.5, "b": 0.3, "c": 0.2}
    reference = MixtureSampler(sizes, weights, seed=7).take(400)
    assert MixtureSampler(sizes, weights, seed=8).take(400) != reference
    run = MixtureSampler(sizes, weights, seed=7)
    assert run.take(157) == reference[:157]
    state = run.state_dict()
    resumed = MixtureSampler(sizes, weights, seed=7)
    resumed.load_state_dict(state)
    assert resumed.take(243) == reference[157:] and resumed.draws == 400
    with pytest.raises(DataError, match="sampler state"):
        MixtureSampler({"a": 1}, {"a": 1}, seed=7).load_state_dict(state)


def test_sampler_rejects_weighted_domains_without_data():
    with pytest.raises(DataError, match="no sequences"):
        MixtureSampler({"a": 0, "b": 4}, {"a": 1, "b": 1})
