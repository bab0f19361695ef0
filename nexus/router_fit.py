"""A data-informed router entry for an appended expert (the extension recipe `router_init=data`).

Right after `nexus.upcycling.extend`, the new expert's router entry knows nothing of its domain: a
linear router's new row is random, and a Nexus router's `e_new = P_r(d_new)` may land next to an old
expert's embedding (a new domain that resembles an old one). Here, per MoE layer, the entry is fitted
on the layer's inputs x (stored once from a forward pass of the appended model over training tokens)
of the new domain (X_new) and of the earlier domains (X_old), so that the new expert wins the new
domain's tokens and leaves the earlier ones alone:

    L = mean_{x∈X_new} −log s_new(x) + mean_{x∈X_old} −log(1 − s_new(x))  [+ anchor]

with `s = softmax(x · Eᵀ)` the layer's routing probabilities. Linear router: only the new row
trains; it starts from `w_new = ‖w‖_mean · u`, u the unit direction of mean(X_new) − mean(X_old)
(the new domain's mean hidden state relative to the earlier domains', scaled like the other rows).
Nexus router: the projection `P_r` trains, and the earlier experts' embeddings are held by
`anchor · ‖P_r(D_old) − E_old‖² / ‖E_old‖²` (E_old: their embeddings before the fit), so the router
stays generated from domain embeddings and the earlier domains' routing barely moves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nexus.model.moe import MoELayer
from nexus.model.routers import LinearRouter
from nexus.model.transformer import Transformer


@torch.no_grad()
def moe_layer_inputs(model: Transformer, windows: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
    """The input of every MoE layer for token windows (B, T): a list over layers of (B·T, d_model)."""
    layers = [b.ffn for b in model.blocks if isinstance(b.ffn, MoELayer)]
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].detach().float()))
             for i, layer in enumerate(layers)]
    was_training = model.training
    try:
        model.eval()
        for start in range(0, windows.shape[0], batch_size):
            model(windows[start:start + batch_size].to(model.tok_emb.weight.device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [torch.cat(chunks) for chunks in seen]


def new_expert_loss(logits_new: torch.Tensor, logits_old: torch.Tensor, expert: int) -> torch.Tensor:
    """`mean −log s_new` over the new domain's tokens + `mean −log(1 − s_new)` over the earlier ones'."""
    own = -torch.log_softmax(logits_new, dim=-1)[:, expert].mean()
    log_p_old = torch.log_softmax(logits_old, dim=-1)[:, expert]
    return own - torch.log1p(-log_p_old.exp().clamp(max=1 - 1e-6)).mean()


@dataclass
class RouterFit:
    """Per MoE layer: the share of new-domain / earlier-domain tokens whose top-1 expert is the new one,
    before and after the fit (on the fitting tokens)."""

    new_before: list[float]
    new_after: list[float]
    old_before: list[float]
    old_after: list[float]

    def to_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.__dict__.items()}


def _top1_share(x: torch.Tensor, matrix: torch.Tensor, expert: int) -> float:
    return float(((x @ matrix.t()).argmax(-1) == expert).float().mean())


def fit_new_expert_routing(model: Transformer, expert: int, new_windows: torch.Tensor,
                           old_windows: torch.Tensor, steps: int = 100, lr: float = 1e-2,
                           anchor: float = 10.0, batch_size: int = 16) -> RouterFit:
    """Fit expert `expert`'s router entry in every MoE layer of `model` in place (see the module doc);
    `new_windows` / `old_windows`: (B, T) token windows of the new / the earlier domains."""
    x_new_layers = moe_layer_inputs(model, new_windows, batch_size)
    x_old_layers = moe_layer_inputs(model, old_windows, batch_size)
    layers = [b.ffn for b in model.blocks if isinstance(b.ffn, MoELayer)]
    stats = RouterFit([], [], [], [])
    d = model.domain_embeddings
    for layer, x_new, x_old in zip(layers, x_new_layers, x_old_layers):
        router = layer.router
        before = router(d).detach().float()
        stats.new_before.append(_top1_share(x_new, before, expert))
        stats.old_before.append(_top1_share(x_old, before, expert))
        if isinstance(router, LinearRouter):
            _fit_linear(router, expert, x_new, x_old, steps, lr)
        else:
            _fit_nexus(router, d, expert, x_new, x_old, steps, lr, anchor)
        after = router(d).detach().float()
        stats.new_after.append(_top1_share(x_new, after, expert))
        stats.old_after.append(_top1_share(x_old, after, expert))
    return stats


def _fit_linear(router: LinearRouter, expert: int, x_new: torch.Tensor, x_old: torch.Tensor, steps: int,
                lr: float) -> None:
    weight = router.weight.detach().float()
    others = torch.cat([weight[:expert], weight[expert + 1:]])
    direction = x_new.mean(0) - x_old.mean(0)
    scale = others.norm(dim=-1).mean() / direction.norm().clamp_min(1e-12)
    row = (direction * scale).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([row], lr=lr * float(scale * direction.norm()))
    for _ in range(steps):
        matrix = torch.cat([weight[:expert], row[None], weight[expert + 1:]])
        loss = new_expert_loss(x_new @ matrix.t(), x_old @ matrix.t(), expert)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        router.weight[expert] = row.detach().to(router.weight.dtype)


def _fit_nexus(router, domain_embeddings: torch.Tensor, expert: int, x_new: torch.Tensor, x_old: torch.Tensor,
               steps: int, lr: float, anchor: float) -> None:
    old = [i for i in range(domain_embeddings.shape[0]) if i != expert]
    with torch.no_grad():
        held = router.expert_embeddings(domain_embeddings)[old].float()
    params = [p for p in router.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    try:
        for _ in range(steps):
            matrix = router.expert_embeddings(domain_embeddings).float()
            drift = (matrix[old] - held).pow(2).sum() / held.pow(2).sum().clamp_min(1e-12)
            loss = new_expert_loss(x_new @ matrix.t(), x_old @ matrix.t(), expert) + anchor * drift
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
