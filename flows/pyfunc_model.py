"""The MLflow `pyfunc` flavour of a Nexus checkpoint, as an MLflow "model from code": MLflow stores this
file as the model's code and the checkpoint (safetensors + config.json + tokenizer.json) as its
artifact `checkpoint`; loading runs this file and `load_checkpoint`, so nothing is unpickled (no
cloudpickled Python object, no pickle-based torch format).

    model = mlflow.pyfunc.load_model("models:/nexus-demo-moe@champion")
    model.predict(pd.DataFrame({"text": ["def add(a, b):"]}), params={"max_new_tokens": 16})
    ->   text | perplexity | bits_per_byte | tokens | continuation

`perplexity` / `bits_per_byte`: of each text scored on its own after an EOS (lm-eval's
`loglikelihood_rolling`, `nexus.evaluation.text_perplexity`); `continuation`: the greedy continuation
of `max_new_tokens` tokens (KV-cached, `nexus.evaluation.generation.generate`; empty for 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

CHECKPOINT = "checkpoint"


def input_example() -> Any:
    import pandas as pd

    return pd.DataFrame({"text": ["Nexus upcycles dense experts into a mixture of experts."]})


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "text")]),
        outputs=Schema(
            [
                ColSpec("string", "text"),
                ColSpec("double", "perplexity"),
                ColSpec("double", "bits_per_byte"),
                ColSpec("long", "tokens"),
                ColSpec("string", "continuation"),
            ]
        ),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 0)]),
    )


class NexusModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from nexus.checkpoint import load_checkpoint
        from nexus.data import load_tokenizer

        path = Path(context.artifacts[CHECKPOINT])
        self.model = load_checkpoint(path).eval()
        self.tokenizer = load_tokenizer(path / "tokenizer.json")

    def predict(self, context, model_input, params=None):  # no type hints: MLflow validates against them
        """model_input: a DataFrame with a `text` column; params: {"max_new_tokens": int}."""
        import pandas as pd
        import torch

        from nexus.evaluation import text_perplexity
        from nexus.evaluation.generation import generate

        new_tokens = int((params or {}).get("max_new_tokens", 0))
        rows = []
        for text in model_input["text"]:
            score = text_perplexity(self.model, self.tokenizer, [text])
            continuation = ""
            if new_tokens > 0:
                ids = self.tokenizer.encode(text, add_special_tokens=False)[-self.model.config.max_seq_len :]
                with torch.no_grad():
                    out = generate(self.model, torch.tensor([ids]), new_tokens)
                continuation = self.tokenizer.decode(out[0, len(ids) :].tolist())
            rows.append(
                {
                    "text": text,
                    "perplexity": score.perplexity,
                    "bits_per_byte": score.bits_per_byte,
                    "tokens": score.tokens,
                    "continuation": continuation,
                }
            )
        return pd.DataFrame(rows)


mlflow.models.set_model(NexusModel())
