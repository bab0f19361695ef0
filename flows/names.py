"""The names of models, stages and registered models, spelled once.

Model labels key the pipeline summary's `checkpoints` and `perplexity` tables, the evaluation's
MLflow metrics, the report and the reproduction tables (`seed`, `expert:<domain>`, `moe:<router>`,
`dense merge`, `seed continued`); state keys name the summary's `states` (`expert-<domain>`,
`build-<kind>`, ...); registered model names are what `tracking.register` maps a stage label to.
"""

from __future__ import annotations

SEED = "seed"
"""The dense seed: its model label, stage, stage label and state key."""
SEED_CONTINUED = "seed continued"
"""The data-matched dense baseline (the seed trained further on the MoE mix)."""
SEED_CONTINUED_RUN = "seed-continued"
"""Its stage label (MLflow run name, registry key) and state key."""
DENSE_MERGE = "dense merge"
"""The dense merge baseline (seed and experts averaged)."""
MERGE = "merge"
"""`build_model` kind of the dense merge."""
EVALUATE = "evaluate"
BEFORE, APPENDED, AFTER = "before", "appended", "after"
"""Models of an extension or removal round: the base MoE, the MoE with the new expert appended (not
finetuned), the round's result."""


def expert(domain: str) -> str:
    """A dense expert's model label: `expert:<domain>`."""
    return f"expert:{domain}"


def moe(kind: str) -> str:
    """A trained MoE's model label: `moe:<router>` (or `moe:sparse`)."""
    return f"moe:{kind}"


def moe_kind(label: str) -> str:
    """`moe:nexus` -> `nexus`."""
    return label.removeprefix("moe:")


def extended(domain: str) -> str:
    """The stage label of an extension's finetune (its MLflow run name and registry key)."""
    return f"extended-{domain}"


def build(kind: str) -> str:
    """The stage label and state key of a `build_model` task of `kind`."""
    return f"build-{kind}"


def removal(domain: str) -> str:
    """The stage label of a removal (its MLflow run name and registry key)."""
    return f"remove-{domain}"


def state(stage: str, name: str) -> str:
    """The summary's `states` key of a task: `expert-lore`, `moe-nexus`, `embed-lore`, ..."""
    return f"{stage}-{name}"


def registered_name(experiment: str, what: str) -> str:
    """The registered model name of a pipeline's non-MoE model: `nexus-<experiment>-<what>`, e.g.
    `nexus-demo-seed`, `nexus-demo-expert-lore`, `nexus-demo-merged`."""
    return f"nexus-{experiment}-{what}"
