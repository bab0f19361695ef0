"""Model lines: one registered model per experiment and router whose versions are the upcycled MoE and
every extension or removal built from it. Two aliases move along a line:

  candidate   the newest version;
  champion    the version extensions, the inbox and evaluation build on by default. The first upcycled
              MoE starts as champion; a later version becomes champion only when its promotion gate
              passed (`nexus.evaluation.gate`).

A model reference is accepted wherever a model is: a checkpoint directory, `models:/<name>/<version>`,
`models:/<name>@<alias>`, or a registered model name (its `@champion`). `resolve_model` checks a
reference and reads the checkpoint's config without writing anything; `fetch_checkpoint` then gives
a local directory (the artifact itself for a local store, else a download into a cache).

Versions of a line are serialised by `model_line_lock` (a file lock held from resolving the base to
registering the result), so two extensions at once build one on the other instead of both on the
same base.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from nexus.config import DEFAULT_ROUTER
from nexus.errors import CheckpointError, ConfigError

CHAMPION, CANDIDATE = "champion", "candidate"
TAG_GATE, TAG_BASE, TAG_DOMAIN = "nexus.gate", "nexus.base", "nexus.change"
log = logging.getLogger("nexus.flows")


@dataclass(frozen=True)
class ResolvedModel:
    """A checked model reference: where its checkpoint is and which registered version it is."""

    ref: str
    config: dict[str, Any] = field(repr=False)
    """The checkpoint's config.json (model, metadata, weights' SHA-256)."""
    path: str | None = None
    """A local checkpoint directory, when the reference is one or the store's artifacts are local."""
    name: str | None = None
    version: str | None = None
    source: str | None = None
    """The artifact URI of the registered version's checkpoint (downloaded by `fetch_checkpoint` when
    not local)."""
    run_id: str | None = None
    """The MLflow run that registered the version."""

    @property
    def label(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.name else str(self.path)

    @property
    def sha256(self) -> str | None:
        return self.config.get("sha256", {}).get("model.safetensors")

    @property
    def moe(self) -> dict[str, Any]:
        moe = self.config["model"].get("moe")
        if moe is None:
            raise ConfigError(f"{self.ref}: {self.label} is a dense model, not an MoE")
        return moe

    def describe(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "path": self.path,
            "sha256": self.sha256,
        }


def is_path_ref(ref: str) -> bool:
    return not ref.startswith("models:/") and (Path(ref).exists() or "/" in ref or ref.startswith("."))


def parse_registry_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`models:/name/3` -> (name, "3", None); `models:/name@alias` or `name@alias` -> (name, None, alias);
    `name` -> (name, None, "champion")."""
    body = ref.removeprefix("models:/")
    name, at, alias = body.partition("@")
    name, slash, version = name.partition("/")
    if (
        not name
        or (at and not alias)
        or (slash and not version.isdigit())
        or (at and slash)
        or "/" in version
    ):
        raise ConfigError(
            f"model reference {ref!r}: expected a checkpoint directory, models:/<name>/<version>, "
            "models:/<name>@<alias> or a registered model name"
        )
    return name, version or None, (alias or None) if at else (None if version else CHAMPION)


def check_store(tracking_uri: str, what: str) -> None:
    """A SQLite store must exist already: reading a missing one would create it (and its folder)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(
            f"{what}: there is no MLflow store at {tracking_uri} (run the pipeline first, or "
            "pass a checkpoint directory)"
        )


def resolve_model(
    ref: str | None, default_name: str, tracking_uri: str, what: str = "model"
) -> ResolvedModel:
    """Check `ref` (None: `default_name@champion`) and read its checkpoint config; writes nothing.
    Raises ConfigError naming `what` and the reference."""
    from nexus.checkpoint import read_checkpoint_config  # imports torch: only once a model is asked for

    ref = ref or f"models:/{default_name}@{CHAMPION}"
    if is_path_ref(ref):
        try:
            return ResolvedModel(ref, read_checkpoint_config(ref), path=str(Path(ref).resolve()))
        except CheckpointError as err:
            raise ConfigError(f"{what} {ref!r}: {err}") from err
    name, version, alias = parse_registry_ref(ref)
    check_store(tracking_uri, f"{what} {ref!r}")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        raise ConfigError(
            f"{what} {ref!r}: no registered model {name!r} in {_redacted(tracking_uri)}"
        ) from err
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except MlflowException as err:
        have = sorted(client.get_registered_model(name).aliases)
        raise ConfigError(
            f"{what} {ref!r}: {name!r} has no "
            + (f"alias {alias!r} (aliases: {have or 'none'})" if alias else f"version {version}")
        ) from err
    from flows.mlflow_models import checkpoint_uri

    source = checkpoint_uri(mv.source, client)
    local = _local_dir(source)
    try:
        config = read_checkpoint_config(local) if local else _remote_config(source)
    except CheckpointError as err:
        raise ConfigError(
            f"{what} {ref!r}: version {mv.version} of {name!r} is not a Nexus checkpoint ({err})"
        ) from err
    return ResolvedModel(ref, config, str(local) if local else None, name, str(mv.version), source, mv.run_id)


def fetch_checkpoint(model: ResolvedModel, cache_dir: str | os.PathLike) -> str:
    """A local checkpoint directory for `model`: its own path, or a download of the registered version
    into `cache_dir/<name>/v<version>` (atomic: a crash leaves no partial copy; reused next time)."""
    from nexus.checkpoint import CONFIG, read_checkpoint_config

    if model.path:
        return model.path
    dest = Path(cache_dir) / str(model.name) / f"v{model.version}"
    if (dest / CONFIG).is_file() and read_checkpoint_config(dest).get("sha256") == model.config.get("sha256"):
        return str(dest)
    import mlflow

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".tmp-v{model.version}-") as tmp:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.source, dst_path=tmp))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(got, dest)
    return str(dest)


