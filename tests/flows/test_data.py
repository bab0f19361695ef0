"""`nexus data prepare`: composed like every flow (conf/ + Hydra overrides), prepared like the pipeline's
data task, through the installed console script."""

import os
import subprocess
import sys
from pathlib import Path

from flows.cli import main
from flows.config import compose
from flows.data import prepare_section

NEXUS = Path(sys.executable).parent / "nexus"


def _nexus(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NEXUS_HOME", "MLFLOW_TRACKING_URI")}
    return subprocess.run(
        [str(NEXUS), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_prepare_an_experiment_with_a_declared_domain_in_a_fresh_directory_then_reuse_it(tmp_path):
    """As a user: `nexus data prepare --experiment micro` plus a JSONL folder domain declared on the
    command line, from a fresh project directory, twice (the second run reuses every stage)."""
    (tmp_path / "new").mkdir()
    for i in range(12):
        (tmp_path / "new" / f"{i}.jsonl").write_text(
            f'{{"body": "news item number {i} about the weather"}}\n'
        )
    args = [
        "data",
        "prepare",
        "--experiment",
        "micro",
        "+data.sources.news={kind:folder,path:new,text_field:body}",
        "data.domains=[dictionary,lore,news]",
        "data.packing.seq_len=16",
        "-q",
    ]
    first = _nexus(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    rows = [
        line.split()
        for line in first.stdout.splitlines()
        if line.split()[:2] and line.split()[1] in ("train", "validation", "test")
    ]
    assert {r[0] for r in rows} == {"dictionary", "lore", "news"}
    assert len(rows) == 9 and all(int(r[2].replace(",", "")) > 0 for r in rows)
    assert "seq_len 16" in first.stdout and "(built)" in first.stdout and "cosine" in first.stdout.lower()
    main_dir = tmp_path / "outputs" / "micro" / "data" / "main"
    assert (main_dir / "embeddings").is_dir() and (tmp_path / "outputs/micro/data/tokenizer-base").is_dir()
    second = _nexus(tmp_path, *args)
    assert second.returncode == 0, second.stderr
    assert "(built)" not in second.stdout and "(reused)" in second.stdout


def test_prepare_composes_every_experiment_the_flows_know():
    """`--experiment small` (the demo's Debian domains) composes to the DataConfig the pipeline prepares."""
    cfg = compose("small", check=False)
    data = cfg.data.to_data_config(cfg.name, "unused")
    assert data.initial_domains == ["dictionary", "kernel-docs", "python-docs", "lore"]
    assert (data.packing.seq_len, data.tokenizer.vocab_size, data.embedding.sample_size) == (128, 4096, 64)


def test_bad_input_exits_2_with_a_message_naming_the_domain(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(
        [
            "data",
            "prepare",
            "--experiment",
            "micro",
            f"home={tmp_path}",
            f"+data.sources.news={{kind:folder,path:{tmp_path / 'empty'}}}",
            "data.domains=[dictionary,news]",
            "--no-embeddings",
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "domain 'news'" in err and str(tmp_path / "empty") in err
    assert not (tmp_path / "outputs").exists()


def test_a_source_kind_registered_outside_the_library_is_declared_from_hydra_and_prepared(
    tmp_path, monkeypatch
):
    """The data-source walk-through kept as a test: a toy in-memory source (one class, registered) is a
    `kind` Hydra can declare a domain from, fingerprinted and read like the built-in kinds."""
    from nexus.data.sources import SOURCES, Source, register_source
    from nexus.errors import DataError

    memory = {"greetings": [f"hello number {i}, a greeting of the toy in-memory source" for i in range(40)]}
    monkeypatch.setattr("nexus.data.sources.SOURCES", dict(SOURCES))  # the registration ends with the test

    @register_source
    class MemorySource(Source):
        kind = "memory"
        needs = ("path",)

        def identity(self, src, domain):
            if src.path not in memory:
                raise DataError(f"domain {domain!r}: no in-memory documents named {src.path!r}")
            return {"documents": memory[src.path]}

        def read(self, src, domain, cache_dir):
            for i, text in enumerate(memory[src.path]):
                yield text, f"memory:{src.path}[{i}]"

    domains = "data.domains=[dictionary,lore,hi]"
    cfg = compose("micro", [f"home={tmp_path}", "+data.sources.hi={kind:memory,path:greetings}", domains])
    data, built = prepare_section(cfg.data, cfg.name, str(tmp_path / "data"))
    assert [s.kind for s in built.domains[-1].sources] == ["memory"]
    assert sum(s.documents for s in data.domains["hi"].splits.values()) == 40
    assert prepare_section(cfg.data, cfg.name, str(tmp_path / "data"))[0].reused["documents"]
    memory["greetings"] = memory["greetings"][:30]  # the fingerprint follows the source's identity
    assert (
        sum(
            s.documents
            for s in prepare_section(cfg.data, cfg.name, str(tmp_path / "data"))[0]
            .domains["hi"]
            .splits.values()
        )
        == 30
    )
