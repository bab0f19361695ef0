"""`nexus data prepare` through the project's console-script dispatcher."""

from pathlib import Path

from nexus.cli import main

CORPORA = Path(__file__).parents[1] / "fixtures" / "corpora"


def test_prepare_prints_counts_per_domain_and_split_and_reuses_the_cache(tmp_path, capsys):
    (tmp_path / "new").mkdir()
    for i in range(12):
        (tmp_path / "new" / f"{i}.jsonl").write_text(
            f'{{"body": "news item number {i} about the weather"}}\n'
        )
    args = [
        "data",
        "prepare",
        "--experiment",
        "tiny",
        "--corpora",
        str(CORPORA),
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-embeddings",
        "--seq-len",
        "16",
        "--vocab-size",
        "300",
        "--new-domain",
        f"news={tmp_path / 'new'}",
        "--text-field",
        "body",
        "-q",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = [
        line.split()
        for line in out.splitlines()
        if line.split()[:2] and line.split()[1] in ("train", "validation", "test")
    ]
    assert {r[0] for r in rows} == {"dictionary", "kernel-docs", "python-docs", "lore", "code", "news"}
    assert len(rows) == 18 and all(int(r[2].replace(",", "")) > 0 for r in rows)
    assert "seq_len 16" in out and "(built)" in out and "wall time" in out
    assert main(args) == 0
    second = capsys.readouterr().out
    assert "(built)" not in second and second.count("(reused)") == 4


def test_bad_input_exits_2_with_a_message_naming_the_domain(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(
        [
            "data",
            "prepare",
            "--experiment",
            "tiny",
            "--corpora",
            str(CORPORA),
            "--out",
            str(tmp_path / "o"),
            "--new-domain",
            f"news={tmp_path / 'empty'}",
            "--no-embeddings",
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "domain 'news'" in err and str(tmp_path / "empty") in err
    assert not (tmp_path / "o").exists()
