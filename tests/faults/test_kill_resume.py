"""SIGKILL a real pipeline process at several points; the rerun (same command, same Prefect home)
must finish with the same final MoE digest as an uninterrupted run, reuse what was finished, and leave
no temporary files under the output root.

Kill points: during expert training (a Lightning `last.ckpt` exists), between stages (the seed's
final `model/` exists, before the experts finish), during a checkpoint write (the fault hook kills
after an expert's temporary checkpoint directory is filled, before its rename), during MoE training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

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


def resume_step(ckpt: Path) -> int | None:
    """The global step a Lightning resume checkpoint was written at; None if absent or cut short."""
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
    except Exception:
        return None


def any_resumable(paths):
    return lambda: any(resume_step(p) is not None for p in paths)


def logged_steps(log: str, stage: str) -> list[int]:
    """The steps of `stage`'s progress lines (`experts/lore: step 9/24 ...`, one per step here)."""
    return [int(m) for m in re.findall(rf"{re.escape(stage)}: step (\d+)/", log)]


def test_kill_during_expert_training(tmp_path, reference, api_url):
    out = tmp_path / "out"
    proc = start(out, *KILL_OVERRIDES, prefect_home=tmp_path / "prefect", api_url=api_url)
    lasts = [out / "experts" / d / "lightning" / "last.ckpt" for d in ("dictionary", "lore")]
    assert kill_when(proc, any_resumable(lasts)), "pipeline finished before an expert wrote last.ckpt"
    finish(proc)
    assert not (out / "moe").exists()
    at_kill = {p.parent.parent.name: resume_step(p) for p in lasts if p.exists()}
    killed_mid = [d for d, step in at_kill.items() if step is not None]
    assert killed_mid, f"no expert had a readable resume checkpoint at kill time: {at_kill}"
    seed_before = stage_digests(out)["seed/model"]
    log = Path(proc.log)  # type: ignore[attr-defined]
    before_rerun = log.stat().st_size  # the rerun appends to the same log
    summary = _rerun_and_compare(tmp_path, reference, api_url)
    assert summary["states"]["seed"] == "Cached"  # the finished seed is not redone
    assert stage_digests(out)["seed/model"] == seed_before
    # The interrupted experts resumed from their Lightning checkpoints, not from step 0 (a restart would
    # end at the same weights: training is deterministic): the rerun's first training step of each is
    # the one after the checkpoint's, and it trained only the remaining steps.
    rerun_log = log.read_bytes()[before_rerun:].decode(errors="replace")
    for d in killed_mid:
        steps = logged_steps(rerun_log, f"experts/{d}")
        assert steps and 0 < at_kill[d] < 24, (d, at_kill[d], rerun_log[-3000:])
        assert (min(steps), max(steps), len(steps)) == (at_kill[d] + 1, 24, 24 - at_kill[d]), (d, steps)
        config = json.loads((out / "experts" / d / "model" / "config.json").read_text())
        assert config["metadata"]["global_step"] == 24


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
