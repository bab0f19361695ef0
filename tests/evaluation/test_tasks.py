"""The offline task suite: files, configs, lm-eval's TaskManager sees the tasks and the group."""

import json

import numpy as np

from nexus.evaluation.tasks import split_texts, write_task_suite


def test_suite_files_and_task_manager(tmp_path):
    suite = write_task_suite({"code": ["x = 1", "", "y = 2"], "prose": ["Hello there."]}, tmp_path)
    assert suite.names == ["nexus_heldout_code", "nexus_heldout_prose"]
    lines = (tmp_path / "nexus_heldout_code.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["x = 1", "y = 2"]  # empty documents dropped
    config = suite.configs["nexus_heldout_code"]
    assert config["output_type"] == "loglikelihood_rolling"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(
        (tmp_path / "nexus_heldout_code.jsonl").resolve()
    )
    manager = suite.task_manager()
    assert {"nexus_heldout", *suite.names} <= set(manager.all_tasks)


def test_split_texts_decodes_packed_documents(tokenizer):
    docs = ["def f(x):\n    return x\n", "Über naïve café 😀", "the end."]
    ids, offsets = [], [0]
    for doc in docs:
        ids += tokenizer.encode(doc) + [tokenizer.eos_token_id]
        offsets.append(len(ids))

    class Split:  # the attributes nexus.data.packing.PackedSplit offers
        tokens = np.array(ids, dtype=np.uint16)
        doc_offsets = np.array(offsets)

    assert split_texts(Split(), tokenizer) == docs
    assert split_texts(Split(), tokenizer, max_documents=2) == docs[:2]
