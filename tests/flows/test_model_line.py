"""A model line extended round after round, the way a user drives it (the `nexus` CLI, in process,
against the real Prefect test harness, a real SQLite MLflow store and real micro training):

1. `nexus run extend` with a harmful finetune (the `paper` recipe, which trains every weight, at a
   huge learning rate): registered as a candidate, its gate fails, `champion` stays on version 1;
2. `nexus run inbox` with three new domain folders (and the harmful one, not retried on the same
   champion): three rounds, each building on the champion of its time, every earlier domain in the
   finetuning mix and the evaluation;
3. `nexus run inbox` again: nothing new;
4. `nexus run remove` of the second round's domain.
The scenario runs once (module fixture); the tests only read what it produced.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from flows.models import CANDIDATE, CHAMPION, TAG_BASE, TAG_GATE, line_aliases, resolve_model
from flows.tracking import configure as configure_tracking
from nexus.checkpoint import load_checkpoint, read_checkpoint_config
from nexus.upcycling import is_ffn_key, remove_expert

from .conftest import build_line, domain_folder

LINE = "nexus-micro-moe"
INBOX = {"kernel": "kernel-docs", "pydocs": "python-docs", "snippets": "code"}  # name order = round order
HARMFUL = "harmful"


def cli(*args: str) -> int:
    from flows.cli import main

    return main(list(args))


@pytest.fixture(scope="module")
def scenario(prefect_harness, tmp_path_factory):
    import mlflow

    out, uri, overrides, pipeline = build_line(
        tmp_path_factory, "line", "router.routers=[nexus]", "router.dense_merge=false"
    )
    previous = mlflow.get_tracking_uri()
    try:
        harmful = domain_folder(tmp_path_factory.mktemp("inputs") / HARMFUL, "python-docs")
        assert (
            cli(
                "run",
                "extend",
                "--experiment",
                "micro",
                "--domain",
                HARMFUL,
                "--folder",
                str(harmful),
                *overrides,
                "recipe=paper",
                "train.extension.lr=3.0",
            )
            == 0
        )
        inbox = out / "inbox"  # the micro experiment's extension.inbox: ${out_dir}/inbox
        for name, corpus in INBOX.items():
            domain_folder(inbox / name, corpus)
        domain_folder(inbox / HARMFUL, "python-docs")
        assert cli("run", "inbox", "--experiment", "micro", *overrides) == 0
        (inbox / HARMFUL / "docs.jsonl").unlink()
        (inbox / HARMFUL).rmdir()
        assert cli("run", "inbox", "--experiment", "micro", *overrides) == 0  # nothing new
        second = list(INBOX)[1]
        assert cli("run", "remove", "--experiment", "micro", "--domain", second, *overrides) == 0
    finally:
        configure_tracking(previous)

    def summary(*parts: str) -> dict:
        return json.loads((out.joinpath(*parts) / "summary.json").read_text())

    client = MlflowClient(uri)
    return {
        "out": out,
        "uri": uri,
        "client": client,
        "pipeline": pipeline,
        "harmful": summary("extensions", HARMFUL),
        "rounds": [summary("extensions", d) for d in INBOX],
        "removal": next(json.loads(p.read_text()) for p in (out / "removals").rglob("summary.json")),
        "versions": {int(v.version): v for v in client.search_model_versions(f"name = '{LINE}'")},
        "aliases": line_aliases(LINE, client),
    }


def test_harmful_extension_stays_a_candidate(scenario):
    harmful, versions = scenario["harmful"], scenario["versions"]
    assert harmful["base"]["version"] == "1" and harmful["registered_version"] == "2"
    assert not harmful["gate"]["passed"] and not harmful["line"]["promoted"]
    assert harmful["gate"]["domains"]["dictionary"]["passed"] is False  # an old domain got worse
    assert versions[2].tags[TAG_GATE] == "failed" and versions[1].tags[TAG_GATE] == "initial"
    parent = scenario["client"].get_run(versions[2].run_id).data.tags["mlflow.parentRunId"]
    run = scenario["client"].get_run(parent)  # the verdict is on the extension's MLflow run too
    assert run.data.tags["nexus.gate"] == "failed" and run.data.metrics["gate/passed"] == 0.0
    assert not run.data.metrics["gate/dictionary/after"] <= 1.05 * run.data.metrics["gate/dictionary/before"]


def test_inbox_rounds_build_on_the_champion_of_their_time(scenario):
    rounds, versions = scenario["rounds"], scenario["versions"]
    assert rounds[0]["base"]["ref"] == f"models:/{LINE}@{CHAMPION}"
    assert rounds[0]["base"]["version"] == "1"  # the champion, not the harmful version 2
    champion = "1"
    for r in rounds:
        assert r["base"]["version"] == champion
        assert r["line"]["promoted"] == r["gate"]["passed"]
        assert versions[int(r["registered_version"])].tags[TAG_BASE] == f"models:/{LINE}/{champion}"
        champion = r["registered_version"] if r["gate"]["passed"] else champion
    registered = [int(r["registered_version"]) for r in rounds]
    assert registered == [3, 4, 5]
    removal = int(scenario["removal"]["registered_version"])
    assert scenario["aliases"][CANDIDATE] == str(removal) == "6"
    expected_champion = removal if scenario["removal"]["line"]["promoted"] else int(champion)
    assert scenario["aliases"][CHAMPION] == str(expected_champion)


def test_every_round_mixes_and_evaluates_every_earlier_domain(scenario):
    rounds = scenario["rounds"]
    served = ["dictionary", "lore"]
    for r, domain in zip(rounds, INBOX):
        base_experts = read_checkpoint_config(r["moe"])["model"]["moe"]["expert_names"]
        served = [*base_experts, domain]
        assert r["domains"] == served
        assert set(r["finetune_weights"]) == set(served) and all(
            w > 0 for w in r["finetune_weights"].values()
        )
        assert all(set(row) == set(served) for row in r["perplexity"].values())
        extended = read_checkpoint_config(r["extended"])
        assert extended["model"]["moe"]["expert_names"] == served
        assert list(extended["metadata"]["domain_data"]) == sorted(served)  # every domain's data is recorded
        assert (
            extended["metadata"]["base"]["sha256"]
            == read_checkpoint_config(r["moe"])["sha256"]["model.safetensors"]
        )
    final = read_checkpoint_config(rounds[-1]["extended"])["model"]["moe"]["expert_names"]
    assert (
        final[:2] == ["dictionary", "lore"]
        and final[-1] == "snippets"
        and set(final) >= {"dictionary", "lore"}
    )


def test_second_inbox_run_was_a_noop(scenario):
    # versions: 1 pipeline, 2 harmful, 3-5 inbox rounds, 6 removal; nothing from the second inbox run
    assert sorted(scenario["versions"]) == [1, 2, 3, 4, 5, 6]


def _ffn_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if is_ffn_key(k)}


def test_removal_keeps_every_other_expert_exactly(scenario):
    removal = scenario["removal"]
    removed = list(INBOX)[1]
    before, after = load_checkpoint(removal["moe"]), load_checkpoint(removal["result"])
    names = before.config.moe.expert_names
    assert after.config.moe.expert_names == [n for n in names if n != removed]
    keep = [i for i, n in enumerate(names) if n != removed]
    for key, tensor in _ffn_state(after).items():
        old = _ffn_state(before)[key]
        expected = old[keep] if (".ffn.experts." in key or key.endswith("router.weight")) else old
        assert torch.equal(tensor, expected), key
    assert torch.equal(after.domain_embeddings, before.domain_embeddings[keep])
    assert removal["domains"] == after.config.moe.expert_names
    assert set(removal["perplexity"]["after"]) == set(after.config.moe.expert_names)


def test_removing_the_last_rounds_expert_restores_the_round_before(scenario):
    """remove_expert(appended MoE of round 3, its domain) gives back round 3's base, FFN and router
    parts bit for bit (the non-FFN merge of `extend` is the only thing it cannot undo)."""
    last, domain = scenario["rounds"][-1], list(INBOX)[-1]
    appended = load_checkpoint(Path(last["extended"]).parent.parent / "extended")
    base = load_checkpoint(last["moe"])
    restored = remove_expert(appended, domain)
    assert restored.config.moe.expert_names == base.config.moe.expert_names
    for key, tensor in _ffn_state(base).items():
        assert torch.equal(_ffn_state(restored)[key], tensor), key
    assert torch.equal(restored.domain_embeddings, base.domain_embeddings)


def test_model_references_reach_every_version(scenario):
    uri = scenario["uri"]
    by_alias = resolve_model(f"models:/{LINE}@{CHAMPION}", LINE, uri)
    assert by_alias.version == scenario["aliases"][CHAMPION]
    assert resolve_model(LINE, LINE, uri).version == by_alias.version  # a bare name is its champion
    assert resolve_model(f"models:/{LINE}/2", LINE, uri).moe["expert_names"][-1] == HARMFUL


def test_every_run_saves_its_resolved_config(scenario):
    """The pipeline, each extension (the CLI's overrides included) and the removal leave the config
    they ran with next to their outputs, as `config.yaml` that loads back into `PipelineConfig`."""
    from omegaconf import OmegaConf

    from flows.config import PipelineConfig

    def saved(folder: Path) -> PipelineConfig:
        raw = OmegaConf.load(folder / "config.yaml")
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PipelineConfig), raw))

    out = scenario["out"]
    pipeline = saved(out)
    assert pipeline.router.routers == ["nexus"] and pipeline.out_dir == str(out)
    harmful = saved(out / "extensions" / HARMFUL)
    assert harmful.train.extension.lr == 3.0 and harmful.extension.recipe == "paper"
    assert all(saved(out / "extensions" / d).train.extension.lr != 3.0 for d in INBOX)
    removal = next((out / "removals").rglob("summary.json")).parent
    assert saved(removal) == pipeline  # composed from the same experiment and overrides
