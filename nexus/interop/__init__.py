"""Hugging Face interoperability: dense Llama / Mistral / Qwen2 models in, every Nexus model out
(Llama, Qwen2, Qwen2-MoE without remote code where they are exact, else the remote-code
`NexusForCausalLM`) and back in bit for bit.

See docs/interop.md for what imports and exports, and why each mapping is exact."""

from nexus.interop.hf_export import (
    export_architecture,
    export_checkpoint,
    export_hf,
    hf_config,
    hf_state_dict,
)
from nexus.interop.hf_format import (
    LLAMA,
    MISTRAL,
    NEXUS,
    QWEN2,
    QWEN2_MOE,
    UnsupportedModelError,
    tokenizer_files,
)
from nexus.interop.hf_import import (
    check_same_family,
    hf_model_config,
    import_hf,
    load_hf_model,
    model_config_of,
)

__all__ = [
    "LLAMA",
    "MISTRAL",
    "NEXUS",
    "QWEN2",
    "QWEN2_MOE",
    "UnsupportedModelError",
    "check_same_family",
    "export_architecture",
    "export_checkpoint",
    "export_hf",
    "hf_config",
    "hf_model_config",
    "hf_state_dict",
    "import_hf",
    "load_hf_model",
    "model_config_of",
    "tokenizer_files",
]
