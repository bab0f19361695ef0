"""File formats on the fixture corpora (cut from the real Debian packages) and on bad input."""

import gzip
from pathlib import Path

import pytest

from nexus.data.config import SourceConfig
from nexus.data.formats import list_files, parse_files
from nexus.errors import DataError

CORPORA = Path(__file__).parents[1] / "fixtures" / "corpora"


def docs(root, fmt, **kw):
    src = SourceConfig("folder", path=str(root), format=fmt, **kw)
    return list(parse_files(list_files(str(root), fmt, "dom"), fmt, "dom", src))


def test_dictd_yields_one_document_per_index_entry():
    entries = (CORPORA / "dictionary" / "gcide.index").read_text().splitlines()
    got = docs(CORPORA / "dictionary", "dictd")
    assert len(got) == len(entries) > 30
    headword = entries[0].split("\t")[0]
    assert got[0][0].lstrip().startswith(headword) and got[0][1].endswith(f"#{headword}")


def test_rst_jargon_fortunes_and_python_readers():
    rst = docs(CORPORA / "kernel-docs", "rst")
    assert len(rst) == len(list((CORPORA / "kernel-docs").rglob("*.rst.txt"))) > 10
    jargon = docs(CORPORA / "lore", "jargon")
    assert len(jargon) > 10 and all(text.lstrip().startswith(":") for text, _ in jargon[1:])
    fortunes = docs(CORPORA / "lore", "fortunes")
    assert len(fortunes) > 30 and not any(line == "%" for t, _ in fortunes for line in t.splitlines())
    code = docs(CORPORA / "code", "python")
    assert len(code) == len(list((CORPORA / "code").glob("*.py"))) and "import" in code[0][0]


def test_folder_auto_reads_txt_md_and_jsonl_and_a_glob(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.md").write_text("# markdown document")
    (tmp_path / "c.jsonl").write_text('{"body": "first"}\n\n{"body": "second"}\n')
    (tmp_path / "ignored.csv").write_text("x,y")
    texts = [t for t, _ in docs(tmp_path, "auto", text_field="body")]
    assert texts == ["plain text document", "# markdown document", "first", "second"]
    assert [t for t, _ in docs(tmp_path / "*.md", "auto")] == ["# markdown document"]


def test_python_reader_honours_the_coding_cookie(tmp_path):
    (tmp_path / "legacy.py").write_bytes("# -*- coding: latin-1 -*-\nname = 'café'\n".encode("latin-1"))
    assert "café" in docs(tmp_path, "python")[0][0]


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "no auto files"),
    ],
)
def test_missing_or_empty_folder_names_domain_and_path(tmp_path, setup, match):
    root = setup(tmp_path)
    with pytest.raises(DataError, match=match) as err:
        docs(root, "auto")
    assert "'dom'" in str(err.value) and str(root) in str(err.value)


def test_non_utf8_file_names_domain_and_file(tmp_path):
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as err:
        docs(tmp_path, "auto")
    assert "'dom'" in str(err.value) and str(bad) in str(err.value)
    assert docs(tmp_path, "auto", skip_undecodable=True) == []  # opt-in skipping for curated corpora


def test_non_utf8_inside_gzip_is_caught(tmp_path):
    (tmp_path / "jargon.txt.gz").write_bytes(gzip.compress(b"\xff\xfe bad"))
    with pytest.raises(DataError, match="jargon.txt.gz is not UTF-8"):
        docs(tmp_path, "jargon")


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"other": "x"}', "no string field 'text'"),
        ('{"text": 3}', "no string field 'text'"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_jsonl_line_names_file_line_and_key(tmp_path, line, match):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=match) as err:
        docs(tmp_path, "jsonl")
    assert f"{f}:2" in str(err.value) and "'dom'" in str(err.value)


def test_fortunes_in_a_language_subfolder_are_read_and_their_indexes_skipped(tmp_path):
    """The layout of fortunes-de (`usr/share/games/fortunes/de/<file>` next to `<file>.dat` indexes)."""
    lang = tmp_path / "usr" / "share" / "games" / "fortunes" / "de"
    lang.mkdir(parents=True)
    (lang / "zitate").write_text("Erster Spruch.\n%\nZweiter Spruch.\n")
    (lang / "zitate.dat").write_bytes(b"\x00\x02binary index")
    (tmp_path / "usr" / "share" / "games" / "fortunes" / "top").write_text("Top level.\n")
    assert sorted(t.strip() for t, _ in docs(tmp_path, "fortunes")) == [
        "Erster Spruch.",
        "Top level.",
        "Zweiter Spruch.",
    ]
