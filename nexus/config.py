"""Typed model configuration: the whole architecture in two dataclasses.

`conf/model/*.yaml` mirrors `ModelConfig` (registered as a Hydra structured config), so a typo in a
key fails when the config is composed, not an hour into training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nexus.errors import ConfigError

ATTENTION_EXPERTS = ("none", "full", "shared_kv")
DEFAULT_ROUTER = "nexus"
"""The paper's router; the others (`nexus.model.routers.ROUTERS`) are baselines."""


@dataclass
class MoEConfig:
    """The MoE FFN that replaces every block's dense FFN after upcycling."""

    expert_names: list[str] = field(default_factory=list)
    """One name per routed expert, usually its training domain; `n_experts = len(expert_names)`."""
    router: str = DEFAULT_ROUTER
    """A name in `nexus.model.routers.ROUTERS`: `nexus` (domain-embedding projection) or `linear` (BTX
    baseline)."""
    top_k: int = 1
    """Routed experts per token (the paper uses 1)."""
    shared_expert: bool = True
    """An always-on expert (the seed's FFN) added to the routed output."""
    normalize_gates: bool = False
    """Renormalise the top-k gates to sum to 1. Off in the paper: `y = FFN_s(x) + s_k FFN_ek(x)`."""
    domain_embed_dim: int = 384
    """m, the dimension of the domain embeddings `d_i` (Nexus router only)."""
    router_hidden: int | None = None
    """Hidden size of the Nexus projection MLP; default d_model (the paper's W1: m -> 2h)."""
    load_balance_coef: float = 0.05
    """Switch load-balancing loss factor (the paper's default 0.05; ablation 0.0005)."""
    z_loss_coef: float = 0.0
    """Router z-loss factor (ST-MoE); 0 disables it."""
    dispatch: str = "sorted"
    """`sorted`: sort tokens by expert, one matmul per expert on a contiguous slice (any device).
    `grouped_mm`: one `torch._grouped_mm` call per projection over all experts, in the autocast dtype,
    with no host sync (the GPU path; torch >= 2.13 also runs it on CPU)."""
    attention_experts: str = "none"
    """BAM (arXiv 2408.08274): `none` (the experts' attention weights are averaged), `full` (each
    expert's Q, K, V, O become an attention expert) or `shared_kv` (per-expert Q and O; K and V averaged,
    so the KV cache costs what the dense model's does). See `nexus.model.attention_experts`."""
    attention_routing: str = "soft"
    """`soft`: every attention expert, weighted by its router probability (BAM's choice); `top_k`: the
    `attention_top_k` most probable ones, gates renormalised to sum to 1."""
    attention_top_k: int = 1
    attention_shared_expert: bool = False
    """An always-on attention expert (the seed's attention) added to the routed mixture, as the shared
    FFN expert is."""

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    def __post_init__(self) -> None:
        self.expert_names = list(self.expert_names)
        if len(set(self.expert_names)) != len(self.expert_names):
            raise ConfigError(f"moe.expert_names has duplicates: {self.expert_names}")
        from nexus.model.routers import get_router  # imports torch: only once an MoE config is built

        get_router(self.router)  # ConfigError naming the registered routers
        if self.dispatch not in ("sorted", "grouped_mm"):
            raise ConfigError(f"moe.dispatch must be 'sorted' or 'grouped_mm', got {self.dispatch!r}")
        if self.top_k < 1:
            raise ConfigError(f"moe.top_k must be >= 1, got {self.top_k}")
        if self.expert_names and self.top_k > self.n_experts:
            raise ConfigError(f"moe.top_k={self.top_k} exceeds the number of experts ({self.n_experts})")
        if self.domain_embed_dim < 1:
            raise ConfigError(f"moe.domain_embed_dim must be >= 1, got {self.domain_embed_dim}")
        if self.attention_experts not in ATTENTION_EXPERTS:
            raise ConfigError(
                f"moe.attention_experts must be one of {ATTENTION_EXPERTS}, got {self.attention_experts!r}"
            )
        if self.attention_routing not in ("soft", "top_k"):
            raise ConfigError(
                f"moe.attention_routing must be 'soft' or 'top_k', got {self.attention_routing!r}"
            )
        if not 1 <= self.attention_top_k <= max(self.n_experts, 1):
            raise ConfigError(
                f"moe.attention_top_k={self.attention_top_k} must be in [1, {self.n_experts}] "
                "(the number of experts)"
            )

    @property
    def has_attention_experts(self) -> bool:
        return self.attention_experts != "none"


@dataclass
class ModelConfig:
    """A decoder-only transformer: RMSNorm, RoPE, SwiGLU, no biases (but optional q/k/v ones); dense, or MoE
    when `moe` is set."""

    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    """Grouped-query attention; None means n_heads (multi-head attention)."""
    ffn_hidden: int = 128
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    parallel_blocks: bool = True
    """Parallel attention + FFN (the paper's, as in PaLM/GPT-J) or sequential (Llama) blocks."""
    tie_embeddings: bool = False
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2 has them); no other layer has biases."""
    init_std: float = 0.02
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"model head size {self.d_model // self.n_heads} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from a plain dict (e.g. config.json), naming any unknown key and where it came from."""
        _check_keys(cls, data, source)
        moe = data.get("moe")
        if moe is not None:
            _check_keys(MoEConfig, moe, f"{source}: moe")
        try:
            return cls(**{**data, "moe": MoEConfig(**moe) if moe is not None else None})
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from err

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the dense weights' meaning: what two models must share to be combined
        (initialisation settings excluded, `n_kv_heads` resolved)."""
        arch = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("moe", "init_std")
        }
        arch["n_kv_heads"] = self.kv_heads
        return arch

    def dense(self) -> ModelConfig:
        """The same architecture without the MoE layer (the seed / expert shape)."""
        return dataclasses.replace(self, moe=None)

    def with_moe(self, **moe_fields: Any) -> ModelConfig:
        return dataclasses.replace(self, moe=MoEConfig(**moe_fields))


def _check_keys(cls: type, data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")


def tiny(**overrides: Any) -> ModelConfig:
    """The preset every unit test uses: 2 layers, d_model 32."""
    base = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})
