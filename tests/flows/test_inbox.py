"""The scheduled inbox extension: a new domain folder dropped into the inbox is added to the latest
registered MoE by the `micro-inbox` deployment's flow (`extend_from_inbox`, called with the
deployment's own parameters); a second run finds nothing new and is a logged no-op."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from flows.extend import extend_from_inbox
from flows.serve import build_deployments
from nexus.checkpoint import read_checkpoint_config

from .conftest import CORPORA, registry_versions

DOMAIN = "snippets"


def write_domain(folder: Path) -> int:
    """A JSONL domain: one document per top-level block of the fixture corpus' Python files."""
    folder.mkdir(parents=True)
    docs = [block.strip() for path in sorted((CORPORA / "code").glob("*.py"))
            for block in path.read_text().split("\n\n\n") if len(block.strip()) > 40]
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return len(docs)


def test_inbox_extends_once_then_is_a_noop(micro_moe, caplog):
    out, uri, overrides, _ = micro_moe
    inbox = out / "inbox"  # the micro experiment's extension.inbox (${out_dir}/inbox)
    assert write_domain(inbox / DOMAIN) >= 20
    (deployment,) = [d for d in build_deployments("micro", overrides) if d.name == "micro-inbox"]
    before = registry_versions(uri)

    flow_logger = logging.getLogger("prefect.flow_runs")
    flow_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="prefect.flow_runs"):
            first = extend_from_inbox(**deployment.parameters)
            assert first["inbox"] == str(inbox) and first["extended"] == [DOMAIN]
            after = registry_versions(uri)
            assert after == [*before, max(before) + 1] and first["versions"] == [str(max(before) + 1)]
            caplog.clear()
            second = extend_from_inbox(**deployment.parameters)
    finally:
        flow_logger.removeHandler(caplog.handler)

    assert second == {"inbox": str(inbox), "extended": [], "versions": []}
    assert registry_versions(uri) == after
    assert any("no new domains" in r.getMessage() and DOMAIN in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    summary = json.loads((out / "extensions" / DOMAIN / "summary.json").read_text())
    assert summary["registered_version"] == first["versions"][0]
    names = read_checkpoint_config(summary["extended"])["model"]["moe"]["expert_names"]
    assert names[:2] == ["dictionary", "lore"] and names[-1] == DOMAIN
    assert DOMAIN in summary["perplexity"]["after"]
