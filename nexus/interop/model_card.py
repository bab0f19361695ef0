"""The model card (`README.md`) of an export: what the model is, its experts and their domains, the
data it was trained on, its evaluations and its lineage, from the checkpoint's config and metadata.

The YAML front matter is the Hub's model-card metadata (`huggingface_hub.ModelCard` reads it)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from nexus.config import ModelConfig
from nexus.evaluation.harness import lm_eval_rows
from nexus.interop.hf_format import NEXUS
from nexus.model.routers import get_router


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.6g}" if math.isfinite(v) else str(v)
        return str(v).replace("|", "\\|").replace("\n", " ")

    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows),
        "",
    ]


def _architecture(config: ModelConfig, architecture: str, params: Mapping[str, int]) -> list[str]:
    rows = [
        ("transformers class", f"`{architecture}`" + (" (remote code)" if architecture == NEXUS else "")),
        ("blocks", "parallel attention + FFN" if config.parallel_blocks else "sequential (pre-norm)"),
        ("layers × d_model", f"{config.n_layers} × {config.d_model}"),
        ("attention heads (key/value heads)", f"{config.n_heads} ({config.kv_heads})"),
        ("FFN (SwiGLU) hidden size", config.ffn_hidden),
        ("vocabulary", config.vocab_size),
        ("context (max_seq_len)", config.max_seq_len),
        ("RoPE θ", config.rope_theta),
        ("q/k/v biases", config.qkv_bias),
        ("tied embeddings", config.tie_embeddings),
    ]
    rows += [(f"parameters ({k.replace('_', ' ')})", f"{v:,}") for k, v in params.items()]
    return ["## Architecture", "", *_table(["", ""], rows)]


def _experts(config: ModelConfig, metadata: Mapping[str, Any]) -> list[str]:
    moe = config.moe
    if moe is None:
        return []
    router = get_router(moe.router).description or moe.router
    weights = (metadata.get("data") or {}).get("weights") or {}
    lines = [
        "## Experts",
        "",
        (
            f"Every block's FFN is a Mixture of Experts: y = FFN_s(x) + Σ_{{k ∈ top-{moe.top_k}}} s_k · FFN_k(x), "
            f"s = softmax(x · E). Router: {router}. Shared expert (the seed's FFN): "
            f"{'yes' if moe.shared_expert else 'no'}; top-k gates renormalised: {moe.normalize_gates}."
        ),
        "",
    ]
    if moe.has_attention_experts:
        routing = "soft (every expert)" if moe.attention_routing == "soft" else f"top-{moe.attention_top_k}"
        kv = "own keys and values" if moe.attention_experts == "full" else "shared (averaged) keys and values"
        lines += [
            (
                f"Attention experts (BAM, arXiv 2408.08274): every block's attention mixes one attention expert "
                f"per expert ({kv}), Attn(x) = Σ_k g_k · Attn_k(x), routed {routing} by an attention router of "
                f"its own; shared attention expert (the seed's attention): "
                f"{'yes' if moe.attention_shared_expert else 'no'}."
            ),
            "",
        ]
    rows = [
        (i, name, f"{weights[name]:.3g}" if name in weights else "")
        for i, name in enumerate(moe.expert_names)
    ]
    return lines + _table(["#", "expert (training domain)", "share of the last training mix"], rows)


def _training(metadata: Mapping[str, Any]) -> list[str]:
    rows = [
        (k, metadata[k])
        for k in ("experiment", "stage", "built", "global_step")
        if metadata.get(k) is not None
    ]
    data = metadata.get("data") or {}
    if data.get("fingerprint"):
        rows.append(("data fingerprint", f"`{data['fingerprint']}`"))
    if metadata.get("domains"):
        rows.append(("domains", ", ".join(metadata["domains"])))
    if data.get("weights"):
        rows.append(("training mix", ", ".join(f"{d} {w:.3g}" for d, w in data["weights"].items())))
    train = metadata.get("train_config") or {}
    rows += [(f"train.{k}", train[k]) for k in ("max_steps", "batch_size", "lr") if k in train]
    if not rows:
        return ["## Training data", "", "Not recorded in the checkpoint.", ""]
    return ["## Training data", "", *_table(["", ""], rows)]


def _evaluation(metadata: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["## Evaluation", ""]
    metrics = {k: v for k, v in (metadata.get("metrics") or {}).items() if isinstance(v, (int, float))}
    if metrics:
        lines += [
            "Metrics at the end of training (validation, and the last training step):",
            "",
            *_table(["metric", "value"], sorted(metrics.items())),
        ]
    rows = [row for result in results for row in lm_eval_rows(result)]
    if rows:
        lines += ["lm-eval (`nexus eval`):", "", *_table(["task", "metric", "value"], rows)]
    if not (metrics or rows):
        lines += ["No evaluation recorded; run `nexus eval` and export with `--results`.", ""]
    return lines


def _lineage(metadata: Mapping[str, Any], source: Mapping[str, Any]) -> list[str]:
    keys = ("seed_checkpoint", "init_checkpoint", "stage_fingerprint", "data_dir")
    rows = [(k, f"`{metadata[k]}`") for k in keys if metadata.get(k)]
    rows += [(k, f"`{v}`") for k, v in source.items() if v]
    if (hf := metadata.get("hf") or {}).get("source"):
        rows.append(("imported from", f"`{hf['source']}` ({hf.get('architecture', '?')})"))
    return ["## Lineage", "", *(_table(["", ""], rows) if rows else ["Not recorded.", ""])]


def model_card(
    config: ModelConfig,
    architecture: str,
    metadata: Mapping[str, Any],
    params: Mapping[str, int],
    results: Sequence[Mapping[str, Any]] = (),
    source: Mapping[str, Any] | None = None,
) -> str:
    """The README.md of an export. `params`: parameter counts (`nexus.model.parameter_counts`);
    `results`: lm-eval results dicts; `source`: e.g. the checkpoint path and its weights' SHA-256."""
    kind = "Mixture-of-Experts" if config.is_moe else "dense"
    tags = ["nexus", "text-generation"] + (["mixture-of-experts", "upcycling"] if config.is_moe else [])
    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    remote = ", trust_remote_code=True" if architecture == NEXUS else ""
    title = f"{metadata.get('experiment', 'Nexus')} {kind} model"
    lines = [
        "---",
        *(f"{k}: {json.dumps(v)}" for k, v in front.items()),
        "---",
        "",
        f"# {title}",
        "",
        (
            f"A {kind} decoder trained with Nexus (adaptive upcycling, arXiv 2408.15901) and exported by "
            "`nexus export`; it computes the same logits as the Nexus checkpoint."
        ),
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"tokenizer = AutoTokenizer.from_pretrained(PATH_OR_REPO{remote})",
        f"model = AutoModelForCausalLM.from_pretrained(PATH_OR_REPO{remote})",
        "```",
        "",
        "`nexus import PATH CKPT` restores the Nexus checkpoint bit for bit (config.json `nexus` "
        "records its config and metadata)"
        + (
            "; a Nexus router ships its projection and the domain "
            "embeddings, so `nexus.extend` can add an expert."
            if config.moe is not None and get_router(config.moe.router).uses_domain_embeddings
            else "."
        ),
        "",
    ]
    lines += _architecture(config, architecture, params) + _experts(config, metadata) + _training(metadata)
    lines += _evaluation(metadata, results) + _lineage(metadata, source or {})
    return "\n".join(lines)
