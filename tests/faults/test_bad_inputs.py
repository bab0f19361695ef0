"""Fail fast: each bad input makes `upcycle_pipeline` raise a NexusError naming the key, file or
domain at fault before the first training step, and leaves no stage directory, checkpoint or
summary behind. Inputs the pipeline does not yet catch up front are strict xfails (the fix is in
docs/reliability.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from nexus.errors import NexusError

from .conftest import CORPORA, overrides, stage_dirs


def _folder(tmp: Path, name: str, files: dict[str, bytes]) -> Path:
    folder = tmp / "inputs" / name
    folder.mkdir(parents=True, exist_ok=True)
    for fname, data in files.items():
        (folder / fname).write_bytes(data)
    return folder


def _checkpoint(
    tmp: Path,
    name: str,
    *,
    vocab_size: int = 300,
    moe: bool = False,
    corrupt: bool = False,
    d_model: int | None = None,
) -> Path:
    """A small nexus checkpoint (random weights) to pass as `seed_checkpoint`."""
    import dataclasses

    from flows.config import compose
    from nexus.checkpoint import save_checkpoint
    from nexus.config import ModelConfig
    from nexus.model.transformer import Transformer

    model_cfg = dataclasses.replace(
        compose("micro", [f"data.corpora_dir={CORPORA}"], check=False).model, vocab_size=vocab_size, moe=None
    )
    if d_model:
        model_cfg = dataclasses.replace(model_cfg, d_model=d_model)
    if moe:
        model_cfg = model_cfg.with_moe(expert_names=["a", "b"], router="linear")
    path = save_checkpoint(Transformer(ModelConfig.from_dict(model_cfg.to_dict())), tmp / "inputs" / name)
    if corrupt:
        weights = path / "model.safetensors"
        raw = bytearray(weights.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        weights.write_bytes(bytes(raw))
    return path


LATIN1 = "café au lait ".encode("latin-1") * 50
BAD_JSONL = b'{"text": "a fine document"}\n{oops\n'

# (id, overrides(tmp) -> list, words the message must contain)
Case = tuple[str, Callable[[Path], list[str]], tuple[str, ...]]
CASES: list[Case] = [
    ("unknown-key", lambda t: ["model.n_wings=2"], ("n_wings",)),
    ("typo-key", lambda t: ["train.expert.max_stepz=3"], ("max_stepz",)),
    ("wrong-type", lambda t: ["train.expert.max_steps=many"], ("max_steps",)),
    ("zero-steps", lambda t: ["train.moe.max_steps=0"], ("max_steps",)),
    ("negative-lr", lambda t: ["train.expert.lr=-0.1"], ("lr",)),
    ("unknown-router", lambda t: ["router.routers=[nexus,bogus]"], ("router.routers", "bogus")),
    ("unknown-runner", lambda t: ["runner.kind=mpi"], ("runner.kind", "mpi")),
    ("missing-seed-checkpoint", lambda t: [f"seed_checkpoint={t}/nope"], ("seed_checkpoint", "nope")),
    ("seq-len-too-long", lambda t: ["data.packing.seq_len=100000"], ("data.packing.seq_len",)),
    ("unknown-domain", lambda t: ["data.domains=[dictionary,atlantis]"], ("atlantis",)),
    ("missing-folder", lambda t: [f"+data.folders.extra={t}/missing"], ("data.folders.extra", "missing")),
    (
        "empty-folder",
        lambda t: [f"+data.folders.extra={_folder(t, 'empty', {})}"],
        ("data.folders.extra", "empty"),
    ),
    (
        "empty-files-only",
        lambda t: [f"+data.folders.extra={_folder(t, 'zero', {'a.txt': b''})}"],
        ("data.folders.extra", "empty"),
    ),
    (
        "duplicate-domain",
        lambda t: [f"+data.folders.lore={_folder(t, 'lore2', {'a.txt': b'more lore'})}"],
        ("lore", "twice"),
    ),
    (
        "bad-domain-name",
        lambda t: [f"+data.folders._x={_folder(t, 'x', {'a.txt': b'text'})}"],
        ("'_x'", "domain name"),
    ),
    ("vocab-too-small", lambda t: ["data.vocab_size=100"], ("vocab_size",)),
    (
        "splits-over-one",
        lambda t: ["data.split_validation=0.7", "data.split_test=0.5"],
        ("validation", "test"),
    ),
    ("bad-weighting", lambda t: ["data.weighting=loudest"], ("weighting", "loudest")),
    (
        "undecodable-text",
        lambda t: [f"+data.folders.extra={_folder(t, 'latin1', {'a.txt': LATIN1})}"],
        ("extra", "a.txt", "UTF-8"),
    ),
    (
        "malformed-jsonl",
        lambda t: [f"+data.folders.extra={_folder(t, 'jsonl', {'d.jsonl': BAD_JSONL})}"],
        ("extra", "d.jsonl:2", "JSON"),
    ),
    ("missing-corpora", lambda t: [f"data.corpora_dir={t}/no-corpora"], ("no-corpora",)),
]

# Inputs checked against the file system, the prepared data or the embedder (still before training).
LATE: list[Case] = [
    ("appended-unknown-key", lambda t: ["+model.n_wings=2"], ("n_wings",)),
    (
        "corrupt-seed-checkpoint",
        lambda t: [f"seed_checkpoint={_checkpoint(t, 'flipped', corrupt=True)}"],
        ("flipped", "corrupt"),
    ),
    ("moe-as-seed", lambda t: [f"seed_checkpoint={_checkpoint(t, 'moe', moe=True)}"], ("moe", "MoE")),
    (
        "seed-vocab-mismatch",
        lambda t: [f"seed_checkpoint={_checkpoint(t, 'vocab512', vocab_size=512)}"],
        ("vocab512", "vocab"),
    ),
    (
        "seed-without-tokenizer",
        lambda t: [f"seed_checkpoint={_checkpoint(t, 'notok')}"],
        ("notok", "tokenizer"),
    ),
    (
        "unknown-embedding-model",
        lambda t: [f"data.embedding_model={t}/no-such-embedder"],
        ("no-such-embedder",),
    ),
    ("unknown-eval-split", lambda t: ["eval.split=holdout"], ("eval.split", "holdout")),
    ("out-dir-is-a-file", lambda t: [], ("out_dir",)),
]
LATE_REASONS: dict[str, str] = {}  # inputs still caught late (strict xfails): none left


def _check(
    tmp_path: Path, make: Callable[[Path], list[str]], words: tuple[str, ...], out_as_file: bool = False
):
    from flows.pipeline import upcycle_pipeline

    out = tmp_path / "out"
    extra = make(tmp_path)
    if out_as_file:
        out.write_text("not a directory")
    with pytest.raises(NexusError) as err:
        upcycle_pipeline(
            "micro",
            overrides(
                out,
                "router.routers=[nexus]",
                "router.dense_merge=false",
                *extra,
                cache_dir=tmp_path / "cache",
            ),
        )
    message = str(err.value)
    assert all(w.lower() in message.lower() for w in words), message
    if out.is_dir():
        assert stage_dirs(out) == [], stage_dirs(out)
    return message


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_fast(prefect_harness, tmp_path, case):
    _, make, words = case
    _check(tmp_path, make, words)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            c,
            marks=[pytest.mark.xfail(strict=True, reason=LATE_REASONS[c[0]])] if c[0] in LATE_REASONS else [],
        )
        for c in LATE
    ],
    ids=[c[0] for c in LATE],
)
def test_bad_input_checked_before_training(prefect_harness, tmp_path, case):
    name, make, words = case
    _check(tmp_path, make, words, out_as_file=name == "out-dir-is-a-file")


def test_errors_reach_the_cli_as_one_line(tmp_path):
    """`nexus run` turns a NexusError into `nexus run: error: <message>` and exit status 2."""
    import subprocess

    from .conftest import PYTHON, ROOT, env_for

    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "flows.cli",
            "run",
            "--experiment",
            "micro",
            "pipeline",
            *overrides(tmp_path / "out", "runner.kind=mpi"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env_for(tmp_path / "prefect"),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "nexus run: error:" in proc.stderr and "runner.kind" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_experiment_after_flow():
    """The documented form `nexus run pipeline --experiment micro key=value ...` parses."""
    from flows.cli import parse_args

    args = parse_args(["run", "pipeline", "--experiment", "micro", "out_dir=x", "a.b=1"])
    assert args.experiment == "micro" and args.overrides == ["out_dir=x", "a.b=1"]
    with pytest.raises(SystemExit):
        parse_args(["run", "pipeline", "--experiment", "micro", "--bogus"])


FAIL_FAST = """
import sys
from flows.cli import main
code = main(sys.argv[1:])
print("prefect imported" if "prefect" in sys.modules else "prefect not imported")
sys.exit(code)
"""


@pytest.mark.parametrize(
    "args, words",
    [
        (["run", "pipeline", "--experiment", "no-such-experiment"], ("no-such-experiment",)),
        (["run", "pipeline", "--experiment", "micro", "train.moe.max_stepz=3"], ("max_stepz",)),
        (
            ["run", "pipeline", "--experiment", "micro", "+data.folders.extra=no/such/folder"],
            ("no/such/folder",),
        ),
        (
            ["run", "extend", "--experiment", "micro", "--domain", "new", "--folder", "no/such/folder"],
            ("no/such/folder",),
        ),
    ],
    ids=["unknown-experiment", "bad-override", "missing-pipeline-folder", "missing-extension-folder"],
)
def test_cli_fails_fast_before_prefect(tmp_path, args, words):
    """A typo is one line and exit status 2, before Prefect is even imported (so no server starts)."""
    import subprocess

    from .conftest import PYTHON, env_for

    proc = subprocess.run(
        [PYTHON, "-c", FAIL_FAST, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env_for(tmp_path / "prefect"),
        timeout=120,
        check=False,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("nexus run: error:"), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert proc.stdout.strip() == "prefect not imported"
    assert not (tmp_path / "prefect").exists() and list(tmp_path.iterdir()) == []  # nothing written
