"""The lineage records of the session's micro pipeline (read only), exactly: every stage run's
`nexus.inputs` names each input checkpoint with its weights' digest and the run that wrote it, and each
run's `nexus.checkpoint_sha256` is the digest of the checkpoint it produced (hashed here from the file)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mlflow import MlflowClient


def sha256(ckpt: str | Path) -> str:
    return hashlib.sha256((Path(ckpt) / "model.safetensors").read_bytes()).hexdigest()


def test_every_stage_run_names_its_inputs_and_their_producing_runs(micro_moe):
    out, uri, _, summary = micro_moe
    client = MlflowClient(uri)
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    runs = {r.info.run_name: r for r in children}
    ckpts = summary["checkpoints"]
    upcycled = {kind: out / "upcycled" / kind for kind in ("nexus", "linear")}

    def inputs(name: str) -> dict:
        tag = json.loads(runs[name].data.tags["nexus.inputs"])
        return {role: {**rec, "path": str(Path(rec["path"]).resolve())} for role, rec in tag.items()}

    def record(ckpt: str | Path, producer: str) -> dict:
        return {
            "path": str(Path(ckpt).resolve()),
            "sha256": sha256(ckpt),
            "run_id": runs[producer].info.run_id,
        }

    def produced(name: str) -> str:
        return runs[name].data.tags["nexus.checkpoint_sha256"]

    seed = record(ckpts["seed"], "seed")
    experts = {f"expert:{d}": record(ckpts[f"expert:{d}"], d) for d in ("dictionary", "lore")}
    assert inputs("seed") == {} and produced("seed") == sha256(ckpts["seed"])
    for d in ("dictionary", "lore"):
        assert inputs(d) == {"init": seed} and produced(d) == sha256(ckpts[f"expert:{d}"]), d
    for kind in ("nexus", "linear"):
        assert inputs(f"build-{kind}") == {"seed": seed, **experts}, kind
        assert produced(f"build-{kind}") == sha256(upcycled[kind])
        assert inputs(kind) == {"init": record(upcycled[kind], f"build-{kind}")}, kind
        assert produced(kind) == sha256(ckpts[f"moe:{kind}"])
