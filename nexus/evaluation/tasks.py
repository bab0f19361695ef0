"""An offline lm-eval task suite from held-out domain text: one perplexity task per domain.

Each task reads a local JSONL file (`{"text": ...}` per line) and is scored through
`loglikelihood_rolling` (word_perplexity, byte_perplexity, bits_per_byte), so evaluation needs no
hub. `write_task_suite` writes the JSONL files, one YAML config per task and a group
`<prefix>` (all domains) into a directory usable as lm-eval's `--include_path`, and returns the
configs as dicts for `lm_eval.simple_evaluate(tasks=...)`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# metric -> aggregation (lm-eval's defaults for loglikelihood_rolling, stated to keep it quiet)
PERPLEXITY_METRICS = {
    "word_perplexity": "weighted_perplexity",
    "byte_perplexity": "weighted_perplexity",
    "bits_per_byte": "bits_per_byte",
}


@dataclass
class TaskSuite:
    """Names, config dicts and the include_path directory of a written suite."""

    include_path: Path
    group: str
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    def task_manager(self):
        """A TaskManager that sees only this suite (the default index costs ~10 s)."""
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=str(self.include_path), include_defaults=False)


def perplexity_task_config(name: str, data_file: str | Path) -> dict[str, Any]:
    """An lm-eval task config scoring every line's `text` with `loglikelihood_rolling`."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "should_decontaminate": False,
        "metric_list": [
            {"metric": m, "aggregation": agg, "higher_is_better": False}
            for m, agg in PERPLEXITY_METRICS.items()
        ],
        "metadata": {"version": 1.0},
    }


def write_task_suite(
    domain_texts: Mapping[str, Sequence[str]], out_dir: str | Path, prefix: str = "nexus_heldout"
) -> TaskSuite:
    """Write `<out_dir>/<prefix>_<domain>.{jsonl,yaml}` per domain and `<prefix>.yaml` (the group)."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suite = TaskSuite(out.resolve(), prefix)
    for domain, texts in domain_texts.items():
        name = f"{prefix}_{domain}"
        data_file = out / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts if t))
        suite.configs[name] = perplexity_task_config(name, data_file)
        (out / f"{name}.yaml").write_text(yaml.safe_dump(suite.configs[name], sort_keys=False))
    (out / f"{prefix}.yaml").write_text(
        yaml.safe_dump({"group": prefix, "task": suite.names}, sort_keys=False)
    )
    return suite


def split_texts(split: Any, tokenizer: Any, max_documents: int | None = None) -> list[str]:
    """The documents of a packed split (`nexus.data.packing.PackedSplit`: `.tokens` and
    `.doc_offsets`, each document ending in EOS) decoded back to text."""
    tokens, offsets = np.asarray(split.tokens), np.asarray(split.doc_offsets)
    n_docs = len(offsets) - 1 if max_documents is None else min(max_documents, len(offsets) - 1)
    texts = []
    for d in range(n_docs):
        ids = tokens[offsets[d] : offsets[d + 1]].tolist()
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts
