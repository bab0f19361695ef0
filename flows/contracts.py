"""What the flows' tasks hand each other: frozen dataclasses instead of dicts.

`PreparedData` (what `prepare_data` returns), `StageSpec` (what `train_stage` trains) and its
`StageOutcome`, and `TrackingSettings` (what a stage task logs with). Prefect passes them as they are
(task parameters are not serialised between tasks in one process; Dask and Ray pickle them; a cached
result is persisted with Prefect's pickle serializer), and `flows.tasks.input_key` hashes them field by
field, so cache keys depend on their content only. Their fields are plain JSON data (str, numbers,
lists, dicts; `StageSpec.train` is a `TrainConfig`), so `dataclasses.asdict` gives JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nexus.data.cache import fingerprint as hash_json
from nexus.training.config import TrainConfig


@dataclass(frozen=True)
class PreparedData:
    """An experiment's prepared data: packed splits and tokenizer under `dir`."""

    dir: str
    seq_len: int
    vocab_size: int
    tokenizer: str
    """The tokenizer file every checkpoint of the experiment carries."""
    fingerprints: dict[str, str]
    """Per domain: a hash of its packed data and of the tokenizer."""
    token_counts: dict[str, int]
    """Per domain: training tokens."""
    config: dict[str, Any]
    """The `nexus.data.DataConfig` it was prepared with, as JSON."""

    @classmethod
    def describe(cls, prepared: Any, cfg: Any) -> PreparedData:
        """Of a `nexus.data.PreparedExperiment` prepared with the `DataConfig` `cfg`."""
        import json

        return cls(
            dir=str(prepared.out_dir),
            seq_len=prepared.seq_len,
            vocab_size=len(prepared.load_tokenizer()),
            tokenizer=str(prepared.tokenizer_path),
            fingerprints={
                d: hash_json([dom.fingerprint, prepared.tokenizer_fingerprint])
                for d, dom in prepared.domains.items()
            },
            token_counts=prepared.token_counts("train"),
            config=json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        )

    @property
    def domains(self) -> list[str]:
        return list(self.fingerprints)

    @property
    def embedding(self) -> dict[str, Any]:
        """The `nexus.data.EmbeddingConfig` fields the domain embeddings are computed with."""
        return self.config["embedding"]

    def weights(
        self, mixture: str, domains: list[str] | None = None, domain: str | None = None
    ) -> dict[str, float]:
        """Domain weights of the `nexus.data.stage_weights` stage `mixture` over the initial `domains`
        (default: every domain) and the stage's own `domain` (an expert's), with the data config's
        mixture settings."""
        from nexus.data import MixtureConfig, stage_weights

        return stage_weights(
            mixture,
            self.token_counts,
            list(domains or self.fingerprints),
            MixtureConfig(**self.config["mixture"]),
            domain,
        )

    def fingerprint(self, weights: dict[str, float]) -> str:
        """The training data of a stage with these weights: its domains' fingerprints and the weights."""
        return hash_json({d: self.fingerprints[d] for d in sorted(weights)} | {"w": weights})


@dataclass(frozen=True)
class StageSpec:
    """One training stage as `flows.tasks.train_stage` runs it."""

    stage: str
    """A registered stage (`flows.stages.STAGES`): what is trained and how it is tracked."""
    name: str
    """Its label: the MLflow run name and the key of `TrackingSettings.register`."""
    train: TrainConfig
    data_dir: str
    """The prepared data (`PreparedData.dir`)."""
    weights: dict[str, float]
    """The training mix: domain -> weight."""
    out_dir: str
    data_fp: str
    """A fingerprint of the training data (cache key)."""
    init_checkpoint: str | None = None
    """The checkpoint it starts from; None: a model trained from scratch (`model`)."""
    model: dict[str, Any] | None = None
    """A `nexus.config.ModelConfig` as a dict (only without `init_checkpoint`)."""
    val_domains: list[str] | None = None
    extra_dirs: dict[str, str] | None = None
    """Domains prepared elsewhere: domain -> prepared data dir."""
    metadata: dict[str, Any] | None = None
    """Added to the checkpoint's config.json."""


@dataclass(frozen=True)
class StageOutcome:
    """What `train_stage` returns."""

    checkpoint: str
    metrics: dict[str, float]
    global_step: int
    resumed_from_step: int | None
    """The step it resumed at; None for a fresh run or a stage that had finished before."""
    run_id: str | None = None
    """Its MLflow run (None: tracking off)."""
    registered: dict[str, str] | None = None
    """{name, version} of its registered model version, or None."""
    started: float = 0.0
    finished: float = 0.0
    """Wall-clock interval of the task body (imports included)."""
    pid: int = 0
    """The process that ran the task body."""


@dataclass(frozen=True)
class TrackingSettings:
    """What stage tasks log with: the MLflow store, the parent run, the registered model name per stage
    label, and whose checkpoint files are uploaded."""

    uri: str | None
    parent_run_id: str
    register: dict[str, str] = field(default_factory=dict)
    """Stage label -> registered model name (labels not named here are not registered)."""
    upload_checkpoints: str = "all"
    """`all`: every checkpoint's files go into MLflow; `final`: those of final models only."""

    def registered_as(self, label: str) -> str | None:
        return self.register.get(label)

    def uploads(self, final: bool) -> bool:
        """Whether a checkpoint's files go into MLflow: a final one's always."""
        return final or self.upload_checkpoints == "all"

    def registering(self, names: dict[str, str]) -> TrackingSettings:
        """These settings, registering the stage labels of `names` too."""
        return dataclasses.replace(self, register={**self.register, **names})
