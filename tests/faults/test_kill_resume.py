"""SIGKILL a real pipeline process at several points; the rerun (same command, same Prefect home)
must finish with the same final MoE digest as an uninterrupted run, reuse what was finished, and leave
no temporary files under the output root.

Kill points: during expert training (a Lightning `last.ckpt` exists), between stages (the seed's
final `model/` exists, before the experts finish), during a checkpoint write (the fault hook kills
after an expert's temporary checkpoint directory is filled, before its rename), during MoE training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import (
    KILL_OVERRIDES,
    final_digest,
    finish,
    kill_when,
    run,
    stage_digests,
    start,
    temp_leftovers,
)


def _rerun_and_compare(base: Path, reference, api_url: str, leftovers_ok: bool = False) -> dict:
    _, ref_digest, ref_stages = reference
    out = base / "out"
    code, log = run(out, *KILL_OVERRIDES, prefect_home=base / "prefect", api_url=api_url)
    assert code == 0, log[-3000:]
    assert final_digest(out) == ref_digest
    assert stage_digests(out) == ref_stages
    if not leftovers_ok:
        assert temp_leftovers(out) == [], temp_leftovers(out)
    return json.loads((out / "summary.json").read_text())


def _any(paths):
    return lambda: any(p.exists() for p in paths)


def test_kill_during_expert_training(tmp_path, reference, api_url):
    out = tmp_path / "out"
    proc = start(out, *KILL_OVERRIDES, prefect_home=tmp_path / "prefect", api_url=api_url)
    lasts = [out / "experts" / d / "lightning" / "last.ckpt" for d in ("dictionary", "lore")]
    assert kill_when(proc, _any(lasts)), "pipeline finished before an expert wrote last.ckpt"
    finish(proc)
    assert not (out / "moe").exists()
    killed_mid = [p.parent.parent.name for p in lasts if p.exists()]
    assert killed_mid, "no expert had a resume checkpoint at kill time"
    seed_before = stage_digests(out)["seed/model"]
    summary = _rerun_and_compare(tmp_path, reference, api_url)
    assert summary["states"]["seed"] == "Cached"  # the finished seed is not redone
    assert stage_digests(out)["seed/model"] == seed_before
    # the interrupted expert resumed from its Lightning checkpoint (not from step 0)
    resumed = [json.loads((out / "experts" / d / "model" / "config.json").read_text()) for d in killed_mid]
    assert all(r["metadata"]["global_step"] == 24 for r in resumed)


def test_kill_between_stages(tmp_path, reference, api_url):
    out = tmp_path / "out"
    proc = start(out, *KILL_OVERRIDES, prefect_home=tmp_path / "prefect", api_url=api_url)
    assert kill_when(proc, lambda: (out / "seed" / "model" / "config.json").exists())
    finish(proc)
    assert not (out / "upcycled").exists()
    summary = _rerun_and_compare(tmp_path, reference, api_url)
    assert summary["states"]["seed"] in ("Cached", "Completed")


@pytest.fixture(scope="module")
def killed_in_write(tmp_path_factory, reference, api_url):
    """The process group dies with `experts/lore/.model.tmp-*` complete but not yet renamed; then rerun."""
    base = tmp_path_factory.mktemp("kill-write")
    out = base / "out"
    proc = start(
        out,
        *KILL_OVERRIDES,
        prefect_home=base / "prefect",
        api_url=api_url,
        NEXUS_FAULT_KILL_WRITE=str(out / "experts" / "lore" / ".model.tmp-"),
    )
    log = finish(proc)
    assert proc.returncode == -9, log[-2000:]
    assert "FAULT: SIGKILL during checkpoint write" in log
    assert not (out / "experts" / "lore" / "model").exists()  # never a partial model/
    assert any(".model.tmp-" in p for p in temp_leftovers(out))  # the kill point was really hit
    summary = _rerun_and_compare(base, reference, api_url, leftovers_ok=True)
    return out, summary


def test_kill_during_checkpoint_write(killed_in_write):
    out, summary = killed_in_write
    assert summary["states"]["expert-lore"] == "Completed" and (out / "experts" / "lore" / "model").is_dir()


def test_no_temp_leftovers_after_kill_during_write(killed_in_write):
    out, _ = killed_in_write
    assert temp_leftovers(out) == []


@pytest.mark.slow
def test_kill_during_moe_training(tmp_path, reference, api_url):
    out = tmp_path / "out"
    proc = start(out, *KILL_OVERRIDES, prefect_home=tmp_path / "prefect", api_url=api_url)
    assert kill_when(proc, lambda: (out / "moe" / "nexus" / "lightning" / "last.ckpt").exists())
    finish(proc)
    summary = _rerun_and_compare(tmp_path, reference, api_url)
    assert summary["states"]["expert-lore"] == "Cached" and summary["states"]["build-nexus"] == "Cached"
