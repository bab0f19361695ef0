"""Every conf/ file composes; invalid overrides fail at compose time naming the key or path."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import CONF_DIR, compose
from flows.extend import extend_from_inbox, extend_with_expert
from flows.pipeline import upcycle_pipeline
from nexus.errors import ConfigError, NexusError

from .conftest import domain_folder, micro_overrides

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose(experiment, check=False)
    assert cfg.name == experiment and cfg.model.d_model > 0
    assert cfg.tracking.experiment == f"nexus-{experiment}"


def test_paper_configs_document_the_paper():
    cfg = compose("470m", check=False)
    assert (cfg.router.top_k, cfg.router.load_balance_coef, cfg.data.tokenizer.vocab_size) == (
        1,
        0.05,
        256000,
    )
    assert cfg.train.moe.lr == 1e-3 and cfg.train.moe.warmup_frac == 0.1 and cfg.model.parallel_blocks


def test_overrides_apply(tmp_path):
    cfg = compose("micro", micro_overrides(tmp_path, "train.expert.max_steps=7", "router.routers=[nexus]"))
    assert cfg.train.expert.max_steps == 7 and cfg.router.routers == ["nexus"]
    assert cfg.data.to_data_config("x", str(tmp_path)).initial_domains == ["dictionary", "lore"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.expert.max_stepz=3", "max_stepz"),
        ("train.expert.max_steps=many", "train.expert.max_steps"),
        ("model.d_model=33", "d_model"),
        ("router.routers=[nexus,magic]", "magic"),
        ("data.domains=[nope]", "nope"),
        ("+data.folders.new=/does/not/exist", "/does/not/exist"),
        ("+data.hf.news={pth:/data/news}", "data.hf.news"),
        ("train.moe.strategy=deepspeed", "train.strategy 'deepspeed'"),
        ("train.moe.grad_accum_steps=3", "grad_accum_steps=3"),
        ("runner.stages_per_gpu=0", "runner.stages_per_gpu"),
    ],
)
def test_invalid_override_names_the_key(tmp_path, override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        compose("micro", micro_overrides(tmp_path, override))


def test_empty_domain_folder_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        compose("micro", micro_overrides(tmp_path, f"+data.folders.new={tmp_path / 'empty'}"))


def test_flows_fail_before_training(prefect_harness, tmp_path):
    """Invalid input fails the flow run itself; no stage output directory is created."""
    with pytest.raises(ConfigError, match="max_stepz"):
        upcycle_pipeline("micro", micro_overrides(tmp_path, "train.seed.max_stepz=1"))
    with pytest.raises(NexusError, match="missing-folder"):
        extend_with_expert(
            "micro", micro_overrides(tmp_path), domain="x", domain_folder=str(tmp_path / "missing-folder")
        )
    with pytest.raises(ConfigError, match="train.extension.max_steps"):
        extend_with_expert("micro", micro_overrides(tmp_path, "train.extension.max_steps=many"), domain="x")
    with pytest.raises(ConfigError, match="cronn"):
        extend_from_inbox("micro", micro_overrides(tmp_path, "extension.cronn=x"))
    assert not (tmp_path / "seed").exists() and not (tmp_path / "extensions").exists()


def test_inbox_with_an_empty_domain_folder_fails_before_training(micro_moe, tmp_path):
    """Against the session's registered MoE: an empty new inbox folder fails the run, naming it,
    before any extension stage starts (also when another new folder is valid)."""
    out, _, overrides, _ = micro_moe
    inbox = tmp_path / "inbox"
    domain_folder(inbox / "aaa-valid", "kernel-docs")
    (inbox / "zzz-empty").mkdir()
    with pytest.raises(NexusError, match="zzz-empty"):
        extend_from_inbox("micro", overrides, inbox=str(inbox))
    assert not (out / "extensions" / "aaa-valid").exists()


@pytest.mark.parametrize(
    "override, match",
    [
        ("router.dispatch=masks", "'sorted' or 'grouped_mm'"),
        ("router.top_k=3", r"top_k=3 exceeds the number of experts \(2\)"),
    ],
)
def test_moe_options_are_checked_at_compose_time(override, match):
    with pytest.raises(ConfigError, match=match):
        compose("micro", [override])


def test_extension_refuses_an_embedder_of_another_dimension_before_training():
    """The packaged embedder gives 384-d vectors; a router built for 16-d embeddings must refuse it."""
    from flows.rounds import check_embedder
    from nexus.errors import DataError

    cfg = compose("micro", [])
    check_embedder(cfg, {"router": "nexus", "domain_embed_dim": 384}, "code")  # matches: no error
    check_embedder(cfg, {"router": "linear", "domain_embed_dim": 16}, "code")  # no embeddings used
    with pytest.raises(
        DataError, match=r"domain 'code': embedding embedder .* has dimension 384, but the router expects 16"
    ):
        check_embedder(cfg, {"router": "nexus", "domain_embed_dim": 16}, "code")


def test_every_default_path_resolves_against_the_project_home(tmp_path, monkeypatch):
    """Relative defaults and relative user overrides land in the project home ($NEXUS_HOME, or the
    `home` key a deployment records), never in the working directory of the process composing them."""
    home, elsewhere = tmp_path / "home", tmp_path / "worker-tmp"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "a.txt").write_text("a document of a folder domain, relative to the home")
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("NEXUS_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose(
        "micro", ["out_dir=runs/a", "+data.folders.extra=docs", "+data.sources.src={kind:folder,path:docs}"]
    )
    assert cfg.home == str(home)
    assert cfg.out_dir == str(home / "runs" / "a") and cfg.extension.inbox == str(
        home / "runs" / "a" / "inbox"
    )
    assert cfg.data.cache_dir == str(home / ".cache" / "nexus") and cfg.data.folders == {
        "extra": str(home / "docs")
    }
    assert cfg.data.sources == {"src": {"kind": "folder", "path": str(home / "docs")}}
    assert cfg.tracking.uri == f"sqlite:///{home}/outputs/mlflow.db"
    assert Path(cfg.data.corpora_dir).is_dir()  # the tiny preset's corpora come with the repository
    assert not any(elsewhere.iterdir())

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")  # the environment beats the default
    assert compose("micro", []).tracking.uri == "http://127.0.0.1:5999"
    assert compose("micro", ["tracking.uri=sqlite:///mine.db"]).tracking.uri == f"sqlite:///{home}/mine.db"
    other = tmp_path / "other"  # the recorded `home` beats $NEXUS_HOME
    assert compose("micro", [f"home={other}"]).out_dir == str(other / "outputs" / "micro")
    monkeypatch.delenv("NEXUS_HOME")
    assert compose("micro", []).out_dir == str(elsewhere / "outputs" / "micro")  # no home given: the cwd


@pytest.mark.parametrize(
    ("experiment", "named", "seed", "linear", "nexus"),
    [
        ("470m", 470e6, 467_682_304, 1_298_252_800, 1_312_834_560),
        ("2p8b", 2.8e9, 2_752_565_760, 9_044_226_560, 9_129_218_560),
    ],
)
def test_paper_experiments_compose_and_have_the_parameter_counts_of_their_names(
    experiment, named, seed, linear, nexus
):
    """The paper's Table 3, to the parameter: seed, MoE with a linear router, Nexus MoE (built on the
    meta device: no memory)."""
    import dataclasses

    import torch

    from nexus.model import Transformer, parameter_counts

    cfg = compose(experiment, [])
    domains = [d.name for d in cfg.data.to_data_config(experiment, "unused").domains]
    dense = dataclasses.replace(cfg.model, vocab_size=cfg.data.tokenizer.vocab_size)
    counts = {}
    with torch.device("meta"):
        counts["seed"] = parameter_counts(Transformer(dense))["total"]
        for router in ("linear", "nexus"):
            moe = dataclasses.replace(dense, moe=cfg.router.moe_config(domains, router))
            counts[router] = parameter_counts(Transformer(moe))
    assert counts["seed"] == seed and abs(seed - named) < 0.02 * named
    assert counts["linear"]["total"] == linear and counts["nexus"]["total"] == nexus
    assert counts["nexus"]["active_inference"] == counts["linear"]["active_inference"]  # E precomputed
    assert cfg.router.dispatch == "grouped_mm" and cfg.train.moe.grad_accum_steps > 1
    assert cfg.tracking.upload_checkpoints == "final"  # intermediate checkpoints stay out of MLflow


def test_hf_domain_declared_in_the_config_is_streamed_prepared_and_reused(tmp_path):
    """`+data.hf.<name>={...}` on a local `save_to_disk` dataset (SlimPajama-like rows, selected by a
    dotted meta field), prepared with the pipeline's data task; a rerun reuses every product."""
    from datasets import Dataset

    from flows.config import as_dict
    from flows.tasks import prepare_data
    from nexus.data import open_prepared

    from .conftest import CORPORA

    texts = [p.read_text() for p in sorted((CORPORA / "python-docs").rglob("*.txt"))]
    rows = [
        {"text": t, "meta": {"redpajama_set_name": "RedPajamaArXiv" if i % 3 else "RedPajamaC4"}}
        for i, t in enumerate(t for doc in texts for t in doc.split("\n\n") if len(t) > 40)
    ]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "slimpajama"))
    source = (
        f"+data.hf.papers={{path:{tmp_path / 'slimpajama'},filter_field:meta.redpajama_set_name,"
        f"filter_value:RedPajamaArXiv}}"
    )
    cfg = compose(
        "micro", micro_overrides(tmp_path, source, "data.domains=[dictionary,lore,papers]", "data.num_proc=2")
    )
    assert cfg.data.declared_domains()["papers"].sources[0].streaming and cfg.data.packing.num_proc == 2
    first = prepare_data.fn(data=as_dict(cfg.data), experiment=cfg.name, out_dir=str(tmp_path / "data"))
    data = open_prepared(first.dir)
    kept = sum(s.documents for s in data.domains["papers"].splits.values())
    assert kept == len(
        {r["text"].strip() for r in rows if r["meta"]["redpajama_set_name"] == "RedPajamaArXiv"}
    )
    assert first.token_counts["papers"] > 0 and first.config["packing"]["num_proc"] == 2
    assert (
        prepare_data.fn(data=as_dict(cfg.data), experiment=cfg.name, out_dir=str(tmp_path / "data")) == first
    )


