"""The project home: the one root every default location resolves from.

    home = the `home` config key (`nexus deploy` records it in each deployment's overrides)
           else $NEXUS_HOME
           else the working directory of the command that composed the config (`make demo`, `nexus`)

Under it, by default: `outputs/<experiment>/` (checkpoints, summaries, reports, the inbox),
`outputs/mlflow.db` + `outputs/mlartifacts/` (the MLflow store, unless $MLFLOW_TRACKING_URI is set),
`.cache/nexus/` (downloaded corpora) and `.prefect/results/` (Prefect's task results, unless Prefect's
own result settings are set). Relative paths in user overrides resolve against the home too, so a
worker running a flow in a temporary directory writes where the user looks.
Precedence for the tracking store: `tracking.uri=...` > $MLFLOW_TRACKING_URI > the home's SQLite store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

HOME_ENV = "NEXUS_HOME"
FIXTURE_CORPORA = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "corpora"
"""The `tiny` preset's corpora (small real text committed with the repository)."""
PREFECT_RESULT_SETTINGS = (
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
    "PREFECT_LOCAL_STORAGE_PATH",
    "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK",
    "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK",
)


def project_home(configured: str | None = None) -> Path:
    """The absolute project home (see the module doc)."""
    return Path(configured or os.environ.get(HOME_ENV) or os.getcwd()).expanduser().resolve()


def at_home(path: str | None, home: Path) -> str | None:
    """`path` made absolute against `home` (None stays None)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else home / p)


def tracking_uri(uri: str | None, home: Path) -> str:
    """The MLflow tracking URI: `uri` if given, else $MLFLOW_TRACKING_URI, else SQLite in the home;
    a relative SQLite or local path resolves against the home."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///outputs/mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{at_home(uri.removeprefix('sqlite:///'), home)}"
    if "://" not in uri and not uri.startswith("file:"):
        return str(at_home(uri, home))
    return uri


def resolve_paths(cfg: Any, home: Path) -> None:
    """Make every path of a `PipelineConfig` absolute against `home`, in place; fill the defaults that
    depend on the environment (corpora, tracking URI)."""
    cfg.home = str(home)
    cfg.out_dir = at_home(cfg.out_dir, home)
    cfg.seed_checkpoint = at_home(cfg.seed_checkpoint, home)
    data = cfg.data
    data.corpora_dir = at_home(data.corpora_dir, home) if data.corpora_dir else str(FIXTURE_CORPORA)
    data.cache_dir = at_home(data.cache_dir, home)
    data.tokenizer.path = at_home(data.tokenizer.path, home)
    data.folders = {name: at_home(folder, home) for name, folder in data.folders.items()}
    data.sources = {name: _source_at_home(spec, home) for name, spec in data.sources.items()}
    cfg.extension.inbox = at_home(cfg.extension.inbox, home)
    cfg.tracking.uri = tracking_uri(cfg.tracking.uri, home)


def _source_at_home(spec: Any, home: Path) -> Any:
    """A `data.sources` entry with the `path` of a local-path kind made absolute (the rest unchanged:
    a malformed entry fails in DataSection, naming it)."""
    from nexus.data.sources import SOURCES

    if isinstance(spec, dict) and isinstance(spec.get("sources"), list):
        return {**spec, "sources": [_source_at_home(s, home) for s in spec["sources"]]}
    source = SOURCES.get(spec.get("kind")) if isinstance(spec, dict) else None
    if source is not None and source.local_path and spec.get("path"):
        return {**spec, "path": at_home(spec["path"], home)}
    return spec


def prefect_env(home: str | Path) -> dict[str, str]:
    """Prefect settings for runs of this home: task results under `<home>/.prefect/results`, unless a
    result setting of Prefect's own is set (e.g. a shared `PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`)."""
    if any(os.environ.get(k) for k in PREFECT_RESULT_SETTINGS):
        return {}
    return {"PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(Path(home) / ".prefect" / "results")}


def offline_env(home: str | None = None) -> None:
    """Environment defaults of every `nexus` command (set only where the user has not): offline hubs,
    no telemetry, training progress in Prefect's logs, Prefect's task results in the project home."""
    defaults = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "nexus",
        **prefect_env(project_home(home)),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
