"""`prepare_experiment(cfg)`: documents, tokenizer, packed splits and domain embeddings of an
experiment, each cached by fingerprint under the experiment's data directory.

Order matters for the "nothing half-written" guarantee:
  1. validate every source (packages known to apt, folders present, datasets loadable) and the
     embedder's dimension;
  2. read and split every domain whose documents are not cached, streamed into temporary
     directories (bounded memory: `nexus.data.documents.write_documents`);
  3. only when every domain was read, move the documents into place; then write tokenizer,
     packed splits, embeddings, manifest, each into a temporary path moved into place (see
     nexus.data.cache).
A stage whose fingerprint matches what is on disk is reused, not rebuilt. Memory stays bounded
whatever the domains' size: documents stream to disk, the tokenizer trains on a sample, packing
tokenizes in batches (`num_proc` processes) and reads the documents memory-mapped.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nexus.data.cache import FINGERPRINT_FILE, cached_dir, fingerprint, read_fingerprint
from nexus.data.config import DataConfig, DomainConfig, EmbeddingConfig
from nexus.data.documents import SPLITS, column_batches, documents_fingerprint, hash_order, write_documents
from nexus.data.embeddings import (
    DEFAULT_EMBEDDER,
    SentenceTransformerEmbedder,
    check_embedding_dim,
    embed_domain,
    load_embedder,
    read_embedding_metadata,
    save_domain_embedding,
)
from nexus.data.prepared import DomainData, PreparedData, SplitStats
from nexus.data.sources import check_sources, describe, read_source, source_identity
from nexus.io import _fsync_tree, replace_dir, staging_directory

log = logging.getLogger("nexus.data")
STATS_FILE = "stats.json"


class _Timer:
    """Collects seconds and cache reuse per stage for the report."""

    def __init__(self, data: PreparedData):
        self.data = data

    def __call__(self, stage: str, start: float, reused: bool) -> None:
        self.data.timings[stage] = self.data.timings.get(stage, 0.0) + time.perf_counter() - start
        self.data.reused[stage] = self.data.reused.get(stage, True) and reused


def prepare_experiment(
    cfg: DataConfig, out_dir: str | Path | None = None, progress: bool = True
) -> PreparedData:
    """Build (or reuse) all data of an experiment and return its `PreparedData` handle.

    out_dir: overrides `cfg.out_dir`; progress: tqdm bars (datasets' and the embedder's)."""
    import datasets

    bars_were_off = datasets.are_progress_bars_disabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        return _prepare(cfg, out_dir, progress)
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()


def _prepare(cfg: DataConfig, out_dir: str | Path | None, progress: bool) -> PreparedData:
    t_total = time.perf_counter()
    out = Path(out_dir or cfg.resolved_out_dir())
    cache = Path(cfg.cache_dir)

    # 1-2. validate and read everything that is not cached; nothing is written to `out` yet.
    t0 = time.perf_counter()
    check_sources([s for d in cfg.domains for s in d.sources])
    fps = {
        d.name: documents_fingerprint(d.name, [source_identity(s, d.name) for s in d.sources], cfg.splits)
        for d in cfg.domains
    }
    embedder = _Embedder(cfg.embedding)
    embedder.check_dim()
    if cfg.tokenizer.path is not None:
        from nexus.data.tokenizer import load_tokenizer

        load_tokenizer(cfg.tokenizer.path, cfg.tokenizer.eos_token)
    pending = [d for d in cfg.domains if read_fingerprint(out / "documents" / d.name) != fps[d.name]]
    data = PreparedData(
        out,
        cfg.experiment,
        cfg.packing.seq_len,
        "",
        {d.name: DomainData(d.name, d.held_out, fps[d.name]) for d in cfg.domains},
    )
    timer = _Timer(data)
    if pending:  # streamed into a staging directory next to `out`; moved in once every domain was read
        with staging_directory(out) as staging:
            for dom in pending:
                _read_domain(dom, cfg, cache, staging / dom.name)
                (staging / dom.name / FINGERPRINT_FILE).write_text(fps[dom.name] + "\n")
            _fsync_tree(staging)
            (out / "documents").mkdir(parents=True, exist_ok=True)
            for dom in pending:
                replace_dir(staging / dom.name, out / "documents" / dom.name)
    timer("read", t0, not pending)
    t0 = time.perf_counter()

    # 3. write.
    for dom in cfg.domains:
        stats = json.loads((out / "documents" / dom.name / STATS_FILE).read_text())
        data.domains[dom.name].splits = {s: SplitStats(**stats[s]) for s in SPLITS}
    timer("documents", t0, data.reused["read"])

    t0 = time.perf_counter()
    data.tokenizer_fingerprint, reused = _tokenizer(cfg, data)
    timer("tokenizer", t0, reused)

    @functools.cache
    def tok_info() -> tuple[int, int]:
        tok = data.load_tokenizer()
        return tok.eos_token_id, len(tok)

    for dom in data.domains.values():
        docs = functools.cache(lambda name=dom.name: data.documents(name))  # loaded once, on a miss
        for split in SPLITS:
            t0 = time.perf_counter()
            timer("packing", t0, _pack(cfg, data, dom, split, tok_info, lambda s=split, d=docs: d()[s]))

    if cfg.embedding.enabled:
        for dom in data.domains.values():
            t0 = time.perf_counter()
            timer("embeddings", t0, embed_prepared_domain(data, dom.name, cfg.embedding, embedder, progress))
    data.save()
    data.timings["total"] = time.perf_counter() - t_total
    return data


def _read_domain(dom: DomainConfig, cfg: DataConfig, cache: Path, out_dir: Path) -> None:
    """Stream a domain's documents, split, into `out_dir` (a DatasetDict and its stats)."""
    log.info("reading domain %s", dom.name)
    docs = (doc for src in dom.sources for doc in read_source(src, dom.name, cache))
    stats = write_documents(dom.name, docs, cfg.splits, ", ".join(describe(s) for s in dom.sources), out_dir)
    (out_dir / STATS_FILE).write_text(json.dumps(stats))