def _fields(cls: type, prefix: str = "") -> list[str]:
    """Every field of a dataclass, recursively (tuple/list elements and nested dataclasses), dotted."""
    import dataclasses
    import typing

    paths = []
    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        inner = [t for t in (typ, *typing.get_args(typ)) if dataclasses.is_dataclass(t)]
        if not dataclasses.is_dataclass(
            typ
        ):  # a nested part counts by its fields; a tuple of them also whole
            paths.append(prefix + f.name)
        if inner:
            paths += _fields(inner[0], f"{prefix}{f.name}.")
    return paths


# MoEConfig field -> (override, expected value); `router.<field>` unless the override names its key.
MOE_VALUES = {
    "expert_names": ("data.domains=[dictionary,python-docs]", ["dictionary", "python-docs"]),
    "router": ("router.routers=[linear]", "linear"),
    "top_k": ("2", 2),
    "shared_expert": ("false", False),
    "normalize_gates": ("true", True),
    "domain_embed_dim": ("16", 16),
    "router_hidden": ("24", 24),
    "load_balance_coef": ("0.01", 0.01),
    "z_loss_coef": ("0.001", 0.001),
    "dispatch": ("grouped_mm", "grouped_mm"),
    "attention_experts": ("full", "full"),
    "attention_routing": ("top_k", "top_k"),
    "attention_top_k": ("2", 2),
    "attention_shared_expert": ("true", True),
}


