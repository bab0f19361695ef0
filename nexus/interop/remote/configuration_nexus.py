"""`NexusConfig`: the configuration of a Nexus model (arXiv 2408.15901) exported by `nexus export`.

Standard transformers names where one exists (hidden_size, num_hidden_layers, …); the Nexus
specifics are `parallel_blocks`, `qkv_bias` and, for a Mixture of Experts, `expert_names` (one per
routed expert, its training domain), `router` ("nexus": expert embeddings generated from domain
embeddings, or "linear"), `num_experts_per_tok` (top-k), `shared_expert`, `norm_topk_prob`,
`domain_embed_dim` and `router_hidden_size`; with attention experts (BAM), `attention_experts`
("full" or "shared_kv"), `attention_routing` ("soft" or "top_k"), `attention_top_k` and
`attention_shared_expert`.
"""

from transformers import PretrainedConfig


class NexusConfig(PretrainedConfig):
    model_type = "nexus"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=None,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        parallel_blocks=True,
        qkv_bias=False,
        tie_word_embeddings=False,
        initializer_range=0.02,
        expert_names=None,
        router="nexus",
        num_experts_per_tok=1,
        shared_expert=True,
        norm_topk_prob=False,
        domain_embed_dim=384,
        router_hidden_size=None,
        attention_experts="none",
        attention_routing="soft",
        attention_top_k=1,
        attention_shared_expert=False,
        use_cache=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.parallel_blocks = parallel_blocks
        self.qkv_bias = qkv_bias
        self.initializer_range = initializer_range
        self.expert_names = list(expert_names) if expert_names else None
        self.router = router
        self.num_experts_per_tok = num_experts_per_tok
        self.shared_expert = shared_expert
        self.norm_topk_prob = norm_topk_prob
        self.domain_embed_dim = domain_embed_dim
        self.router_hidden_size = router_hidden_size
        self.attention_experts = attention_experts
        self.attention_routing = attention_routing
        self.attention_top_k = attention_top_k
        self.attention_shared_expert = attention_shared_expert
        self.use_cache = use_cache
        kwargs.pop("rope_parameters", None)  # derived from rope_theta (plain RoPE only)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer; 0 for a dense model."""
        return len(self.expert_names or [])
