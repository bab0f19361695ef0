"""Evaluation: held-out perplexity, the lm-eval adapter, routing specialization, embedding geometry
and the comparison report. See docs/evaluation.md.

The lm-eval model class lives in `nexus.evaluation.lm_eval_adapter` (imported on demand: importing
it registers `nexus` with lm-eval); plots import matplotlib on first use.
"""

from nexus.evaluation.embeddings import EmbeddingGeometry, embedding_geometry
from nexus.evaluation.gate import GateVerdict, promotion_gate
from nexus.evaluation.perplexity import (
    Perplexity,
    domain_perplexities,
    evaluate_checkpoints,
    split_perplexity,
    text_perplexity,
)
from nexus.evaluation.report import relative_gains, write_report
from nexus.evaluation.routing import RoutingAnalysis, analyze_routing

__all__ = [
    "EmbeddingGeometry",
    "GateVerdict",
    "Perplexity",
    "RoutingAnalysis",
    "analyze_routing",
    "domain_perplexities",
    "embedding_geometry",
    "evaluate_checkpoints",
    "promotion_gate",
    "relative_gains",
    "split_perplexity",
    "text_perplexity",
    "write_report",
]
