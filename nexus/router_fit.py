"""A data-informed router entry for an appended expert (the extension recipe `router_init=data`).

Right after `nexus.upcycling.extend`, the new expert's router entry knows nothing of its domain: a
linear router's new row is random, and a Nexus router's `e_new = P_r(d_new)` may land next to an old
expert's embedding (a new domain that resembles an old one). Here, per MoE layer, the entry is fitted
on the layer's inputs x (stored once from a forward pass of the appended model over training tokens)
of the new domain (X_new) and of the earlier domains (X_old), so that the new expert wins the new
domain's tokens and leaves the earlier ones alone:

    L = mean_{x∈X_new} −log s_new(x) + mean_{x∈X_old} −log(1 − s_new(x))

with `s = softmax(x · Eᵀ)` the layer's routing probabilities, fitted for the new row alone (the
earlier rows fixed; convex in the row). The row starts from `w_new = ‖w‖_mean · u`, u the unit
direction of mean(X_new) − mean(X_old): the new domain's mean hidden state relative to the earlier
domains', scaled like the other rows. A linear router takes the fitted row as it is. A Nexus router's
projection `P_r` is then edited (rank one, in closed form: `edit_projection`) so that `P_r(d_new)` is that
row and `P_r(d_i)` stays exactly `e_i` for every earlier expert: the router stays generated from
domain embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nexus.errors import IncompatibleModelsError
from nexus.model.ffn import swiglu
from nexus.model.moe import MoELayer
from nexus.model.routers import LinearRouter, NexusRouter
from nexus.model.transformer import Transformer


@torch.no_grad()
def moe_layer_inputs(model: Transformer, windows: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
    """The input of every MoE layer for token windows (B, T): a list over layers of (B·T, d_model)."""
    layers = [b.ffn for b in model.blocks if isinstance(b.ffn, MoELayer)]
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].detach().float()))
        for i, layer in enumerate(layers)
    ]
    was_training = model.training
    try:
        model.eval()
        for start in range(0, windows.shape[0], batch_size):
            model(windows[start : start + batch_size].to(model.tok_emb.weight.device))
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
    edited: list[bool] = field(default_factory=list)
    """Nexus router: per layer, whether the projection could be edited (see `edit_projection`)."""

    def to_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.__dict__.items()}


def _top1_share(x: torch.Tensor, matrix: torch.Tensor, expert: int) -> float:
    return float(((x @ matrix.t()).argmax(-1) == expert).float().mean())


def fit_new_expert_routing(
    model: Transformer,
    expert: int,
    new_windows: torch.Tensor,
    old_windows: torch.Tensor,
    steps: int = 100,
    lr: float = 0.1,
    batch_size: int = 16,
) -> RouterFit:
    """Fit expert `expert`'s router entry in every MoE layer of `model` in place (see the module doc);
    `new_windows` / `old_windows`: (B, T) token windows of the new / the earlier domains."""
    x_new_layers = moe_layer_inputs(model, new_windows, batch_size)
    x_old_layers = moe_layer_inputs(model, old_windows, batch_size)
    layers = [b.ffn for b in model.blocks if isinstance(b.ffn, MoELayer)]
    stats = RouterFit([], [], [], [])
    d = model.domain_embeddings
    for layer, x_new, x_old in zip(layers, x_new_layers, x_old_layers):
        router = layer.router
        if not isinstance(router, (LinearRouter, NexusRouter)):
            name = model.config.moe.router
            raise IncompatibleModelsError(f"router_init=data fits linear and Nexus routers, not {name!r}")
        before = router(d).detach().float()
        stats.new_before.append(_top1_share(x_new, before, expert))
        stats.old_before.append(_top1_share(x_old, before, expert))
        target = fit_router_row(before, expert, x_new, x_old, steps, lr)
        if isinstance(router, LinearRouter):
            with torch.no_grad():
                router.weight[expert] = target[expert].to(router.weight.dtype)
        else:
            stats.edited.append(edit_projection(router, d, expert, target[expert]))
        after = router(d).detach().float()
        stats.new_after.append(_top1_share(x_new, after, expert))
        stats.old_after.append(_top1_share(x_old, after, expert))
    return stats


def fit_router_row(
    matrix: torch.Tensor, expert: int, x_new: torch.Tensor, x_old: torch.Tensor, steps: int, lr: float = 0.1
) -> torch.Tensor:
    """The router matrix (n, h) with row `expert` fitted to `new_expert_loss` (convex in the row), the
    other rows fixed. Start: `‖w‖_mean · u`, u the unit direction of mean(x_new) − mean(x_old); Adam
    steps of `lr / mean ‖x‖` (logit changes of about `lr` per step)."""
    others = torch.cat([matrix[:expert], matrix[expert + 1 :]])
    direction = x_new.mean(0) - x_old.mean(0)
    row = (direction * others.norm(dim=-1).mean() / direction.norm().clamp_min(1e-12)).requires_grad_(True)
    optimizer = torch.optim.Adam([row], lr=lr / float(torch.cat([x_new, x_old]).norm(dim=-1).mean()))

    def full() -> torch.Tensor:
        return torch.cat([matrix[:expert], row[None], matrix[expert + 1 :]])

    for _ in range(steps):
        loss = new_expert_loss(x_new @ full().t(), x_old @ full().t(), expert)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return full().detach()


@torch.no_grad()
def edit_projection(router, domain_embeddings: torch.Tensor, expert: int, target: torch.Tensor) -> bool:
    """Edit a Nexus router's projection `P_r(d) = W2 · h(d)`, `h(d) = SwiGLU(W1 · d)`, so that
    `P_r(d_expert) = target` while every other `P_r(d_i)` stays exactly as it was:

        W2 ← W2 + (target − P_r(d_new)) · gᵀ / (g · h_new),   g = h_new − Proj_{span(h_i, i ≠ new)} h_new

    g is orthogonal to every other expert's hidden activation, so their embeddings do not move; the
    smallest such edit (rank one). Returns False, editing nothing, when h_new lies in the span of the
    others' (e.g. a new domain whose embedding equals an earlier one's: no edit can separate them)."""
    w_in, w_out = router.proj.w_in.weight, router.proj.w_out.weight
    hidden = swiglu(domain_embeddings.to(w_in.dtype).float() @ w_in.float().t())  # (n, p)
    others = torch.cat([hidden[:expert], hidden[expert + 1 :]])
    h_new = hidden[expert]
    basis = torch.linalg.qr(others.t()).Q  # (p, n-1), orthonormal span of the others' activations
    g = h_new - basis @ (basis.t() @ h_new)
    if g.norm() <= 1e-4 * h_new.norm() or h_new.norm() == 0:
        return False
    delta = target.float() - hidden[expert] @ w_out.float().t()
    w_out += (torch.outer(delta, g) / (g @ h_new)).to(w_out.dtype)
    return True
