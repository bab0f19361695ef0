"""Debian packages as corpora. The package lookups only need apt's local lists; the download test
needs the registry (marked `network`)."""

import shutil
import time

import pytest

from nexus.data import debian
from nexus.data.config import SourceConfig, SplitConfig
from nexus.data.documents import split_documents
from nexus.data.sources import read_source, source_identity
from nexus.errors import DataError

needs_apt = pytest.mark.skipif(
    shutil.which("apt-cache") is None or not any(debian.APT_LISTS.glob("*_Packages*")),
    reason="needs apt with package lists",
)


@needs_apt
def test_unknown_package_names_domain_and_package():
    with pytest.raises(DataError, match="domain 'lore': Debian package 'no-such-package-nexus'"):
        source_identity(SourceConfig("debian", package="no-such-package-nexus", format="text"), "lore")


@needs_apt
def test_metapackage_resolves_to_the_versioned_package():
    resolved = debian.resolve_package("python3-doc", "python-docs")
    assert (
        len(resolved) == 1 and resolved[0].name.startswith("python3.") and resolved[0].name.endswith("-doc")
    )
    assert debian.resolve_package("jargon-text", "lore")[0].name == "jargon-text"


@pytest.mark.network
def test_lore_domain_builds_from_its_debian_packages(tmp_path):
    sources = [
        SourceConfig("debian", package="jargon-text", format="jargon"),
        SourceConfig("debian", package="fortunes", format="fortunes"),
    ]
    t0 = time.perf_counter()
    docs = [d for src in sources for d in read_source(src, "lore", tmp_path)]
    first = time.perf_counter() - t0
    splits = split_documents("lore", docs, SplitConfig(), "debian")
    assert len(splits["train"].text) > 10_000 and len(splits["validation"].text) > 300
    assert any(
        ":hacker:" in t for t in splits["train"].text + splits["test"].text + splits["validation"].text
    )
    extracted = sorted(p.name for p in (tmp_path / "debian").iterdir())
    assert [p.split("_")[0] for p in extracted] == ["fortunes", "jargon-text"]
    t0 = time.perf_counter()
    again = [d for src in sources for d in read_source(src, "lore", tmp_path)]  # from the cache
    assert again == docs and time.perf_counter() - t0 < first
