"""Experiment presets.

demo: the four initial domains from Debian packages (downloaded via apt into the cache, never
  installed) plus the interpreter's stdlib as the held-out `code` domain for the extension run.
tiny: the same five domains from the small fixture corpora committed under
  tests/fixtures/corpora (same file formats, a few KB each), sized for tests.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from nexus.data.config import (
    DataConfig,
    DomainConfig,
    EmbeddingConfig,
    PackingConfig,
    SourceConfig,
    SplitConfig,
    TokenizerConfig,
)
from nexus.errors import ConfigError

# domain -> {package: format}. Metapackages (linux-doc, python3-doc) follow the registry's version.
DEMO_PACKAGES: dict[str, dict[str, str]] = {
    "dictionary": {"dict-gcide": "dictd"},
    "kernel-docs": {"linux-doc": "rst"},
    "python-docs": {"python3-doc": "rst"},
    "lore": {"jargon-text": "jargon", "fortunes": "fortunes"},
}
# Held-out domains for extensions, besides the stdlib's `code`: one that no initial domain documents
# (German quotes, jokes, proverbs and recipes; MiniLM cosine < 0.3 with every initial domain, docs/results.md).
HELD_OUT_PACKAGES: dict[str, dict[str, str]] = {"german": {"fortunes-de": "fortunes"}}
# domain (a subfolder of the fixture corpora) -> format
TINY_FORMATS: dict[str, str] = {
    "dictionary": "dictd",
    "kernel-docs": "rst",
    "python-docs": "rst",
    "lore": "jargon",
    "code": "python",
}


def demo_config(corpora_dir: str | Path | None = None, **overrides: Any) -> DataConfig:
    """The demo experiment (Debian packages and the stdlib: `corpora_dir` is not used); `overrides`
    replace DataConfig fields (e.g. out_dir, cache_dir)."""
    domains = [DomainConfig.debian(name, pkgs, skip_undecodable=True) for name, pkgs in DEMO_PACKAGES.items()]
    domains.append(DomainConfig("code", (SourceConfig("stdlib"),), held_out=True))
    domains += [DomainConfig.debian(name, pkgs, held_out=True) for name, pkgs in HELD_OUT_PACKAGES.items()]
    cfg = DataConfig(
        experiment="demo",
        domains=tuple(domains),
        tokenizer=TokenizerConfig(vocab_size=4096, sample_chars_per_domain=2_000_000),
        packing=PackingConfig(seq_len=256, num_proc=2, batch_size=1000),
        embedding=EmbeddingConfig(sample_size=64, batch_size=32, max_chars=1000, max_chunks_per_doc=1),
    )
    return replace(cfg, **overrides)


def tiny_config(corpora_dir: str | Path, **overrides: Any) -> DataConfig:
    """The fixture experiment (tests): 4 initial domains + held-out `code`, tiny vocab and sizes."""
    root = Path(corpora_dir)
    domains = []
    for name, fmt in TINY_FORMATS.items():
        sources = [SourceConfig("folder", path=str(root / name), format=fmt)]
        if name == "lore":
            sources.append(SourceConfig("folder", path=str(root / name), format="fortunes"))
        domains.append(DomainConfig(name, tuple(sources), held_out=name == "code"))
    cfg = DataConfig(
        experiment="tiny",
        domains=tuple(domains),
        splits=SplitConfig(validation=0.2, test=0.2),
        tokenizer=TokenizerConfig(vocab_size=512, sample_chars_per_domain=20_000),
        packing=PackingConfig(seq_len=32, num_proc=1, batch_size=64),
        embedding=EmbeddingConfig(sample_size=8, batch_size=32, max_chars=200, max_chunks_per_doc=1),
    )
    return replace(cfg, **overrides)


PRESETS = {"demo": demo_config, "tiny": tiny_config}
"""name -> function(corpora_dir, **DataConfig overrides) -> DataConfig (Hydra's `data.preset`)."""


def preset(name: str, corpora_dir: str | Path | None = None, **overrides: Any) -> DataConfig:
    """The preset `name`; `corpora_dir`: the local corpora of a preset that reads them (tiny)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown data experiment {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name](corpora_dir, **overrides)
