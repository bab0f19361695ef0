"""The pipeline's typed config: `PipelineConfig` (a Hydra structured config mirrored by `conf/`) and
`compose(experiment, overrides)`, which composes, type-checks and validates it before any work starts.

The data section is a thin OmegaConf-friendly mirror (`DataSection`) of `nexus.data.DataConfig`
(whose frozen dataclasses use Literal/tuples): `DataSection.to_data_config()` builds the real one.
Every error (unknown key, wrong type, missing folder, empty domain) is raised as `ConfigError`
naming the key or path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nexus.config import ModelConfig, MoEConfig
from nexus.errors import ConfigError
from nexus.training.config import TrainConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".rst")
EXPERIMENTS = tuple(sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
Experiment = Literal[EXPERIMENTS]  # type: ignore[valid-type]
"""An experiment of conf/experiment/ (a choice in the Prefect UI's run form)."""
Router = Literal["nexus", "linear"]


@dataclass
class HFDomainSection:
    """A domain read from a Hugging Face dataset (`nexus.data.SourceConfig(kind="hf")`), streamed:
    a hub name, a local `save_to_disk` directory, a local file or directory of parquet/JSONL/CSV
    files, or a builder name ("json", "parquet") with `data_files` (a glob)."""

    path: str = "???"
    name: str | None = None
    """The dataset's configuration (hub datasets with several)."""
    split: str = "train"
    data_files: str | None = None
    text_field: str = "text"
    filter_field: str | None = None
    """Dotted key of a field to select rows by, e.g. `meta.redpajama_set_name` (SlimPajama)."""
    filter_value: str | None = None
    streaming: bool = True
    max_documents: int | None = None
    held_out: bool = False
    """An extension's domain (`nexus run extend --domain <name>`), not an initial one."""


@dataclass
class DataSection:
    """Which domains, from where, and the data knobs that differ between experiments."""

    preset: str = "tiny"
    """`tiny` (fixture corpora), `demo` (Debian packages + stdlib) or `none` (only `folders`)."""
    corpora_dir: str | None = None
    """The `tiny` preset's corpora; None: the fixture corpora shipped with the repository."""
    domains: list[str] = field(default_factory=list)
    """Initial domains of the preset to use; empty: all of them."""
    folders: dict[str, str] = field(default_factory=dict)
    """Extra initial domains: name -> folder of .txt/.md/.jsonl files."""
    hf: dict[str, Any] = field(default_factory=dict)
    """Domains from Hugging Face datasets: name -> `HFDomainSection` fields (checked when composed;
    typed loosely so that `+data.hf.<name>={path:...,text_field:...}` works on the command line);
    with `domains` set, only those listed."""
    num_proc: int | None = None
    """Processes that tokenize and pack (datasets.map); None: the preset's (1)."""
    tokenizer_domains: list[str] = field(default_factory=list)
    """Domains the tokenizer is trained on (empty: the initial ones). Pin it so that adding a domain
    does not retrain the tokenizer (and with it every expert)."""
    seed_domains: list[str] = field(default_factory=list)
    """Domains the seed is pretrained on (empty: the initial ones); pin it like tokenizer_domains."""
    tokenizer_path: str | None = None
    vocab_size: int | None = None
    seq_len: int | None = None
    max_documents: int | None = None
    split_validation: float | None = None
    split_test: float | None = None
    embedding_model: str = "default"
    embedding_sample_size: int | None = None
    weighting: str = "proportional"
    general_share: float = 0.0
    extension_new_share: float = 0.5
    cache_dir: str = ".cache/nexus"
    """Downloaded corpora (Debian packages), shared between experiments; relative to the project home."""

    def to_data_config(
        self,
        experiment: str,
        out_dir: str,
        extra: dict[str, str] | None = None,
        keep: list[str] | None = None,
        tokenizer_path: str | None = None,
    ):
        """The `nexus.data.DataConfig`: the preset's domains (filtered), `folders` and `extra` folders."""
        from nexus.data import DomainConfig, preset

        base = (
            None
            if self.preset == "none"
            else (
                preset("tiny", corpora_dir=self.corpora_dir) if self.preset == "tiny" else preset(self.preset)
            )
        )
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
        wanted = keep if keep is not None else (self.domains or [d.name for d in domains if not d.held_out])
        unknown = sorted(set(wanted) - {d.name for d in domains} - set(self.folders) - set(self.hf))
        if unknown:
            raise ConfigError(
                f"data.domains: unknown domain(s) {unknown}; preset {self.preset!r} has "
                f"{[d.name for d in domains]}"
            )
        domains = [dataclasses.replace(d, held_out=False) for d in domains if d.name in wanted]
        folders = {n: p for n, p in self.folders.items() if keep is None or n in keep}
        domains += [DomainConfig.folder(n, p) for n, p in {**folders, **(extra or {})}.items()]
        hf_wanted = (
            wanted
            if keep is not None or self.domains
            else [n for n in self.hf if not self.hf_section(n).held_out]
        )
        domains += [self.hf_domain(n) for n in self.hf if n in hf_wanted]
        tok = {"path": tokenizer_path or self.tokenizer_path}
        if self.vocab_size:
            tok["vocab_size"] = self.vocab_size
        cfg = base or _empty_config()

        def replace(obj, **kw):
            return dataclasses.replace(obj, **{k: v for k, v in kw.items() if v is not None})

        return dataclasses.replace(
            cfg,
            experiment=experiment,
            domains=tuple(domains),
            out_dir=out_dir,
            cache_dir=self.cache_dir,
            tokenizer=replace(cfg.tokenizer, **tok),
            packing=replace(cfg.packing, seq_len=self.seq_len, num_proc=self.num_proc),
            splits=replace(cfg.splits, validation=self.split_validation, test=self.split_test),
            embedding=replace(
                cfg.embedding, model=self.embedding_model, sample_size=self.embedding_sample_size
            ),
            mixture=replace(
                cfg.mixture,
                weighting=self.weighting,
                general_share=self.general_share,
                extension_new_share=self.extension_new_share,
            ),
        )

    def hf_section(self, name: str) -> HFDomainSection:
        raw = self.hf[name]
        if isinstance(raw, HFDomainSection):
            return raw
        known = {f.name for f in dataclasses.fields(HFDomainSection)}
        if not isinstance(raw, dict) or set(raw) - known:
            raise ConfigError(f"data.hf.{name}: expected a mapping of {sorted(known)}, got {raw!r}")
        return HFDomainSection(**raw)

    def hf_domain(self, name: str):
        """The `nexus.data.DomainConfig` of `hf.<name>`."""
        from nexus.data import DomainConfig, SourceConfig

        h = self.hf_section(name)
        if h.path in ("", "???"):
            raise ConfigError(f"data.hf.{name}.path is required (a hub dataset, a directory or files)")
        try:
            src = SourceConfig(
                "hf",
                path=h.path,
                hf_config=h.name,
                hf_split=h.split,
                data_files=h.data_files,
                text_field=h.text_field,
                filter_field=h.filter_field,
                filter_value=h.filter_value,
                streaming=h.streaming,
                max_documents=h.max_documents or self.max_documents,
            )
        except ConfigError as err:
            raise ConfigError(f"data.hf.{name}: {err}") from err
        return DomainConfig(name, (src,))


def _empty_config():
    from nexus.data import DataConfig, DomainConfig

    return DataConfig("none", (DomainConfig.folder("placeholder", "."),))


@dataclass
class StagesConfig:
    """One TrainConfig per training stage."""

    seed: TrainConfig = field(default_factory=TrainConfig)
    expert: TrainConfig = field(default_factory=TrainConfig)
    moe: TrainConfig = field(default_factory=TrainConfig)
    extension: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class RouterSection:
    """The MoEs and baselines to build, and their MoE layer options (nexus.config.MoEConfig)."""

    routers: list[str] = field(default_factory=lambda: ["nexus", "linear"])
    dense_merge: bool = True
    sparse_upcycling: bool = False
    continued_seed: bool = False
    """Baseline: the seed trained on the MoE's data mix for as many tokens as the experts and one
    MoE consumed together (data-matched continued pretraining)."""
    init_seed: int = 0
    """Seed of the freshly initialised router weights (upcycling, and a linear router's new row)."""
    top_k: int = 1
    shared_expert: bool = True
    load_balance_coef: float = 0.05
    router_hidden: int | None = None
    dispatch: str = "sorted"
    """`sorted` (blocked per-expert GEMMs, fastest on CPU) or `grouped_mm` (grouped GEMMs, sync-free: GPUs)."""
    attention_experts: str = "none"
    """BAM attention experts: `none` (attention averaged), `full` (each expert's Q, K, V, O) or
    `shared_kv` (per-expert Q, O; averaged K, V: the dense model's KV cache). Routed by an attention
    router of the MoE's kind (Nexus: its own projection of the domain embeddings; or linear)."""
    attention_routing: str = "soft"
    """`soft` (every attention expert, weighted by the router; BAM's choice) or `top_k`."""
    attention_top_k: int = 1
    attention_shared_expert: bool = False
    """The seed's attention as an always-on attention expert."""

    def moe_options(self) -> dict[str, Any]:
        opts = {
            "top_k": self.top_k,
            "shared_expert": self.shared_expert,
            "load_balance_coef": self.load_balance_coef,
            "dispatch": self.dispatch,
        }
        if self.attention_experts != "none":  # only then: FFN-only MoEs keep their options and cache keys
            opts.update(
                attention_experts=self.attention_experts,
                attention_routing=self.attention_routing,
                attention_top_k=self.attention_top_k,
                attention_shared_expert=self.attention_shared_expert,
            )
        return {**opts, "router_hidden": self.router_hidden} if self.router_hidden else opts


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
    args = ([f"experiment={experiment}"] if experiment else []) + list(overrides)
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


def _leaf_keys(tree: Any, prefix: str = "") -> set[str]:
    if not isinstance(tree, dict) or not tree:
        return {prefix}
    return set().union(*(_leaf_keys(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in tree.items()))


def validate(cfg: PipelineConfig) -> None:
    """Checks that need the file system or several sections; raise before any training starts."""
    for name, folder in cfg.data.folders.items():
        check_domain_folder(folder, f"data.folders.{name}")
    for name in cfg.data.hf:
        cfg.data.hf_domain(name)
    bad = sorted(set(cfg.router.routers) - {"nexus", "linear"})
    if bad:
        raise ConfigError(f"router.routers: unknown router(s) {bad}; choose from ['linear', 'nexus']")
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
    if cfg.data.seq_len and cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
        )
    data = cfg.data.to_data_config(cfg.name, str(Path(cfg.out_dir) / "data"))  # DataConfig's own checks
    experts = [d.name for d in data.domains if not d.held_out]
    for router in cfg.router.routers:  # the MoE each router will get, built now rather than after training
        try:
            MoEConfig(expert_names=experts, router=router, **cfg.router.moe_options())
        except ConfigError as err:
            raise ConfigError(f"router section: {err}") from err


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
