"""Data for Nexus: domain corpora, splits, tokenizer, packing, domain mixtures and embeddings.

Entry points for later stages:
    prepare_experiment(cfg) -> PreparedData      build (or reuse from cache) an experiment's data
    open_prepared(dir) -> PreparedData           open it again: .tokenizer_path, .load_tokenizer(),
                                                 .packed(domain, split), .domain_embeddings(...)
    MixtureSampler / stage_weights               which domain each training sequence comes from
    load_domain_embeddings / check_embedding_dim domain embeddings d_i for the Nexus router
Heavy libraries (datasets, tokenizers, transformers, sentence-transformers) are imported lazily.
See docs/data.md.
"""

from nexus.data.config import (
    DataConfig,
    DomainConfig,
    EmbeddingConfig,
    MixtureConfig,
    PackingConfig,
    SourceConfig,
    SplitConfig,
    TokenizerConfig,
    check_domain_name,
)
from nexus.data.embeddings import (
    Embedder,
    SentenceTransformerEmbedder,
    check_embedding_dim,
    cosine_similarity,
    embed_domain,
    load_domain_embeddings,
    load_embedder,
    save_domain_embedding,
)
from nexus.data.mixture import MixtureSampler, blend, mixture_weights, stage_weights
from nexus.data.packing import PackedSplit
from nexus.data.prepare import embed_prepared_domain, prepare_experiment
from nexus.data.prepared import PreparedData, open_prepared
from nexus.data.presets import demo_config, preset, tiny_config
from nexus.data.sources import check_folder_domain
from nexus.data.tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "DataConfig",
    "DomainConfig",
    "Embedder",
    "EmbeddingConfig",
    "MixtureConfig",
    "MixtureSampler",
    "PackedSplit",
    "PackingConfig",
    "PreparedData",
    "SentenceTransformerEmbedder",
    "SourceConfig",
    "SplitConfig",
    "TokenizerConfig",
    "blend",
    "check_domain_name",
    "check_embedding_dim",
    "check_folder_domain",
    "cosine_similarity",
    "demo_config",
    "embed_domain",
    "embed_prepared_domain",
    "load_domain_embeddings",
    "load_embedder",
    "load_tokenizer",
    "mixture_weights",
    "open_prepared",
    "prepare_experiment",
    "preset",
    "save_domain_embedding",
    "stage_weights",
    "tiny_config",
    "train_tokenizer",
]