def _tokenizer(cfg: DataConfig, data: PreparedData) -> tuple[str, bool]:
    """Train (or copy) the tokenizer into `out/tokenizer`; returns (fingerprint, reused)."""
    from nexus.data.tokenizer import TOKENIZER_FILE, load_tokenizer, sample_texts, train_tokenizer

    tc = cfg.tokenizer
    if tc.path is not None:
        backend = load_tokenizer(tc.path, tc.eos_token).backend_tokenizer
        given = Path(tc.path)
        text = given.read_text() if given.is_file() else backend.to_str()  # a file is copied verbatim
        fp = fingerprint({"tokenizer": text})
        return fp, cached_dir(
            data.tokenizer_path.parent, fp, lambda tmp: (tmp / TOKENIZER_FILE).write_text(text)
        )
    initial = cfg.initial_domains  # the held-out extension domain is never in the sample
    fp = fingerprint(
        {
            "cfg": [tc.vocab_size, tc.sample_chars_per_domain, tc.min_frequency, tc.eos_token],
            "docs": [data.domains[d].fingerprint for d in initial],
        }
    )

    def build(tmp: Path) -> None:
        def sample():
            for name in initial:
                train = data.documents(name)["train"]
                order = hash_order(column_batches(train, "doc_id"), "tokenizer")
                yield from sample_texts((train[i]["text"] for i in order), tc.sample_chars_per_domain)

        log.info("training tokenizer (vocab %d) on %s", tc.vocab_size, initial)
        train_tokenizer(sample(), tc.vocab_size, tmp / TOKENIZER_FILE, tc.eos_token, tc.min_frequency)

    return fp, cached_dir(data.tokenizer_path.parent, fp, build)


def _pack(
    cfg: DataConfig,
    data: PreparedData,
    dom: DomainData,
    split: str,
    tok_info: Callable[[], tuple[int, int]],
    split_docs: Callable[[], Any],
) -> bool:
    """Pack one split unless cached; `tok_info() -> (eos_id, vocab_size)`, `split_docs()` -> its
    documents Dataset. Returns whether the cached split was reused."""
    from nexus.data.packing import pack_documents

    path = data.out_dir / "packed" / dom.name / split
    fp = fingerprint({"docs": dom.fingerprint, "tokenizer": data.tokenizer_fingerprint, "split": split})

    def build(tmp: Path) -> None:
        eos_id, vocab_size = tok_info()
        log.info("packing %s/%s", dom.name, split)
        pack_documents(
            split_docs(),
            data.tokenizer_path,
            tmp,
            domain=dom.name,
            split=split,
            fingerprint=fp,
            eos_id=eos_id,
            vocab_size=vocab_size,
            num_proc=cfg.packing.num_proc,
            batch_size=cfg.packing.batch_size,
        )

    reused = cached_dir(path, fp, build)
    dom.splits[split].tokens = data.packed(dom.name, split).num_tokens
    return reused


class _Embedder:
    """The configured embedder, loaded on first use (loading costs seconds; a fully cached run
    never pays it unless the dimension must be checked before anything is written)."""

    def __init__(self, ec: EmbeddingConfig):
        self.ec = ec
        self.name = DEFAULT_EMBEDDER if ec.model == "default" else ec.model
        self._model: SentenceTransformerEmbedder | None = None

    def get(self) -> SentenceTransformerEmbedder:
        if self._model is None:
            self._model = load_embedder(self.ec.model, self.ec.batch_size)
        return self._model

    def check_dim(self) -> None:
        if self.ec.enabled and self.ec.expected_dim is not None:
            model = self.get()
            check_embedding_dim([0.0] * model.dim, self.ec.expected_dim, "*", f"embedder {model.name}")


def embed_prepared_domain(
    data: PreparedData,
    domain: str,
    ec: EmbeddingConfig,
    embedder: _Embedder | None = None,
    progress: bool = False,
) -> bool:
    """Write d_i for one domain of prepared data unless cached (one Prefect task per domain calls
    this); returns whether the cached embedding was reused."""
    embedder = embedder or _Embedder(ec)
    dom = data.domains[domain]
    fp = fingerprint(
        {
            "docs": dom.fingerprint,
            "embedder": embedder.name,
            "recipe": [ec.sample_size, ec.max_chars, ec.max_chunks_per_doc, ec.seed],
        }
    )
    path = data.embedding_path(dom.name)
    meta = read_embedding_metadata(path)
    reused = meta is not None and meta.get("fingerprint") == fp
    if not reused:
        train = data.documents(dom.name)["train"]
        sample = [
            train[i]["text"] for i in hash_order(column_batches(train, "doc_id"), ec.seed)[: ec.sample_size]
        ]
        vector = embed_domain(sample, embedder.get(), ec, progress, desc=f"embed {dom.name}")
        meta = {
            "embedder": embedder.name,
            "sample_size": len(sample),
            "data_fingerprint": dom.fingerprint,
            "fingerprint": fp,
            "max_chars": ec.max_chars,
            "max_chunks_per_doc": ec.max_chunks_per_doc,
            "dim": len(vector),
        }
        save_domain_embedding(path, dom.name, vector, meta)
    data.embedding_dim, data.embedder = int(meta["dim"]), meta["embedder"]
    return reused
