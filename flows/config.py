"""The pipeline's typed config: `PipelineConfig` (a Hydra structured config mirrored by `conf/`) and
`compose(experiment, overrides)`, which composes, type-checks and validates it before any work starts.

The library's dataclasses are the schema: `schema_of` turns `nexus.config.MoEConfig` into the
`router` section's options and each part of `nexus.data.DataConfig` (splits, tokenizer, packing,
mixture, embedding) into a `data.<part>` section; `data.sources` declares domains of any registered
source kind as `nexus.data.SourceConfig` fields. `DataSection.to_data_config()` and
`RouterSection.moe_config()` build the library's configs. Every error (unknown key, wrong type,
missing folder, empty domain) is raised as `ConfigError` naming the key or path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nexus.config import ModelConfig, MoEConfig
from nexus.data.config import (
    DataConfig,
    DomainConfig,
    EmbeddingConfig,
    MixtureConfig,
    PackingConfig,
    SourceConfig,
    SplitConfig,
    TokenizerConfig,
)
from nexus.data.presets import preset
from nexus.errors import ConfigError
from nexus.training.config import TrainConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".rst")
EXPERIMENTS = tuple(sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
Experiment = Literal[EXPERIMENTS]  # type: ignore[valid-type]
"""An experiment of conf/experiment/ (a choice in the Prefect UI's run form)."""


def schema_of(
    cls: type, name: str, optional: bool = False, exclude: tuple[str, ...] = (), unset: tuple[str, ...] = ()
) -> type:
    """A Hydra structured config generated from the library dataclass `cls` (the schema is the library's,
    never a hand-copied mirror): its fields, types and defaults, without its `__post_init__` checks
    (they run when the library dataclass is built from it). `optional`: every field `None` by default,
    meaning "the preset's value" (see `DataSection`); `unset`: these fields only (None: "the value the
    builder derives", e.g. MoEConfig's `domain_embed_dim` from the domain embeddings)."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if optional or f.name in unset:
            # OmegaConf 2.3 cannot set a mapping on a None `Optional[dict]` node ('NoneType' object has no
            # attribute 'get'): such a field is typed Any here; the library dataclass checks it.
            typ = Any if typing.get_origin(_without_none(hints[f.name])) is dict else hints[f.name]
            specs.append((f.name, typing.Optional[typ], field(default=None)))  # noqa: UP045
        elif f.default_factory is not dataclasses.MISSING:
            specs.append((f.name, hints[f.name], field(default_factory=f.default_factory)))
        else:
            specs.append((f.name, hints[f.name], field(default=f.default)))
    schema = dataclasses.make_dataclass(name, specs)
    schema.__module__ = __name__  # picklable as flows.config.<name>
    schema.__doc__ = f"`{cls.__module__}.{cls.__name__}`'s fields as a Hydra schema (flows.config.schema_of)."
    return schema


def _without_none(typ: Any) -> Any:
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    return args[0] if typing.get_origin(typ) in (typing.Union, types.UnionType) and len(args) == 1 else typ


def set_fields(obj: Any) -> dict[str, Any]:
    """The fields of a `schema_of(..., optional=True)` section that are set (not None)."""
    return {k: v for k, v in dataclasses.asdict(obj).items() if v is not None}


# One optional section per part of nexus.data.DataConfig: `data.<part>.<field>=...` replaces the preset's value.
SplitOptions = schema_of(SplitConfig, "SplitOptions", optional=True)
TokenizerOptions = schema_of(TokenizerConfig, "TokenizerOptions", optional=True)
PackingOptions = schema_of(PackingConfig, "PackingOptions", optional=True)
MixtureOptions = schema_of(MixtureConfig, "MixtureOptions", optional=True)
EmbeddingOptions = schema_of(EmbeddingConfig, "EmbeddingOptions", optional=True)
DATA_PARTS = {
    "splits": SplitOptions,
    "tokenizer": TokenizerOptions,
    "packing": PackingOptions,
    "mixture": MixtureOptions,
    "embedding": EmbeddingOptions,
}
MoEOptions = schema_of(
    MoEConfig, "MoEOptions", exclude=("expert_names", "router"), unset=("domain_embed_dim",)
)
"""MoEConfig's options; the pipeline sets `expert_names` (the domains) and `router` (`router.routers`);
`domain_embed_dim` None: the domain embeddings' dimension (upcycling reads it from them)."""

RENAMED_KEYS = {
    "data.vocab_size": "data.tokenizer.vocab_size",
    "data.tokenizer_path": "data.tokenizer.path",
    "data.seq_len": "data.packing.seq_len",
    "data.num_proc": "data.packing.num_proc",
    "data.split_validation": "data.splits.validation",
    "data.split_test": "data.splits.test",
    "data.embedding_model": "data.embedding.model",
    "data.embedding_sample_size": "data.embedding.sample_size",
    "data.weighting": "data.mixture.weighting",
    "data.general_share": "data.mixture.general_share",
    "data.extension_new_share": "data.mixture.extension_new_share",
}
"""Keys of earlier versions -> their place now: command lines and recorded deployments keep working."""
HF_KEYS = {"name": "hf_config", "split": "hf_split"}
"""`data.hf.<domain>` shorthands for SourceConfig fields."""


@dataclass
class DataSection:
    """Which domains, from where, and every `nexus.data.DataConfig` knob: a preset's DataConfig, its
    domains filtered and extended by the declared ones, each part's set fields replacing the preset's."""

    preset: str = "tiny"
    """A preset of nexus.data.presets.PRESETS (`tiny`: fixture corpora, `demo`: Debian packages +
    stdlib) or `none` (only the declared domains)."""
    corpora_dir: str | None = None
    """The `tiny` preset's corpora; None: the fixture corpora shipped with the repository."""
    domains: list[str] = field(default_factory=list)
    """Initial domains to use (of the preset and the declared `hf`/`sources` ones); empty: all of them."""
    folders: dict[str, str] = field(default_factory=dict)
    """Extra initial domains: name -> folder of .txt/.md/.jsonl files (always used)."""
    hf: dict[str, Any] = field(default_factory=dict)
    """Domains from Hugging Face datasets: name -> SourceConfig fields (`kind: hf` implied; `name` and
    `split` stand for `hf_config` and `hf_split`) and `held_out`. Like `sources`."""
    sources: dict[str, Any] = field(default_factory=dict)
    """Domains from any registered source kind (nexus.data.sources.SOURCES): name -> the fields of a
    `nexus.data.SourceConfig` plus `held_out` (an extension's domain, not an initial one), or
    `{sources: [<SourceConfig fields>, ...], held_out: ...}` for several sources. Checked when composed;
    typed loosely so that `+data.sources.<name>={kind:...,path:...}` works on the command line. With
    `domains` set, only those listed."""
    tokenizer_domains: list[str] = field(default_factory=list)
    """Domains the tokenizer is trained on (empty: the initial ones). Pin it so that adding a domain
    does not retrain the tokenizer (and with it every expert)."""
    seed_domains: list[str] = field(default_factory=list)
    """Domains the seed is pretrained on (empty: the initial ones); pin it like tokenizer_domains."""
    max_documents: int | None = None
    """At most this many documents of every source (a source's own `max_documents` wins)."""
    cache_dir: str = ".cache/nexus"
    """Downloaded corpora (Debian packages), shared between experiments; relative to the project home."""
    splits: SplitOptions = field(default_factory=SplitOptions)  # type: ignore[valid-type]
    tokenizer: TokenizerOptions = field(default_factory=TokenizerOptions)  # type: ignore[valid-type]
    packing: PackingOptions = field(default_factory=PackingOptions)  # type: ignore[valid-type]
    mixture: MixtureOptions = field(default_factory=MixtureOptions)  # type: ignore[valid-type]
    embedding: EmbeddingOptions = field(default_factory=EmbeddingOptions)  # type: ignore[valid-type]

    def __post_init__(self) -> None:
        for part, schema in DATA_PARTS.items():  # from a plain dict (`DataSection(**as_dict(section))`)
            if isinstance(getattr(self, part), dict):
                setattr(self, part, schema(**getattr(self, part)))

    def to_data_config(
        self,
        experiment: str,
        out_dir: str,
        extra: dict[str, str] | None = None,
        keep: list[str] | None = None,
        tokenizer_path: str | None = None,
    ) -> DataConfig:
        """The `nexus.data.DataConfig`: the preset's domains (filtered), `folders`, `extra` folders and the
        declared `hf`/`sources` domains; `keep`: exactly these domains."""
        base = None if self.preset == "none" else preset(self.preset, corpora_dir=self.corpora_dir)
        domains = list(base.domains) if base else []
        if self.max_documents:
            domains = [
                dataclasses.replace(
                    d,
                    sources=tuple(
                        dataclasses.replace(s, max_documents=self.max_documents) for s in d.sources
                    ),
                )
                for d in domains
            ]
        declared = self.declared_domains()
        wanted = keep if keep is not None else (self.domains or [d.name for d in domains if not d.held_out])
        unknown = sorted(set(wanted) - {d.name for d in domains} - set(self.folders) - set(declared))
        if unknown:
            raise ConfigError(
                f"data.domains: unknown domain(s) {unknown}; preset {self.preset!r} has "
                f"{[d.name for d in domains]}"
            )
        domains = [dataclasses.replace(d, held_out=False) for d in domains if d.name in wanted]
        folders = {n: p for n, p in self.folders.items() if keep is None or n in keep}
        domains += [DomainConfig.folder(n, p) for n, p in {**folders, **(extra or {})}.items()]
        declared_wanted = (
            wanted if keep is not None or self.domains else [n for n, d in declared.items() if not d.held_out]
        )
        domains += [
            dataclasses.replace(d, held_out=False) for n, d in declared.items() if n in declared_wanted
        ]
        cfg = base or _empty_config()
        parts = {part: set_fields(getattr(self, part)) for part in DATA_PARTS}
        if tokenizer_path:
            parts["tokenizer"]["path"] = tokenizer_path
        try:
            built = {part: dataclasses.replace(getattr(cfg, part), **kw) for part, kw in parts.items()}
        except (TypeError, ValueError) as err:  # a loosely typed value (Any above) of the wrong type
            raise ConfigError(f"data: {err}") from err
        return dataclasses.replace(
            cfg,
            experiment=experiment,
            domains=tuple(domains),
            out_dir=out_dir,
            cache_dir=self.cache_dir,
            **built,
        )

    def declared_domains(self) -> dict[str, DomainConfig]:
        """The `hf` and `sources` domains (in this order), each a `nexus.data.DomainConfig`."""
        declared = {name: self._declared(f"data.hf.{name}", raw, "hf") for name, raw in self.hf.items()}
        for name, raw in self.sources.items():
            if name in declared:
                raise ConfigError(f"data.sources.{name}: domain {name!r} is declared in data.hf too")
            declared[name] = self._declared(f"data.sources.{name}", raw)
        return declared

    def _declared(self, key: str, raw: Any, kind: str | None = None) -> DomainConfig:
        name = key.rsplit(".", 1)[1]
        if not isinstance(raw, dict):
            raise ConfigError(f"{key}: expected a mapping of SourceConfig fields, got {raw!r}")
        raw = dict(raw)
        held_out = bool(raw.pop("held_out", False))
        several = "sources" in raw
        specs = raw.pop("sources") if several else [raw]
        if not isinstance(specs, list) or (several and raw):
            raise ConfigError(f"{key}: expected `sources: [...]` and `held_out` only, got {raw!r}")
        known = {f.name for f in dataclasses.fields(SourceConfig)}
        sources = []
        for i, spec in enumerate(specs):
            where = f"{key}.sources[{i}]" if several else key
            spec = {(HF_KEYS.get(k, k) if kind == "hf" else k): v for k, v in dict(spec or {}).items()}
            if kind:
                spec.setdefault("kind", kind)
            if set(spec) - known or "kind" not in spec:
                raise ConfigError(
                    f"{where}: expected a mapping of {sorted(known)} (with `kind`), got {spec!r}"
                )
            if spec.get("path") in ("", "???"):
                raise ConfigError(f"{where}.path is required")
            spec["max_documents"] = spec.get("max_documents") or self.max_documents
            try:
                sources.append(SourceConfig(**spec))
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from err
        try:
            return DomainConfig(name, tuple(sources), held_out)
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from err


def _empty_config() -> DataConfig:
    return DataConfig("none", (DomainConfig.folder("placeholder", "."),))


@dataclass
class StagesConfig:
    """One TrainConfig per training stage."""

    seed: TrainConfig = field(default_factory=TrainConfig)
    expert: TrainConfig = field(default_factory=TrainConfig)
    moe: TrainConfig = field(default_factory=TrainConfig)
    extension: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class RouterSection(MoEOptions):  # type: ignore[valid-type,misc]
    """The MoEs and baselines to build; every other key is a `nexus.config.MoEConfig` option of their
    MoE layers (MoEOptions: the library's fields and defaults)."""

    routers: list[str] = field(default_factory=lambda: ["nexus", "linear"])
    dense_merge: bool = True
    sparse_upcycling: bool = False
    continued_seed: bool = False
    """Baseline: the seed trained on the MoE's data mix for as many tokens as the experts and one
    MoE consumed together (data-matched continued pretraining)."""
    init_seed: int = 0
    """Seed of the freshly initialised router weights (upcycling, and a linear router's new row)."""

    def moe_kwargs(self) -> dict[str, Any]:
        """The MoEConfig options that are set (what the build tasks give upcycling, which derives the
        unset `domain_embed_dim` from the domain embeddings)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(MoEOptions)
            if getattr(self, f.name) is not None
        }

    def moe_config(self, expert_names: list[str], router: str) -> MoEConfig:
        """The MoEConfig of the MoE with `router` over `expert_names` (validated by MoEConfig)."""
        return MoEConfig(expert_names=list(expert_names), router=router, **self.moe_kwargs())


@dataclass
class RunnerSection:
    """Task runner of the parallel expert phase: `threads`, `dask` (prefect-dask; LocalCluster, or
    `address` of a running scheduler) or `ray` (prefect-ray, if installed)."""

    kind: str = "threads"
    workers: int = 2
    threads_per_worker: int = 1
    address: str | None = None
    gpus: int | None = None
    """GPUs per worker machine for placement (see flows/placement.py); None: the GPUs this process
    sees. With GPUs, every training stage gets `train.<stage>.devices` GPUs of its own."""
    stages_per_gpu: int = 1
    """Stages that may share one GPU (1: a GPU belongs to one stage at a time)."""


@dataclass
class TrackingSection:
    enabled: bool = True
    uri: str | None = None
    """None: $MLFLOW_TRACKING_URI if set, else `sqlite:///<home>/outputs/mlflow.db` (flows/home.py)."""
    experiment: str = "nexus-${name}"
    model_name: str = "nexus-${name}-moe"
    """Registered model holding the Nexus MoE and its extended versions."""
    upload_checkpoints: str = "all"
    """Whose checkpoint files go into MLflow: `all` (every stage's logged model carries its checkpoint)
    or `final` (the trained MoEs, extensions and baselines only; the seed's, the experts' and the
    upcycled MoEs' logged models keep params, metrics and lineage, and the SHA-256 and path of their
    files, and are not registered). The paper-size experiments say `final`."""


@dataclass
class ExtensionSection:
    """The extension flow and its scheduled deployment (inbox: one subfolder per new domain)."""

    inbox: str = "${out_dir}/inbox"
    cron: str | None = None
    interval_seconds: int | None = None
    gate_tolerance: float = 0.05
    """Promotion gate: a new version becomes `champion` only when the new domain's held-out perplexity
    improves and every earlier domain's stays within this relative tolerance (0.05: at most 5 % worse)."""
    # The extension recipe (conf/recipe/*.yaml sets these; `recipe=<name>` picks one):
    recipe: str = "custom"
    """The recipe's name, recorded in summaries (conf/recipe/<name>.yaml)."""
    lam: float | None = None
    """Non-FFN merge `φ_f = (1 − λ) φ_moe + λ φ_new`; None: the paper's 1/(n+1); 0 keeps the MoE's own."""
    linear_router: str = "append"
    """A linear router: keep its trained rows and append a fresh one, or `reset` it whole (the paper's)."""
    router_init: str = "random"
    """The new expert's router entry: `random` (linear: a fresh row; Nexus: `P_r(d_new)` as it is) or
    `data` (fitted on the new and earlier domains' training tokens, nexus.router_fit)."""
    router_fit_steps: int = 100
    """Optimiser steps of the `data` router fit (on stored MoE-layer inputs: seconds)."""
    trainable: list[str] = field(default_factory=lambda: ["all"])
    """Parameter groups the finetune trains (nexus.training.freeze); `expert:new` is the new expert."""
    router_warmup_steps: int = 0
    """Steps of the finetune spent first on the router and the new expert only (part of the budget)."""
    schedule: str = "rewarm"
    """Finetune LR: `rewarm` (train.extension's warmup + cosine), `constant`, or `decay` (cosine, no warmup)."""
    lr_scale: float = 1.0
    """The finetune's peak LR is `lr_scale · train.extension.lr`."""
    new_share: float | None = None
    """The new domain's share of the finetuning mix; None: data.extension_new_share."""


@dataclass
class EvalSection:
    split: str = "test"
    batch_size: int = 8
    max_tokens: int | None = None
    """Per domain and model (None: the whole split)."""
    device: str = "auto"
    """`auto`: a GPU of its own when there is one (leased like a stage's), else the CPU; or `cpu`/`cuda:N`."""
    divergence_prompts: int = 8
    """Divergent-token metrics of an extension: held-out prompts per earlier domain (0: off)."""
    divergence_prompt_len: int = 32
    divergence_new_tokens: int = 32
    """Greedy tokens generated per prompt (prompt + continuation must fit the model's context)."""


@dataclass
class PipelineConfig:
    name: str = "default"
    home: str | None = None
    """The project home every relative path resolves against; None: $NEXUS_HOME, else the working
    directory (flows/home.py). `nexus deploy` records it in the deployments it creates."""
    out_dir: str = "outputs/${name}"
    seed_checkpoint: str | None = None
    """An existing dense seed checkpoint; None: pretrain one (train.seed)."""
    torch_threads: int = 0
    """torch intra-op threads per training task (0: torch's default)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSection = field(default_factory=DataSection)
    train: StagesConfig = field(default_factory=StagesConfig)
    router: RouterSection = field(default_factory=RouterSection)
    runner: RunnerSection = field(default_factory=RunnerSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    extension: ExtensionSection = field(default_factory=ExtensionSection)
    eval: EvalSection = field(default_factory=EvalSection)


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=PipelineConfig)


def compose(
    experiment: str | None = "demo", overrides: list[str] | tuple[str, ...] = (), check: bool = True
) -> PipelineConfig:
    """Compose `conf/config.yaml` with `experiment=<experiment>` and `overrides`, resolve every path
    against the project home (flows/home.py), then (`check`) validate folders and cross-section
    constraints."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from flows.home import project_home, resolve_paths

    register()
    args = ([f"experiment={experiment}"] if experiment else []) + [renamed(o) for o in overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            raw = hydra_compose("config", overrides=args)
        cfg = OmegaConf.to_object(raw)
        dropped = sorted(_leaf_keys(OmegaConf.to_container(raw)) - _leaf_keys(as_dict(cfg)))
    except ConfigError:
        raise
    except (OmegaConfBaseException, Exception) as err:  # Hydra's override/composition errors
        cause = err.__cause__ or err
        raise ConfigError(
            f"invalid config ({', '.join(args) or 'no overrides'}): {err}"
            + (f" ({cause})" if cause is not err else "")
        ) from err
    if (
        dropped
    ):  # `+section.key=...` on a typed section: OmegaConf keeps it in the tree, the dataclass drops it
        raise ConfigError(
            f"unknown key(s) {dropped}: not fields of the config (see conf/ and flows/config.py)"
        )
    resolve_paths(cfg, project_home(cfg.home))
    if check:
        validate(cfg)
    return cfg


def renamed(override: str) -> str:
    """`override` with a key of an earlier version (RENAMED_KEYS) moved to its place now."""
    key, sep, value = override.partition("=")
    prefix = key[: len(key) - len(key.lstrip("+~"))]
    new = RENAMED_KEYS.get(key[len(prefix) :])
    return f"{prefix}{new}{sep}{value}" if new and sep else override


def _leaf_keys(tree: Any, prefix: str = "") -> set[str]:
    if not isinstance(tree, dict) or not tree:
        return {prefix}
    return set().union(*(_leaf_keys(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in tree.items()))


def validate(cfg: PipelineConfig) -> None:
    """Checks that need the file system or several sections; raise before any training starts."""
    for name, folder in cfg.data.folders.items():
        check_domain_folder(folder, f"data.folders.{name}")
    cfg.data.declared_domains()
    if cfg.runner.kind not in ("threads", "dask", "ray"):
        raise ConfigError(f"runner.kind must be threads|dask|ray, got {cfg.runner.kind!r}")
    if cfg.runner.stages_per_gpu < 1 or (cfg.runner.gpus or 0) < 0:
        raise ConfigError("runner.stages_per_gpu must be >= 1 and runner.gpus >= 0")
    if cfg.tracking.upload_checkpoints not in ("final", "all"):
        raise ConfigError(
            f"tracking.upload_checkpoints must be all|final, got {cfg.tracking.upload_checkpoints!r}"
        )
    if cfg.seed_checkpoint:
        check_seed_checkpoint(cfg.seed_checkpoint)
    if not cfg.extension.gate_tolerance >= 0:
        raise ConfigError(f"extension.gate_tolerance must be >= 0, got {cfg.extension.gate_tolerance}")
    check_recipe(cfg)
    if cfg.eval.split not in ("train", "validation", "test"):
        raise ConfigError(f"eval.split must be train|validation|test, got {cfg.eval.split!r}")
    check_writable_dir(cfg.out_dir, "out_dir")
    seq_len = cfg.data.packing.seq_len
    if seq_len and seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.packing.seq_len={seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    data = cfg.data.to_data_config(cfg.name, str(Path(cfg.out_dir) / "data"))  # DataConfig's own checks
    experts = [d.name for d in data.domains if not d.held_out]
    for router in cfg.router.routers:  # the MoE each router will get, built now rather than after training
        try:
            cfg.router.moe_config(experts, router)
        except ConfigError as err:
            raise ConfigError(f"router.routers={cfg.router.routers}: {err}") from err


def check_recipe(cfg: PipelineConfig) -> None:
    """The extension recipe's values (flows/recipes.py applies them)."""
    from nexus.training.freeze import check_trainable
    from nexus.upcycling import LINEAR_ROUTER_MODES

    ext = cfg.extension
    choices = {
        "linear_router": LINEAR_ROUTER_MODES,
        "router_init": ("random", "data"),
        "schedule": ("rewarm", "constant", "decay"),
    }
    for key, allowed in choices.items():
        if getattr(ext, key) not in allowed:
            raise ConfigError(f"extension.{key} must be one of {list(allowed)}, got {getattr(ext, key)!r}")
    if ext.lam is not None and not 0 <= ext.lam <= 1:
        raise ConfigError(f"extension.lam must be in [0, 1] or null, got {ext.lam}")
    if ext.new_share is not None and not 0 < ext.new_share <= 1:
        raise ConfigError(f"extension.new_share must be in (0, 1] or null, got {ext.new_share}")
    if ext.lr_scale <= 0 or ext.router_fit_steps < 0 or ext.router_warmup_steps < 0:
        raise ConfigError("extension.lr_scale must be > 0, router_fit_steps and router_warmup_steps >= 0")
    if ext.router_warmup_steps >= cfg.train.extension.max_steps:
        raise ConfigError(
            f"extension.router_warmup_steps={ext.router_warmup_steps} leaves no finetune "
            f"steps of train.extension.max_steps={cfg.train.extension.max_steps}"
        )
    check_trainable(ext.trainable)
    if cfg.eval.divergence_prompts and (
        cfg.eval.divergence_prompt_len + cfg.eval.divergence_new_tokens > cfg.model.max_seq_len
    ):
        raise ConfigError(
            "eval.divergence_prompt_len + divergence_new_tokens exceed model.max_seq_len="
            f"{cfg.model.max_seq_len}"
        )


def check_seed_checkpoint(path: str) -> None:
    """A given seed must load (weights verified), be dense, and carry its tokenizer."""
    from nexus.checkpoint import load_model_config, read_checkpoint_config
    from nexus.errors import CheckpointError

    try:
        read_checkpoint_config(path)
        if load_model_config(path).is_moe:
            raise ConfigError(f"seed_checkpoint: {path} is an MoE checkpoint; the seed must be a dense model")
        from nexus.checkpoint import load_checkpoint

        load_checkpoint(path)  # checks the SHA-256 and every tensor's shape
    except CheckpointError as err:
        raise ConfigError(f"seed_checkpoint: {err}") from err
    if not (Path(path) / "tokenizer.json").is_file():
        raise ConfigError(
            f"seed_checkpoint: {path} has no tokenizer.json (experts must share the seed's tokenizer)"
        )


def check_writable_dir(path: str, key: str) -> None:
    """`path` is a writable directory, or can be created as one; creates nothing (a rejected run leaves
    the file system as it was)."""
    import os

    target = Path(path).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}: {path} is not a writable directory ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {path} is not a writable directory ({existing} is not writable)")


def check_domain_folder(folder: str | None, key: str) -> Path:
    """A new domain's folder must exist and hold at least one non-empty text/JSONL file."""
    path = Path(folder or "")
    if not folder or not path.is_dir():
        raise ConfigError(f"{key}: data folder {folder!r} does not exist")
    files = [p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES and p.stat().st_size > 0]
    if not files:
        raise ConfigError(
            f"{key}: domain folder {path} is empty (no non-empty {'/'.join(TEXT_SUFFIXES)} files)"
        )
    return path


def as_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
