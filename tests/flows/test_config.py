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
    assert (cfg.router.top_k, cfg.router.load_balance_coef, cfg.data.vocab_size) == (1, 0.05, 256000)
    assert cfg.train.moe.lr == 1e-3 and cfg.train.moe.warmup_frac == 0.1 and cfg.model.parallel_blocks


def test_overrides_apply(tmp_path):
    cfg = compose("micro", micro_overrides(tmp_path, "train.expert.max_steps=7", "router.routers=[nexus]"))
    assert cfg.train.expert.max_steps == 7 and cfg.router.routers == ["nexus"]
    assert cfg.data.to_data_config("x", str(tmp_path)).initial_domains == ["dictionary", "lore"]


@pytest.mark.parametrize("override, needle", [
    ("train.expert.max_stepz=3", "max_stepz"),
    ("train.expert.max_steps=many", "train.expert.max_steps"),
    ("model.d_model=33", "d_model"),
    ("router.routers=[nexus,magic]", "magic"),
    ("data.domains=[nope]", "nope"),
    ("+data.folders.new=/does/not/exist", "/does/not/exist"),
])
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
        extend_with_expert("micro", micro_overrides(tmp_path), domain="x",
                           domain_folder=str(tmp_path / "missing-folder"))
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


@pytest.mark.parametrize("override, match", [
    ("router.dispatch=masks", "'sorted' or 'grouped_mm'"),
    ("router.top_k=3", r"top_k=3 exceeds the number of experts \(2\)"),
])
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
    with pytest.raises(DataError, match=r"domain 'code': embedding embedder .* has dimension 384, but the router expects 16"):
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
    cfg = compose("micro", ["out_dir=runs/a", "+data.folders.extra=docs"])
    assert cfg.home == str(home)
    assert cfg.out_dir == str(home / "runs" / "a") and cfg.extension.inbox == str(home / "runs" / "a" / "inbox")
    assert cfg.data.cache_dir == str(home / ".cache" / "nexus") and cfg.data.folders == {"extra": str(home / "docs")}
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
