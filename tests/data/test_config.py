"""Config validation and presets."""

from pathlib import Path

import pytest

from nexus.data.config import (
    DataConfig,
    DomainConfig,
    MixtureConfig,
    SourceConfig,
    SplitConfig,
    TokenizerConfig,
)
from nexus.data.presets import demo_config, preset, tiny_config
from nexus.errors import ConfigError, DataError

CORPORA = Path(__file__).parents[1] / "fixtures" / "corpora"


def test_presets_have_four_initial_domains_and_held_out_code():
    for cfg in (demo_config(), tiny_config(CORPORA)):
        assert cfg.initial_domains == ["dictionary", "kernel-docs", "python-docs", "lore"]
    assert tiny_config(CORPORA).held_out_domains == ["code"]
    assert demo_config().held_out_domains == ["code", "german"]
    assert demo_config().resolved_out_dir() == "outputs/data/demo"
    assert {s.package for d in demo_config().domains for s in d.sources if s.kind == "debian"} == {
        "dict-gcide",
        "linux-doc",
        "python3-doc",
        "jargon-text",
        "fortunes",
        "fortunes-de",
    }


def test_duplicate_domain_names_are_a_data_error_naming_the_domain():
    dom = DomainConfig.folder("news", "/tmp/x")
    with pytest.raises(DataError, match="news"):
        DataConfig("exp", (dom, DomainConfig.folder("news", "/tmp/y")))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SplitConfig(validation=0.6, test=0.5), "sum to < 1"),
        (lambda: SourceConfig("ftp", path="x"), "kind"),
        (lambda: SourceConfig("folder"), "needs `path`"),
        (lambda: SourceConfig("debian"), "needs `package`"),
        (lambda: SourceConfig("folder", path="x", format="pdf"), "format"),
        (lambda: SourceConfig("hf", path="x", filter_field="meta.set"), "go together"),
        (lambda: TokenizerConfig(vocab_size=100), "vocab_size"),
        (lambda: MixtureConfig(weighting="explicit"), "weights"),
        (lambda: MixtureConfig(general_share=1.5), "general_share"),
        (lambda: DomainConfig("bad name!", (SourceConfig("stdlib"),)), "bad name"),
        (lambda: DataConfig("e", (DomainConfig.folder("a", "x", held_out=True),)), "no initial"),
        (
            lambda: DataConfig(
                "e", (DomainConfig.folder("a", "x"),), mixture=MixtureConfig("explicit", {"zz": 1.0})
            ),
            "unknown domains",
        ),
        (lambda: preset("nope"), "unknown data experiment"),
    ],
)
def test_invalid_config_fails_with_a_clear_error(make, match):
    with pytest.raises(ConfigError, match=match):
        make()
