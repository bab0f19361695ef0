"""prepare_experiment end to end on the fixture corpora: products, cache reuse, bad input."""

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from nexus.data import open_prepared, prepare_experiment, tiny_config
from nexus.data.config import DomainConfig, EmbeddingConfig, SourceConfig, TokenizerConfig
from nexus.data.documents import SPLITS
from nexus.errors import DataError

CORPORA = Path(__file__).parents[1] / "fixtures" / "corpora"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    cfg = tiny_config(CORPORA, out_dir=str(root / "out"), cache_dir=str(root / "cache"))
    t0 = time.perf_counter()
    first = prepare_experiment(cfg, progress=False)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = prepare_experiment(cfg, progress=False)
    return cfg, first, first_s, second, time.perf_counter() - t0


def test_every_domain_and_split_is_packed_and_counted(prepared):
    cfg, data, *_ = prepared
    assert list(data.domains) == ["dictionary", "kernel-docs", "python-docs", "lore", "code"]
    assert data.held_out_domains == ["code"]
    tok = data.load_tokenizer()
    for name, dom in data.domains.items():
        for split in SPLITS:
            st, packed = dom.splits[split], data.packed(name, split)
            assert st.documents == packed.num_documents > 0 and st.tokens == packed.num_tokens > 0
            assert 1.0 < st.bytes / st.tokens < 5.0  # BPE compresses; bytes are counted in UTF-8
        docs = data.documents(name)["validation"]
        stream = data.packed(name, "validation").tokens
        assert tok.decode(np.asarray(stream).tolist()) == "".join(t + "<|endoftext|>" for t in docs["text"])
    assert data.packed("lore")[0].shape == (cfg.packing.seq_len + 1,)


def test_domain_embeddings_of_every_domain_with_lineage(prepared):
    _, data, *_ = prepared
    names, matrix, meta = data.domain_embeddings()
    assert names == list(data.domains) and tuple(matrix.shape) == (5, 384)
    assert meta[0]["data_fingerprint"] == data.domains["dictionary"].fingerprint
    assert meta[4]["embedder"].endswith("all-MiniLM-L6-v2") and meta[4]["sample_size"] == "8"


def test_held_out_code_is_not_in_the_tokenizer_sample(prepared):
    _, data, *_ = prepared
    # BPE merges fit the initial domains: held-out code compresses worse than python-docs
    code, initial = data.domains["code"].splits["train"], data.domains["python-docs"].splits["train"]
    assert code.bytes / code.tokens < initial.bytes / initial.tokens


def test_second_run_reuses_every_stage(prepared):
    _, first, first_s, second, second_s = prepared
    assert not any(first.reused.values()) and all(second.reused.values()), second.reused
    assert second_s < first_s / 2
    reopened = open_prepared(first.out_dir)
    assert reopened.domains == second.domains and reopened.tokenizer_path.is_file()
    assert reopened.token_counts("train") == first.token_counts("train")


def test_a_changed_domain_rebuilds_only_that_domain(prepared, tmp_path):
    cfg, first, *_ = prepared
    (tmp_path / "extra.txt").write_text("def added():\n    return 'one more document'\n")
    code = next(d for d in cfg.domains if d.name == "code")
    grown = replace(code, sources=code.sources + (SourceConfig("folder", path=str(tmp_path)),))
    cfg2 = replace(
        cfg,
        domains=tuple(grown if d.name == "code" else d for d in cfg.domains),
        embedding=replace(cfg.embedding, enabled=False),
    )
    data = prepare_experiment(cfg2, progress=False)
    assert data.domains["code"].fingerprint != first.domains["code"].fingerprint

    def counts(d):
        return sum(s.documents for s in d.domains["code"].splits.values())

    assert counts(data) == counts(first) + 1
    assert data.domains["lore"] == first.domains["lore"]
    assert data.reused["read"] is False and data.reused["packing"] is False
    assert data.reused["tokenizer"] is True  # the held-out domain is not in the tokenizer's sample
    prepare_experiment(cfg, progress=False)  # restore for the other tests


def bad_domain(kind, tmp_path):
    folder = tmp_path / "news"
    folder.mkdir()
    if kind == "non-utf8":
        (folder / "a.txt").write_bytes(b"caf\xe9 " * 10)
        return DomainConfig.folder("news", str(folder)), "not UTF-8"
    if kind == "jsonl":
        (folder / "a.jsonl").write_text('{"content": "no text field here"}\n')
        return DomainConfig.folder("news", str(folder)), "no string field 'text'"
    if kind == "empty":
        return DomainConfig.folder("news", str(folder)), "no auto files"
    return DomainConfig("news", (SourceConfig("hf", path=str(tmp_path / "missing-dataset")),)), "cannot load"


@pytest.mark.parametrize("kind", ["non-utf8", "jsonl", "empty", "dataset"])
def test_bad_input_fails_before_anything_is_written(tmp_path, kind):
    dom, match = bad_domain(kind, tmp_path)
    cfg = tiny_config(CORPORA, out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    cfg = replace(cfg, domains=cfg.domains + (dom,))
    with pytest.raises(DataError, match=match) as err:
        prepare_experiment(cfg, progress=False)
    assert "'news'" in str(err.value) and str(tmp_path) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_embedder_dimension_mismatch_fails_before_anything_is_written(tmp_path):
    cfg = tiny_config(CORPORA, out_dir=str(tmp_path / "out"), embedding=EmbeddingConfig(expected_dim=768))
    with pytest.raises(DataError, match="dimension 384, but the router expects 768"):
        prepare_experiment(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_manifest_is_plain_json(prepared):
    _, data, *_ = prepared
    manifest = json.loads((data.out_dir / "manifest.json").read_text())
    assert manifest["seq_len"] == 32 and manifest["domains"]["code"]["held_out"] is True


def test_missing_existing_tokenizer_fails_before_anything_is_written(tmp_path):
    cfg = tiny_config(
        CORPORA, out_dir=str(tmp_path / "out"), tokenizer=TokenizerConfig(path=str(tmp_path / "tok.json"))
    )
    with pytest.raises(DataError, match="tok.json does not exist"):
        prepare_experiment(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_an_existing_tokenizer_is_used_as_is(prepared, tmp_path):
    _, first, *_ = prepared
    cfg = tiny_config(
        CORPORA,
        out_dir=str(tmp_path / "out"),
        tokenizer=TokenizerConfig(path=str(first.tokenizer_path)),
        embedding=EmbeddingConfig(enabled=False),
    )
    cfg = replace(cfg, domains=tuple(d for d in cfg.domains if d.name in ("lore", "code")))
    data = prepare_experiment(cfg, progress=False)
    assert data.tokenizer_path.read_text() == first.tokenizer_path.read_text()
    assert data.domains["lore"].splits == first.domains["lore"].splits
