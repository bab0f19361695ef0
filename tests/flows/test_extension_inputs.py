"""Bad input to `nexus run extend` / `nexus run remove`, given as a user gives it (the CLI, in process):
exit status 2, one line on stderr naming the input at fault, and the output tree exactly as it was
(nothing copied, no empty folder, the MLflow store untouched). Against the session's micro model line,
which these tests only read; one case also runs as a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import domain_folder

ROOT = Path(__file__).resolve().parents[2]
LATIN1 = "café au lait, encore un café ".encode("latin-1") * 40
BAD_JSONL = b'{"text": "a fine document about nothing in particular"}\n{oops\n'


def listing(root: Path) -> list[tuple[str, int, int]]:
    """Every file and folder under `root`, with size and modification time."""
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def _files(tmp: Path, name: str, files: dict[str, bytes]) -> str:
    folder = tmp / "inputs" / name
    folder.mkdir(parents=True)
    for fname, data in files.items():
        (folder / fname).write_bytes(data)
    return str(folder)


def _good(tmp: Path) -> str:
    return str(domain_folder(tmp / "inputs" / "good", "kernel-docs"))


# (id, args(tmp) -> CLI arguments after the overrides' position, words the message must contain)
Case = tuple[str, Callable[[Path], list[str]], tuple[str, ...]]
EXTEND: list[Case] = [
    (
        "missing-folder",
        lambda t: ["--domain", "new", "--folder", str(t / "nowhere")],
        ("nowhere", "does not exist"),
    ),
    (
        "empty-folder",
        lambda t: ["--domain", "new", "--folder", _files(t, "empty", {})],
        ("empty", "no auto files"),
    ),
    (
        "blank-files",
        lambda t: ["--domain", "new", "--folder", _files(t, "blank", {"a.txt": b"\n\n"})],
        ("blank", "no document"),
    ),
    (
        "non-utf8",
        lambda t: ["--domain", "new", "--folder", _files(t, "latin1", {"a.txt": LATIN1})],
        ("a.txt", "UTF-8"),
    ),
    (
        "invalid-jsonl",
        lambda t: ["--domain", "new", "--folder", _files(t, "jsonl", {"d.jsonl": BAD_JSONL})],
        ("d.jsonl:2", "JSON"),
    ),
    (
        "too-few-documents",
        lambda t: [
            "--domain",
            "new",
            "--folder",
            _files(t, "one", {"a.txt": b"one lonely document of some length"}),
        ],
        ("split", "empty"),
    ),
    ("name-with-slash", lambda t: ["--domain", "a/b", "--folder", _good(t)], ("'a/b'", "domain name")),
    ("name-dotdot", lambda t: ["--domain", "..", "--folder", _good(t)], ("'..'", "domain name")),
    (
        "name-leading-dot",
        lambda t: ["--domain", ".hidden", "--folder", _good(t)],
        ("'.hidden'", "domain name"),
    ),
    (
        "name-with-space",
        lambda t: ["--domain", "my domain", "--folder", _good(t)],
        ("'my domain'", "domain name"),
    ),
    ("name-200-chars", lambda t: ["--domain", "x" * 200, "--folder", _good(t)], ("x" * 200, "64 characters")),
    (
        "name-the-moe-has",
        lambda t: ["--domain", "dictionary", "--folder", _good(t)],
        ("dictionary", "already has"),
    ),
    ("no-folder-unknown-domain", lambda t: ["--domain", "atlantis"], ("atlantis", "no folder")),
    (
        "unknown-alias",
        lambda t: ["--domain", "new", "--folder", _good(t), "--moe", "models:/nexus-micro-moe@nope"],
        ("@nope", "alias 'nope'"),
    ),
    (
        "unknown-version",
        lambda t: ["--domain", "new", "--folder", _good(t), "--moe", "models:/nexus-micro-moe/99"],
        ("nexus-micro-moe/99", "version 99"),
    ),
    (
        "unknown-model",
        lambda t: ["--domain", "new", "--folder", _good(t), "--moe", "no-such-line"],
        ("no-such-line", "no registered model"),
    ),
    (
        "not-a-checkpoint",
        lambda t: ["--domain", "new", "--folder", _good(t), "--moe", _files(t, "ckpt", {"x": b"1"})],
        ("ckpt", "not a checkpoint"),
    ),
    (
        "bad-override",
        lambda t: ["--domain", "new", "--folder", _good(t), "train.extension.max_stepz=3"],
        ("max_stepz",),
    ),
    (
        "unknown-embedder",
        lambda t: ["--domain", "new", "--folder", _good(t), f"data.embedding_model={t}/no-embedder"],
        ("no-embedder",),
    ),
]
REMOVE: list[Case] = [
    ("unknown-expert", lambda t: ["--domain", "atlantis"], ("atlantis", "has no expert")),
    ("no-domain", lambda t: [], ("--domain",)),
    (
        "unknown-alias",
        lambda t: ["--domain", "lore", "--moe", "models:/nexus-micro-moe@gone"],
        ("alias 'gone'",),
    ),
]


def _check(
    micro_moe, tmp_path, capsys, flow: str, make: Callable[[Path], list[str]], words: tuple[str, ...]
) -> None:
    from flows.cli import main

    out, _, overrides, _ = micro_moe
    home = out.parent.parent  # outputs, the MLflow store, caches
    args = make(tmp_path)
    before = listing(home)
    capsys.readouterr()
    assert main(["run", flow, "--experiment", "micro", *args, *overrides]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nexus run: error:"), err
    assert all(w.lower() in lines[0].lower() for w in words), lines[0]
    assert listing(home) == before


@pytest.mark.parametrize("case", EXTEND, ids=[c[0] for c in EXTEND])
def test_bad_extension_input_fails_fast_and_writes_nothing(micro_moe, tmp_path, capsys, case):
    _check(micro_moe, tmp_path, capsys, "extend", case[1], case[2])


@pytest.mark.parametrize("case", REMOVE, ids=[c[0] for c in REMOVE])
def test_bad_removal_input_fails_fast_and_writes_nothing(micro_moe, tmp_path, capsys, case):
    _check(micro_moe, tmp_path, capsys, "remove", case[1], case[2])


def test_unknown_experiment_is_one_line(capsys):
    from flows.cli import main

    assert main(["run", "extend", "--experiment", "no-such-experiment", "--domain", "x"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "no-such-experiment" in lines[0], lines


def test_a_real_process_reports_one_line_and_exit_status_2(micro_moe, tmp_path):
    out, _, overrides, _ = micro_moe
    before = listing(out.parent.parent)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "extend",
            "--experiment",
            "micro",
            "--domain",
            "new",
            "--folder",
            _good(tmp_path),
            "--moe",
            "models:/nexus-micro-moe@nope",
            *overrides,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        line for line in proc.stderr.splitlines() if line.startswith("nexus run: error:")
    ], proc.stderr
    assert "alias 'nope'" in proc.stderr and listing(out.parent.parent) == before
