"""Hugging Face interoperability: dense Llama models in, Nexus MoE (Qwen2-MoE) and dense (Llama) out.

See docs/interop.md for what imports and exports, and why each mapping is exact."""
from nexus.interop.hf_export import (
    export_architecture,
    export_checkpoint,
    export_hf,
    hf_config,
    hf_state_dict,
)
from nexus.interop.hf_format import LLAMA, QWEN2_MOE, UnsupportedModelError, tokenizer_files
from nexus.interop.hf_import import (
    check_same_family,
    hf_model_config,
    import_hf,
    load_hf_model,
    model_config_of,
)

__all__ = [
    "LLAMA", "QWEN2_MOE", "UnsupportedModelError", "check_same_family", "export_architecture",
    "export_checkpoint", "export_hf", "hf_config", "hf_model_config", "hf_state_dict", "import_hf",
    "load_hf_model", "model_config_of", "tokenizer_files",
]