def test_every_moe_config_field_is_set_from_the_command_line_and_reaches_the_upcycled_moe(tmp_path):
    """Each MoEConfig field (enumerated from the dataclass: a new field fails here until it is covered)
    overridden alone; the MoE that upcycling builds from what the pipeline passes carries it."""
    import torch

    from nexus.config import MoEConfig, tiny
    from nexus.model import Transformer
    from nexus.upcycling import upcycle

    assert set(_fields(MoEConfig)) == set(MOE_VALUES)
    seed = Transformer(tiny())
    for name, (value, expected) in MOE_VALUES.items():
        override = value if "=" in value else f"router.{name}={value}"
        cfg = compose("micro", micro_overrides(tmp_path, override))
        experts = cfg.data.to_data_config(cfg.name, str(tmp_path)).initial_domains
        built = {r: cfg.router.moe_config(experts, r) for r in cfg.router.routers}
        dim = cfg.router.domain_embed_dim or 384
        for router, moe in built.items():  # what build_model gets: moe_kwargs(), experts and the router
            model = upcycle(
                seed,
                [seed] * len(experts),
                domain_embeddings=torch.randn(len(experts), dim),
                router=router,
                expert_names=experts,
                **cfg.router.moe_kwargs(),
            )
            assert model.config.moe == moe, name
            assert getattr(moe, name) == expected, (name, getattr(moe, name))


