"""Sources: local folders, Hugging Face datasets from local directories/files, the stdlib."""

import json
from pathlib import Path

import pytest

from nexus.data.config import SourceConfig
from nexus.data.sources import read_source, source_identity, stdlib_root
from nexus.errors import DataError

CORPORA = Path(__file__).parents[1] / "fixtures" / "corpora"


def read(src, tmp_path):
    source_identity(src, "dom")
    return list(read_source(src, "dom", tmp_path))


def test_folder_identity_changes_when_a_file_changes(tmp_path):
    (tmp_path / "a.txt").write_text("one document")
    src = SourceConfig("folder", path=str(tmp_path))
    before = source_identity(src, "dom")
    (tmp_path / "b.txt").write_text("another document")
    assert source_identity(src, "dom") != before
    assert [t for t, _ in read(src, tmp_path)] == ["one document", "another document"]


def test_max_documents_caps_a_source(tmp_path):
    src = SourceConfig("folder", path=str(CORPORA / "lore"), format="fortunes", max_documents=5)
    assert len(read(src, tmp_path)) == 5


@pytest.fixture
def slimpajama_like(tmp_path):
    from datasets import Dataset

    rows = {
        "text": ["an arxiv paper", "a github file", "another paper"],
        "meta": [{"redpajama_set_name": s} for s in ("RedPajamaArXiv", "RedPajamaGithub", "RedPajamaArXiv")],
    }
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    with open(tmp_path / "rows.jsonl", "w") as f:
        f.writelines(
            json.dumps({"text": text, "meta": meta}) + "\n" for text, meta in zip(rows["text"], rows["meta"])
        )
    return tmp_path


def test_hf_saved_dataset_with_dotted_filter(slimpajama_like, tmp_path):
    src = SourceConfig(
        "hf",
        path=str(slimpajama_like / "saved"),
        filter_field="meta.redpajama_set_name",
        filter_value="RedPajamaArXiv",
    )
    assert [t for t, _ in read(src, tmp_path)] == ["an arxiv paper", "another paper"]


def test_hf_json_builder_on_local_files(slimpajama_like, tmp_path):
    src = SourceConfig("hf", path="json", data_files=str(slimpajama_like / "rows.jsonl"))
    assert len(read(src, tmp_path)) == 3


@pytest.mark.parametrize(
    "src, match",
    [
        (SourceConfig("hf", path="no-such-org/no-such-dataset-xyz"), "cannot load dataset no-such-org"),
        (SourceConfig("hf", path="json", data_files="/nonexistent/*.jsonl"), "cannot load dataset json"),
    ],
)
def test_unknown_dataset_names_domain_and_dataset(src, match):
    with pytest.raises(DataError, match=match) as err:
        source_identity(src, "dom")
    assert "'dom'" in str(err.value)


def test_hf_missing_text_column(slimpajama_like):
    src = SourceConfig("hf", path=str(slimpajama_like / "saved"), text_field="content")
    with pytest.raises(DataError, match="'dom': dataset .* has no column 'content'"):
        source_identity(src, "dom")


def test_stdlib_source_reads_python_files_without_test_suites(tmp_path):
    src = SourceConfig("stdlib", max_documents=20)
    ident = source_identity(src, "code")
    files = [f for f, _, _ in ident["files"]]
    assert len(files) > 300 and all(f.endswith(".py") for f in files)
    assert not any("/test/" in f or "site-packages" in f for f in files)
    assert Path(files[0]).is_relative_to(stdlib_root())
    assert len(list(read_source(src, "code", tmp_path))) == 20


def test_check_folder_domain_reads_like_prepare_and_writes_nothing(tmp_path):
    from nexus.data import check_folder_domain
    from nexus.data.config import SplitConfig

    folder = tmp_path / "new"
    folder.mkdir()
    docs = [f"document number {i} of the new domain, long enough to keep" for i in range(60)]
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    before = sorted(tmp_path.rglob("*"))
    assert check_folder_domain("new", str(folder), SplitConfig(validation=0.2, test=0.2)) == 60
    assert sorted(tmp_path.rglob("*")) == before
    (folder / "more.txt").write_bytes("caf\xe9".encode("latin-1") * 20)
    with pytest.raises(DataError, match="more.txt.*UTF-8"):
        check_folder_domain("new", str(folder))


@pytest.mark.parametrize("name", ["a/b", "..", ".hidden", "with space", "x" * 65, ""])
def test_check_folder_domain_refuses_unsafe_names(tmp_path, name):
    from nexus.data import check_folder_domain
    from nexus.errors import ConfigError

    (tmp_path / "a.txt").write_text("some text of a document")
    with pytest.raises(ConfigError, match="domain name"):
        check_folder_domain(name, str(tmp_path))
