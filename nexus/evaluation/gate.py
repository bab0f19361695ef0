"""The promotion gate of a model line: may a new version (an extension or a removal) replace the one
it was built from?

A version built from `base` passes when
  - the new domain (an extension's) improves:   ppl_new(after) < ppl_new(before), and
  - every earlier domain stays within tolerance: ppl_d(after) <= (1 + tolerance) · ppl_d(before).
Perplexities are held-out ones of the same split for both models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from nexus.errors import ConfigError


@dataclass(frozen=True)
class DomainCheck:
    domain: str
    role: str
    """`new` (the extension's domain) or `earlier` (a domain the base model already served)."""
    before: float
    after: float
    limit: float
    """`after` must stay below this (strictly for the new domain)."""
    passed: bool

    @property
    def change(self) -> float:
        """Relative change of perplexity, after / before - 1 (negative: better)."""
        return self.after / self.before - 1.0


@dataclass(frozen=True)
class GateVerdict:
    checks: tuple[DomainCheck, ...]
    tolerance: float

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed_domains(self) -> list[str]:
        return [c.domain for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "tolerance": self.tolerance,
            "domains": {c.domain: {**asdict(c), "change": c.change} for c in self.checks},
        }

    @classmethod
    def from_dict(cls, data: dict) -> GateVerdict:
        fields = ("domain", "role", "before", "after", "limit", "passed")
        return cls(
            tuple(DomainCheck(**{k: c[k] for k in fields}) for c in data["domains"].values()),
            data["tolerance"],
        )

    def table(self) -> str:
        """The verdict as text: one line per domain, then the decision."""
        lines = [f"{'domain':<20}{'role':>9}{'before':>11}{'after':>11}{'change':>9}  verdict"]
        for c in self.checks:
            lines.append(
                f"{c.domain[:20]:<20}{c.role:>9}{c.before:>11.2f}{c.after:>11.2f}{c.change:>+9.1%}  "
                + ("pass" if c.passed else f"FAIL (limit {c.limit:.2f})")
            )
        rule = f"earlier domains within {self.tolerance:.0%}" + (
            ", the new domain must improve" if any(c.role == "new" for c in self.checks) else ""
        )
        lines.append(f"gate {'PASSED' if self.passed else 'FAILED'} ({rule})")
        return "\n".join(lines)


def promotion_gate(
    before: Mapping[str, float], after: Mapping[str, float], new_domain: str | None, tolerance: float
) -> GateVerdict:
    """Judge `after` against `before` ({domain: held-out perplexity}) over the domains `after` serves:
    `new_domain` must satisfy `after < before`, every other domain `after <= (1 + tolerance) · before`.
    `new_domain` is None for a removal (only earlier domains are judged)."""
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ConfigError(f"gate tolerance must be a finite value >= 0, got {tolerance}")
    missing = sorted(set(after) - set(before))
    if missing or (new_domain is not None and new_domain not in after):
        raise ConfigError(
            f"gate: no 'before' perplexity for {missing or [new_domain]}; both models must be "
            "evaluated on every domain of the new version"
        )
    checks = []
    for domain, ppl in after.items():
        role = "new" if domain == new_domain else "earlier"
        limit = before[domain] if role == "new" else (1.0 + tolerance) * before[domain]
        passed = math.isfinite(ppl) and (ppl < limit if role == "new" else ppl <= limit)
        checks.append(DomainCheck(domain, role, float(before[domain]), float(ppl), float(limit), passed))
    return GateVerdict(tuple(checks), float(tolerance))
