"""Corrupt checkpoints between two pipeline runs: the rerun must report the corruption (naming the
file) or rebuild the checkpoint, never silently use it. Runs in-process on the Prefect prefect_harness; each
test works on a copy of one finished micro run (a new out_dir, so Prefect's cache is cold unless the
test says otherwise)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nexus.errors import NexusError

from .conftest import overrides, stage_digests

EXTRA = ("router.routers=[nexus]", "router.dense_merge=false")
LORE = Path("experts") / "lore" / "model"


def _pipeline(out: Path) -> dict:
    from flows.pipeline import upcycle_pipeline

    return upcycle_pipeline("micro", overrides(out, *EXTRA))


@pytest.fixture(scope="module")
def finished(prefect_harness, tmp_path_factory):
    out = tmp_path_factory.mktemp("corrupt-base") / "out"
    _pipeline(out)
    return out, stage_digests(out)


def _copy(finished, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    return out


def _flip(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 if offset is None else offset] ^= 0x10
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["bit-flip", "truncate"])
def test_corrupt_expert_weights_are_reported(finished, tmp_path, damage):
    """Cold cache: the expert stage finds its finished model/, the upcycle step loads it with
    SHA-256 verification and fails naming the file (or, acceptably, the stage rebuilds it)."""
    out = _copy(finished, tmp_path)
    damage(out / LORE / "model.safetensors")
    try:
        _pipeline(out)
    except NexusError as err:
        assert str(out / LORE / "model.safetensors") in str(err) and "corrupt" in str(err), str(err)
    else:  # rebuilt: the expert verifies and equals the original
        assert stage_digests(out) == finished[1]
        from nexus.checkpoint import load_checkpoint

        load_checkpoint(out / LORE)


def test_corrupt_expert_config_is_rebuilt(finished, tmp_path):
    """A truncated config.json makes the stage unfinished: it is retrained, bit-identically."""
    out = _copy(finished, tmp_path)
    _truncate(out / LORE / "config.json")
    summary = _pipeline(out)
    assert summary["states"]["expert-lore"] == "Completed"
    assert stage_digests(out)["experts/lore/model"] == finished[1]["experts/lore/model"]


def test_corrupt_expert_under_warm_cache(prefect_harness, tmp_path):
    out = tmp_path / "out"
    _pipeline(out)
    _flip(out / LORE / "model.safetensors")
    try:
        _pipeline(out)
    except NexusError as err:
        assert "corrupt" in str(err)
        return
    from nexus.checkpoint import load_checkpoint

    load_checkpoint(out / LORE)  # rebuilt, so it verifies


def test_deleted_outputs_under_warm_cache(prefect_harness, tmp_path):
    """Outputs deleted by hand after a run: the cached tasks that made them run again rather than
    return paths to nothing."""
    out = tmp_path / "out"
    _pipeline(out)
    first = stage_digests(out)
    shutil.rmtree(out / "experts" / "lore")
    shutil.rmtree(out / "upcycled")
    shutil.rmtree(out / "data" / "main" / "embeddings")
    _pipeline(out)
    assert stage_digests(out) == first


def test_corrupt_resume_checkpoint(finished, tmp_path):
    """An interrupted expert (model/ absent) whose Lightning last.ckpt was cut short by the crash."""
    out = _copy(finished, tmp_path)
    shutil.rmtree(out / LORE)
    (out / "experts" / "lore" / "lightning").mkdir()
    (out / "experts" / "lore" / "lightning" / "last.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    try:
        _pipeline(out)
    except NexusError as err:
        assert "last.ckpt" in str(err), str(err)
    else:
        assert stage_digests(out)["experts/lore/model"] == finished[1]["experts/lore/model"]
        assert (out / "experts" / "lore" / "lightning" / "last.ckpt.corrupt").exists() or not (
            out / "experts" / "lore" / "lightning"
        ).exists()


def test_upcycle_router_init_is_seeded(finished, tmp_path):
    """The upcycled router does not depend on torch's global RNG state (else a resumed pipeline, whose
    process ran other things before upcycling, would end with another MoE than an uninterrupted one)."""
    import torch

    from flows.tasks import build_model

    out = finished[0]
    experts = {d: str(out / "experts" / d / "model") for d in ("dictionary", "lore")}
    embeddings = {d: str(out / "data" / "main" / "embeddings" / f"{d}.safetensors") for d in experts}
    digests = []
    for i, rng in enumerate((1, 2)):
        torch.manual_seed(rng)
        path = build_model.fn(
            kind="nexus",
            out_dir=str(tmp_path / f"b{i}"),
            seed=str(out / "seed" / "model"),
            experts=experts,
            embeddings=embeddings,
            moe_options={"top_k": 1, "shared_expert": True, "load_balance_coef": 0.05},
        )
        digests.append(json.loads((Path(path) / "config.json").read_text())["sha256"]["model.safetensors"])
    assert digests[0] == digests[1]
