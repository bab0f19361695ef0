"""The promotion gate: the new domain must improve, every earlier domain stay within tolerance."""

from __future__ import annotations

import math

import pytest

from nexus.errors import ConfigError
from nexus.evaluation import GateVerdict, promotion_gate

BEFORE = {"a": 100.0, "b": 50.0, "new": 300.0}


def test_passes_when_new_improves_and_earlier_within_tolerance():
    verdict = promotion_gate(BEFORE, {"a": 104.9, "b": 49.0, "new": 200.0}, "new", 0.05)
    assert verdict.passed and verdict.failed_domains == []
    checks = {c.domain: c for c in verdict.checks}
    assert checks["new"].role == "new" and checks["a"].role == "earlier"
    assert checks["a"].limit == pytest.approx(105.0) and checks["new"].limit == 300.0
    assert checks["b"].change == pytest.approx(-0.02)


@pytest.mark.parametrize(
    "after, failed",
    [
        ({"a": 105.1, "b": 50.0, "new": 200.0}, ["a"]),  # an earlier domain beyond 5 %
        ({"a": 100.0, "b": 50.0, "new": 300.0}, ["new"]),  # the new domain did not improve
        ({"a": math.nan, "b": 50.0, "new": 200.0}, ["a"]),  # a diverged model never passes
        ({"a": 100.0, "b": 50.0, "new": math.inf}, ["new"]),
    ],
)
def test_fails_naming_the_domains(after, failed):
    verdict = promotion_gate(BEFORE, after, "new", 0.05)
    assert not verdict.passed and verdict.failed_domains == failed
    assert "FAIL" in verdict.table() and "gate FAILED" in verdict.table()


def test_boundary_is_inclusive_for_earlier_domains_only():
    assert promotion_gate({"a": 100.0, "n": 10.0}, {"a": 105.0, "n": 9.99}, "n", 0.05).passed
    assert not promotion_gate({"a": 100.0, "n": 10.0}, {"a": 100.0, "n": 10.0}, "n", 0.05).passed


def test_removal_judges_only_the_remaining_domains():
    verdict = promotion_gate(BEFORE, {"a": 101.0, "b": 50.0}, None, 0.05)
    assert verdict.passed and {c.role for c in verdict.checks} == {"earlier"}
    assert "must improve" not in verdict.table()


def test_round_trips_through_a_summary():
    verdict = promotion_gate(BEFORE, {"a": 120.0, "b": 49.0, "new": 200.0}, "new", 0.1)
    again = GateVerdict.from_dict(verdict.to_dict())
    assert again == verdict and again.to_dict()["passed"] is False


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="tolerance"):
        promotion_gate(BEFORE, BEFORE, "new", -0.1)
    with pytest.raises(ConfigError, match="'c'"):
        promotion_gate(BEFORE, {"c": 1.0, "new": 1.0}, "new", 0.05)
    with pytest.raises(ConfigError, match="'new'"):
        promotion_gate(BEFORE, {"a": 1.0}, "new", 0.05)
