"""Which parameters a training stage updates (`TrainConfig.trainable`), e.g. an extension's finetune
that trains only the new expert and the router.

`trainable` is a list of parameter groups:

    all          every parameter (the default)
    non_ffn      attention, norms, embeddings, output head (every tensor outside `blocks.i.ffn.`)
    ffn          every FFN tensor (a dense FFN; an MoE's shared expert, routed experts and router)
    shared       the MoE's shared expert
    router       the MoE router (a linear router's matrix, a Nexus router's projection)
    experts      every routed expert
    expert:NAME  one routed expert: its slice of the stacked expert weights

A frozen tensor gets `requires_grad = False` (the optimizer never sees it). A routed expert frozen
while another one trains shares a stacked tensor with it: its rows get a zero gradient (a hook),
so gradient clipping and Adam's moments ignore them, and are copied back after every optimizer
step (`FrozenRows.restore`), which undoes the decoupled weight decay AdamW applies to every row.
Frozen values are therefore bit-identical after training.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nexus.errors import ConfigError

if TYPE_CHECKING:  # composing a config (check_trainable) must not import torch
    import torch

    from nexus.model.transformer import Transformer

GROUPS = ("all", "non_ffn", "ffn", "shared", "router", "experts")
_FFN = re.compile(r"^blocks\.\d+\.ffn\.")


def check_trainable(trainable: Sequence[str]) -> None:
    """Raise ConfigError for an unknown group name (without needing the model)."""
    if not trainable:
        raise ConfigError("train.trainable is empty: name at least one parameter group (e.g. all)")
    for group in trainable:
        if group not in GROUPS and not (group.startswith("expert:") and len(group) > len("expert:")):
            raise ConfigError(
                f"train.trainable: unknown parameter group {group!r}; groups: "
                f"{', '.join(GROUPS)}, expert:NAME"
            )


def param_group(name: str) -> str:
    """The group of a parameter name: non_ffn, shared, router, experts, or ffn (a dense FFN)."""
    if not _FFN.match(name):
        return "non_ffn"
    for part in ("shared", "router", "experts"):
        if f".ffn.{part}." in name:
            return part
    return "ffn"


class FrozenRows:
    """The routed experts' rows that stay fixed while other rows of the same tensors train."""

    def __init__(self, params: dict[str, tuple[torch.nn.Parameter, list[int]]]) -> None:
        self.params = params
        self.saved = {name: p.detach()[rows].clone() for name, (p, rows) in params.items()}
        self.hooks = [p.register_hook(_zero_rows(rows)) for p, rows in params.values()]

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for name, (p, rows) in self.params.items():
                p[rows] = self.saved[name].to(p.dtype)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _zero_rows(rows: list[int]):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[rows] = 0
        return grad

    return hook


def apply_trainable(model: Transformer, trainable: Sequence[str]) -> FrozenRows | None:
    """Freeze everything outside `trainable` (see the module doc); returns the partly frozen expert
    tensors (call `restore()` after each optimizer step), or None when no tensor is partly frozen."""
    check_trainable(trainable)
    if "all" in trainable:
        return None
    names = list(model.config.moe.expert_names) if model.config.moe is not None else []
    chosen = {g.removeprefix("expert:") for g in trainable if g.startswith("expert:")}
    unknown = sorted(chosen - set(names))
    if unknown:
        raise ConfigError(f"train.trainable: no routed expert named {unknown}; the model has {names}")
    groups = set(trainable)
    partial: dict[str, tuple[torch.nn.Parameter, list[int]]] = {}
    for name, p in model.named_parameters():
        group = param_group(name)
        if group == "experts" and "experts" not in groups and "ffn" not in groups and chosen:
            frozen = [i for i, n in enumerate(names) if n not in chosen]
            partial[name] = (p, frozen)
            continue
        if group in ("shared", "router", "experts") and "ffn" in groups:
            group = "ffn"
        p.requires_grad_(group in groups)
    return FrozenRows(partial) if partial else None