def _data_values(tmp_path: Path) -> dict[str, tuple[list[str], object]]:
    """DataConfig field -> (overrides, expected value in the built DataConfig, or a check of it)."""
    corpus = str(tmp_path / "corpus")
    on_extra = ["data.domains=[dictionary,lore,extra]"]

    def extra(spec: str) -> str:
        return f"+data.sources.extra={{kind:folder,path:{corpus},{spec}}}"

    def source(field: str, value: str, expected: object, **more: str):
        spec = ",".join([f"{field}:{value}", *(f"{k}:{v}" for k, v in more.items())])
        return [extra(spec), *on_extra], lambda d: getattr(d.domains[-1].sources[0], field) == expected

    values: dict[str, tuple[list[str], object]] = {
        "experiment": (["name=other"], "other"),
        "domains": (["data.domains=[lore]"], lambda d: [x.name for x in d.domains] == ["lore"]),
        "domains.name": (
            [extra("format:auto"), *on_extra],
            lambda d: [x.name for x in d.domains] == ["dictionary", "lore", "extra"],
        ),
        "domains.sources": (
            [
                f"+data.sources.extra={{sources:[{{kind:folder,path:{corpus}}},{{kind:stdlib}}]}}",
                *on_extra,
            ],
            lambda d: [s.kind for s in d.domains[-1].sources] == ["folder", "stdlib"],
        ),
        "domains.held_out": (
            [extra("held_out:true")],
            lambda d: "extra" not in d.initial_domains,
        ),
        "domains.sources.kind": source("kind", "stdlib", "stdlib"),
        "domains.sources.package": source("package", "dict-gcide", "dict-gcide"),
        "domains.sources.path": source("path", f"{corpus}/sub", f"{corpus}/sub"),
        "domains.sources.format": source("format", "dictd", "dictd"),
        "domains.sources.text_field": source("text_field", "body", "body"),
        "domains.sources.hf_config": source("hf_config", "sub", "sub"),
        "domains.sources.hf_split": source("hf_split", "test", "test"),
        "domains.sources.data_files": source("data_files", "x.jsonl", "x.jsonl"),
        "domains.sources.filter_field": source("filter_field", "meta.set", "meta.set", filter_value="a"),
        "domains.sources.filter_value": source("filter_value", "a", "a", filter_field="meta.set"),
        "domains.sources.streaming": source("streaming", "false", False),
        "domains.sources.max_documents": source("max_documents", "5", 5),
        "domains.sources.skip_undecodable": source("skip_undecodable", "true", True),
        "out_dir": ([f"out_dir={tmp_path}/runs"], lambda d: d.out_dir.startswith(f"{tmp_path}/runs/")),
        "cache_dir": ([f"data.cache_dir={tmp_path}/cache"], f"{tmp_path}/cache"),
        "mixture.weights": (
            ["data.mixture.weighting=explicit", "data.mixture.weights={dictionary:1.0,lore:2.0}"],
            {"dictionary": 1.0, "lore": 2.0},
        ),
        "tokenizer.path": ([f"data.tokenizer.path={tmp_path}/tok.json"], f"{tmp_path}/tok.json"),
    }
    simple = {
        "splits": {"validation": 0.1, "test": 0.15, "salt": "pepper", "min_chars": 5},
        "tokenizer": {
            "vocab_size": 400,
            "sample_chars_per_domain": 1000,
            "min_frequency": 3,
            "eos_token": "E",
        },
        "packing": {"seq_len": 16, "num_proc": 2, "batch_size": 7},
        "mixture": {"weighting": "uniform", "general_share": 0.3, "extension_new_share": 0.7, "seed": 5},
        "embedding": {
            "model": "another-embedder",
            "sample_size": 3,
            "batch_size": 4,
            "max_chars": 50,
            "max_chunks_per_doc": 2,
            "expected_dim": 16,
            "seed": 1,
            "enabled": False,
        },
    }
    for part, fields in simple.items():
        for name, value in fields.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            values[f"{part}.{name}"] = ([f"data.{part}.{name}={text}"], value)
    return values


def test_every_data_config_field_is_set_from_the_command_line_and_reaches_the_built_data_config(tmp_path):
    """Each DataConfig field, nested parts and a declared domain's sources included (enumerated from the
    dataclasses: a new field fails here until it is covered), overridden on the micro experiment; the
    DataConfig the pipeline's data task builds (`to_data_config(name, <out_dir>/data)`) carries it."""
    from functools import reduce

    from nexus.data import DataConfig

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("a document of the declared domain")
    values = _data_values(tmp_path)
    assert set(_fields(DataConfig)) == set(values)
    for name, (overrides, expected) in values.items():
        cfg = compose("micro", micro_overrides(tmp_path, *overrides))
        data = cfg.data.to_data_config(cfg.name, f"{cfg.out_dir}/data/main")
        if callable(expected):
            assert expected(data), (name, data)
        else:
            assert reduce(getattr, name.split("."), data) == expected, name


def test_groups_split_by_concern_set_their_part_of_the_router_section(tmp_path):
    """`router=` picks the MoEs, `baselines=` the baselines, `moe=` the layer options (conf/<group>/)."""
    cfg = compose("micro", micro_overrides(tmp_path, "router=nexus", "baselines=all"))
    assert cfg.router.routers == ["nexus"] and cfg.router.continued_seed and cfg.router.sparse_upcycling
    default = compose("micro", micro_overrides(tmp_path, "baselines=none")).router
    assert (default.routers, default.dense_merge, default.top_k) == (["nexus", "linear"], False, 1)
    groups = {p.parent.name for p in CONF_DIR.glob("*/*.yaml")}
    assert {"router", "moe", "baselines", "data", "model", "train", "recipe", "experiment"} <= groups