def _local_dir(source: str | None) -> Path | None:
    if not source:
        return None
    parsed = urlparse(source)
    path = (
        Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(source) if not parsed.scheme else None
    )
    return path if path is not None and path.is_dir() else None


def _remote_config(source: str) -> dict[str, Any]:
    import mlflow

    from nexus.checkpoint import CONFIG

    with tempfile.TemporaryDirectory() as tmp:  # outside every output tree
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/{CONFIG}", dst_path=tmp)
        data = json.loads(Path(path).read_text())
    if data.get("format") != "nexus-checkpoint":
        raise CheckpointError(f"{source}/{CONFIG} is not a nexus-checkpoint config")
    return data


def _redacted(uri: str) -> str:
    from flows.tracking import resolved

    return resolved(uri)


def line_aliases(name: str, client: Any = None) -> dict[str, str]:
    """{alias: version} of registered model `name`."""
    from mlflow import MlflowClient

    return {a: str(v) for a, v in (client or MlflowClient()).get_registered_model(name).aliases.items()}


def champion_version(name: str, client: Any = None) -> str | None:
    return line_aliases(name, client).get(CHAMPION)


def mark_version(
    name: str,
    version: str,
    *,
    promote: bool,
    gate: str,
    base: str | None = None,
    change: str | None = None,
    client: Any = None,
) -> dict[str, str]:
    """Give `version` the `candidate` alias, and `champion` when `promote`; tag its gate verdict
    (`passed`/`failed`/`initial`), its base (a model label) and its change (e.g. `+code`, `-lore`).
    Returns the line's aliases afterwards."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    client.set_registered_model_alias(name, CANDIDATE, version)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    for key, value in {TAG_GATE: gate, TAG_BASE: base, TAG_DOMAIN: change}.items():
        if value is not None:
            client.set_model_version_tag(name, version, key, value)
    return line_aliases(name, client)


def versions_built_on(name: str, base: str, client: Any = None) -> list[dict[str, str]]:
    """Versions of line `name` built on model label `base`: [{version, change, gate}], oldest first."""
    from mlflow import MlflowClient

    found = (client or MlflowClient()).search_model_versions(f"name = '{name}'")
    return sorted(
        (
            {
                "version": str(v.version),
                "change": v.tags.get(TAG_DOMAIN, ""),
                "gate": v.tags.get(TAG_GATE, ""),
            }
            for v in found
            if v.tags.get(TAG_BASE) == base
        ),
        key=lambda v: int(v["version"]),
    )


def builds_on_champion(base: ResolvedModel, line: str, tracking_uri: str) -> bool:
    """Whether `base` holds the weights of `line`'s champion (True when the line has no champion yet)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        champion = champion_version(line, MlflowClient(tracking_uri))
    except MlflowException:
        return True
    if champion is None:
        return True
    return resolve_model(f"models:/{line}/{champion}", line, tracking_uri).sha256 == base.sha256


def lock_dir(tracking_uri: str, out_dir: str) -> Path:
    """Where model-line locks live: next to a SQLite store (every experiment using it shares them),
    else in the output directory."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / ".locks"
    return Path(out_dir).resolve() / ".locks"


@contextlib.contextmanager
def model_line_lock(lock_dir: str | os.PathLike, name: str) -> Iterator[float]:
    """Hold the model line's lock (an advisory file lock: processes on this machine, or on a shared file
    system); yields the seconds waited for it."""
    path = Path(lock_dir) / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            log.info(
                "model line %s is busy (%s); waiting for it", name, handle.read().strip() or "another run"
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}")
        handle.flush()
        try:
            yield time.monotonic() - start
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def domain_record(data_dir: str, fingerprint: str, embedding: str | None = None) -> dict[str, Any]:
    """Where one domain a model serves was prepared: kept in checkpoint metadata (`domain_data`) and
    carried forward by every extension, so later rounds can mix, validate and evaluate it."""
    return {"data_dir": str(data_dir), "fingerprint": fingerprint, "embedding": embedding}


def domain_records(config: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """{domain: domain_record} of every domain a checkpoint serves (config: its config.json). Checkpoints
    written before these records knew only the pipeline's own data directory: that still works for
    the pipeline's domains, and names the domain otherwise."""
    meta = config.get("metadata", {})
    if "domain_data" in meta:
        order = (config["model"].get("moe") or {}).get("expert_names") or meta.get("domains") or []
        records = meta["domain_data"]  # config.json sorts keys: give them the experts' order again
        return {
            d: records[d] for d in sorted(records, key=lambda d: order.index(d) if d in order else len(order))
        }
    from nexus.data import open_prepared
    from nexus.data.cache import fingerprint as hash_json

    if "data_dir" not in meta:
        raise ConfigError(f"{where}: the checkpoint's metadata names no prepared data (domain_data/data_dir)")
    data = open_prepared(meta["data_dir"])
    records = {}
    for domain in meta.get("domains", []):
        if domain not in data.domains:
            raise ConfigError(
                f"{where}: the checkpoint does not record where domain {domain!r} was prepared "
                f"(written before domain records); extend the version it was built from"
            )
        fp = hash_json([data.domains[domain].fingerprint, data.tokenizer_fingerprint])
        records[domain] = domain_record(meta["data_dir"], fp, str(data.embedding_path(domain)))
    return records


def line_name(model_name: str, router: str) -> str:
    """The registered model holding the MoEs of one router: `tracking.model_name` for the default (Nexus)
    router, with the router as suffix for the others (e.g. `nexus-demo-moe-linear`)."""
    return model_name if router == DEFAULT_ROUTER else f"{model_name}-{router}"
