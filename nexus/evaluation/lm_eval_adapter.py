"""lm-eval model class `nexus`: any lm-eval task on a Nexus checkpoint, with its own tokenizer.

Importing this module registers the class. From Python:

    import nexus.evaluation.lm_eval_adapter  # noqa: F401, PLW0406  (registers "nexus")
    lm_eval.simple_evaluate(model="nexus", model_args={"path": "ckpt/moe"}, tasks=[...])

From the shell, run lm-eval's own CLI through this module (so the class is registered first):

    python -m nexus.evaluation.lm_eval_adapter run --model nexus --model_args path=ckpt/moe \
        --tasks nexus_heldout_code --include_path outputs/eval/tasks

(`lm_eval --model nexus` does not work: lm-eval 0.4.13 finds no third-party model classes. Prefer
`nexus eval`, which picks this class for a checkpoint and lm-eval's `hf` for an export.)

Scoring is batched through `nexus.evaluation.perplexity.score_windows`, so `loglikelihood_rolling`
and `text_perplexity` are one computation; `generate_until` decodes with the KV cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from nexus.evaluation.generation import generate_tokens
from nexus.evaluation.perplexity import Window, document_windows, score_windows
from nexus.model.transformer import Transformer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# lm-eval 0.4.13 loads its own model classes (`hf`, …) only into an empty registry: load them first.
import lm_eval.models  # noqa: E402, F401

# Run as `python -m`, this file is `__main__`; the class is registered by importing the module
# proper below instead (registering both copies under one name is an error in lm-eval).
_register = register_model("nexus") if __name__ != "__main__" else (lambda cls: cls)


@_register
class NexusLM(TemplateLM):
    """model_args: `path` (checkpoint directory), or `model` (a Transformer) with `tokenizer` (a
    tokenizer.json path or a PreTrainedTokenizerFast); optional `batch_size`, `device`, `dtype`,
    `max_length` (default the model's max_seq_len), `max_gen_toks`."""

    def __init__(
        self,
        path: str | None = None,
        model: Transformer | None = None,
        tokenizer: Any = None,
        batch_size: int | str | None = 8,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 64,
        **_ignored: Any,
    ) -> None:
        super().__init__()
        from nexus.data.tokenizer import load_tokenizer

        if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm-eval's CLI defaults to cuda
        self._device = torch.device(device)
        if model is None:
            if path is None:
                raise ValueError(
                    "nexus model: give model_args path=<checkpoint dir> (or model= and tokenizer=)"
                )
            from nexus.checkpoint import load_checkpoint

            model = load_checkpoint(path, device=self._device, dtype=_DTYPES.get(dtype or "float32"))
            tokenizer = tokenizer or Path(path) / "tokenizer.json"
        if tokenizer is None:
            raise ValueError(
                "nexus model: no tokenizer (pass tokenizer= or a checkpoint with tokenizer.json)"
            )
        self.model = model.to(self._device).eval()
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        # lm-eval passes "auto" / strings from the CLI; we batch by a fixed size.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length or model.config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or "nexus-bpe"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context_ids, continuation_ids); the continuation is
        scored after as much of the context as fits in max_length."""
        windows = []
        for _, ctx, cont in requests:
            whole = (ctx + cont)[-(self.max_length + 1) :]
            windows.append(Window(whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
        results = score_windows(self.model, windows, self.batch_size)
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, each after an EOS, in rolling windows."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            doc_windows = document_windows(self.tok_encode(req.args[0]), self.eot_token_id, self.max_length)
            windows.extend(doc_windows)
            owner.extend([i] * len(doc_windows))
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, score_windows(self.model, windows, self.batch_size)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with `do_sample` and `temperature`) continuations, cut at the first
        stop string in `until`. Requests with equally long contexts and the same settings share a batch."""
        groups: dict[tuple, list[int]] = {}
        encoded = []
        for i, req in enumerate(requests):
            context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context) or [self.eot_token_id]
            encoded.append((ids, until))
            groups.setdefault((len(ids), tuple(until), temperature, max_new), []).append(i)
        outputs = [""] * len(requests)
        for (_, until, temperature, max_new), members in groups.items():
            idx = torch.tensor([encoded[i][0] for i in members], device=self._device)
            for i, text in zip(members, self._generate(idx, list(until), temperature, max_new)):
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs

    @torch.no_grad()
    def _generate(self, idx: torch.Tensor, until: list[str], temperature: float, max_new: int) -> list[str]:
        """idx: (B, T) contexts of equal length -> B continuations, each cut at a stop string or EOS.
        Decodes with the KV cache (`nexus.evaluation.generation`)."""
        start = idx.shape[1]
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for nxt in generate_tokens(self.model, idx, max_new, temperature, max_context=self.max_length):
            idx = torch.cat([idx, nxt.unsqueeze(-1)], dim=1)
            done |= nxt == self.eot_token_id
            if until:
                done |= torch.tensor(
                    [any(s in self.tok_decode(row) for s in until) for row in idx[:, start:].tolist()],
                    device=idx.device,
                )
            if bool(done.all()):
                break
        texts = []
        for row in idx[:, start:].tolist():
            if self.eot_token_id in row:
                row = row[: row.index(self.eot_token_id)]
            text = self.tok_decode(row)
            for stop in until:
                text = text.split(stop, 1)[0]
            texts.append(text)
        return texts


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    import nexus.evaluation.lm_eval_adapter  # noqa: F401  (registers "nexus")

    cli_evaluate()
