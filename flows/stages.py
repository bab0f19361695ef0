"""The registry of training stages: what each trains, on which mix, with which `TrainConfig`, and
whether its checkpoints are results.

A stage with a `train.<name>` section of its own (`flows.config.StagesConfig`; every conf/train/*.yaml
sets each, tests/flows/test_stages.py checks it) reads its TrainConfig there; any other stage declares
it here, derived from a configured stage (`train=`), so a new stage needs no entry in conf/train/ and
never gets TrainConfig's defaults by omission. `stage_spec` builds the `StageSpec` of one run of a
stage (see docs/extending.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from flows import names
from flows.config import PipelineConfig
from flows.contracts import PreparedData, StageSpec
from nexus.errors import ConfigError
from nexus.training.config import TrainConfig


@dataclass(frozen=True)
class Stage:
    name: str
    kind: Literal["dense", "moe"]
    """What `nexus.training.run_stage` trains: a dense model or an MoE."""
    mixture: str
    """The `nexus.data.stage_weights` stage of its training mix (`seed`, `expert`, `moe`, `extension`)."""
    final: bool
    """Its trained checkpoints are results (uploaded to MLflow even with `upload_checkpoints: final`),
    not only inputs of later stages."""
    tag: str | None = None
    """Its MLflow `nexus.stage` tag (default: `name`)."""
    train: Callable[[PipelineConfig, PreparedData], TrainConfig] | None = None
    """Its TrainConfig from the config and the data; None: `cfg.train.<name>`."""

    @property
    def tracking_tag(self) -> str:
        return self.tag or self.name

    def train_config(self, cfg: PipelineConfig, data: PreparedData | None = None) -> TrainConfig:
        if self.train is None:
            return getattr(cfg.train, self.name)
        if data is None:
            raise ValueError(f"stage {self.name!r} derives its TrainConfig from the prepared data")
        return self.train(cfg, data)


def continued_seed_train(cfg: PipelineConfig, data: PreparedData) -> TrainConfig:
    """train.moe's settings, for as many tokens as the experts and one MoE consumed together."""
    tokens = (
        len(data.domains) * cfg.train.expert.max_steps * cfg.train.expert.batch_size
        + cfg.train.moe.max_steps * cfg.train.moe.batch_size
    )
    return dataclasses.replace(cfg.train.moe, max_steps=-(-tokens // cfg.train.moe.batch_size))


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("seed", "dense", "seed", final=False),
        Stage("expert", "dense", "expert", final=False),
        Stage("moe", "moe", "moe", final=True),
        Stage("extension", "moe", "extension", final=True),
        Stage(names.SEED_CONTINUED_RUN, "dense", "moe", final=True, tag="seed", train=continued_seed_train),
    )
}
"""Every training stage, by name."""


def get_stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ConfigError(f"unknown training stage {name!r}; registered: {sorted(STAGES)}") from None


def configured_stages() -> list[Stage]:
    """The stages with a `train.<name>` section of their own."""
    return [s for s in STAGES.values() if s.train is None]


def stage_spec(
    stage: str,
    name: str,
    cfg: PipelineConfig,
    data: PreparedData,
    out_dir: str,
    *,
    domains: list[str] | None = None,
    domain: str | None = None,
    val_domains: list[str] | None = None,
    init_checkpoint: str | None = None,
    model: dict | None = None,
    metadata: dict | None = None,
) -> StageSpec:
    """A run of `stage` labelled `name` on `data`: its registered mix over the initial `domains`
    (default: every domain) and its own `domain` (an expert's), validated on `val_domains` (default: the
    mix's domains)."""
    spec = get_stage(stage)
    weights = data.weights(spec.mixture, domains, domain)
    return StageSpec(
        stage=stage,
        name=name,
        train=spec.train_config(cfg, data),
        data_dir=data.dir,
        weights=weights,
        out_dir=out_dir,
        data_fp=data.fingerprint(weights),
        init_checkpoint=init_checkpoint,
        model=model,
        val_domains=list(weights) if val_domains is None else val_domains,
        metadata=metadata,
    )
