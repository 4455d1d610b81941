# Copyright hfprune contributors. Apache-2.0.
"""Expert pruning of tiny random mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss).

Usage (from the repository root)::

    python benchmarks/moe_experts.py

For each family, a randomly initialised model built from a small config (4 layers, 8 experts, top-2, hidden 64,
256 neurons per expert; no download) is pruned twice: with REAP to half of its experts in every layer (a plain
checkpoint: only ``num_experts`` / ``num_local_experts`` changes) and to a different number of experts per layer
(random keep-lists: a checkpoint with its modeling code). Each row compares the pruned model's logits with the
dense model's whose removed experts get a router logit of minus infinity (forward hooks on the routers that redo
the routing; hfprune's masks are not used), then saves, reloads (stock ``from_pretrained`` for the plain one,
``trust_remote_code=True`` for the per-layer one) and compares again. A second table: on Mixtral, how far each
criterion's choice of half of the experts moves the next-token distribution (mean KL from the dense model on
held-out random token ids; random weights, so only a sanity check of the criteria, not a quality claim).

The tables go to ``benchmarks/results/moe_experts.md``. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import copy
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as T

import hfprune

VOCAB, SEQ = 512, 32
FAMILIES = {
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(num_local_experts=8, intermediate_size=256)),
    "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM,
                  dict(num_experts=8, moe_intermediate_size=256, shared_expert_intermediate_size=256)),
    "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, dict(num_experts=8, moe_intermediate_size=256,
                                                                norm_topk_prob=True)),
    "olmoe": (T.OlmoeConfig, T.OlmoeForCausalLM, dict(num_experts=8, intermediate_size=256)),
    "gpt_oss": (T.GptOssConfig, T.GptOssForCausalLM, dict(num_local_experts=8, intermediate_size=256,
                                                          max_position_embeddings=131072,
                                                          layer_types=["sliding_attention", "full_attention"] * 2)),
}


def build(model_type: str, seed: int = 0):
    config_cls, model_cls, extra = FAMILIES[model_type]
    config = config_cls(**{"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 8,
                           "num_key_value_heads": 4, "head_dim": 8, "num_experts_per_tok": 2,
                           "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
                           "pad_token_id": 0, **extra})
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # some routers start at zero: give them something to route by
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                param.normal_(0.0, 1.0)
    return model


def batches(seed: int, n: int = 8) -> list:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (4, SEQ), generator=g),
             "attention_mask": torch.ones(4, SEQ, dtype=torch.long)} for _ in range(n)]


def minus_infinity(model, removed: dict) -> list:
    """Route each layer as its router would with the removed experts' logits at -inf (the reference)."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        router = layer.mlp.router if hasattr(layer.mlp, "router") else layer.mlp.gate
        gone_here = removed.get(i, [])

        def hook(module, _args, output, gone=gone_here):
            logits = output[0].clone()
            logits[:, gone] = float("-inf")
            if type(module).__name__.startswith("GptOss"):
                values, index = torch.topk(logits, module.top_k, dim=-1)
                return output[0], torch.softmax(values, dim=1, dtype=values.dtype), index
            values, index = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), module.top_k, dim=-1)
            if getattr(module, "norm_topk_prob", type(module).__name__.startswith("Mixtral")):
                values = values / values.sum(dim=-1, keepdim=True)
            return output[0], values.to(output[1].dtype), index

        handles.append(router.register_forward_hook(hook))
    return handles


def logits(model, data: list) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in data])


def row(model_type: str, kind: str) -> dict:
    dense = build(model_type)
    data, held_out = batches(1), batches(2, n=2)
    start = time.perf_counter()
    if kind == "plain":
        model = copy.deepcopy(dense)
        plan = hfprune.prune(model, data, hfprune.PruningConfig(criterion="reap", expert_ratio=0.5)).plan.to_dict()
    else:
        rng = random.Random(0)
        plan = {"layers": [{"experts": sorted(rng.sample(range(8), k))} for k in (6, 2, 5, 3)]}
        model = hfprune.apply_plan(copy.deepcopy(dense), plan)
    seconds = time.perf_counter() - start
    removed = {i: [e for e in range(8) if e not in (layer.get("experts") or range(8))]
               for i, layer in enumerate(plan["layers"])}
    handles = minus_infinity(dense, removed)
    reference = logits(dense, held_out)
    for h in handles:
        h.remove()
    pruned = logits(model, held_out)
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        code = (Path(out) / "modeling_hfprune.py").exists()
        kwargs = {"trust_remote_code": True} if code else {}
        reloaded = T.AutoModelForCausalLM.from_pretrained(out, **kwargs).eval()
        again = logits(reloaded, held_out)
    return {"family": model_type, "checkpoint": "plain (REAP, 4 of 8 per layer)" if kind == "plain"
            else "per-layer (6/2/5/3 of 8), remote code", "experts": "/".join(
                str(len(layer.get("experts") or range(8))) for layer in plan["layers"]),
            "params": (sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in model.parameters())),
            "diff": (pruned - reference).abs().max().item(), "equal": torch.equal(pruned, reference),
            "reload": (again - pruned).abs().max().item(), "code": code, "seconds": seconds}


def kl_rows() -> list:
    dense = build("mixtral")
    data, held_out = batches(1), batches(2, n=2)
    base = torch.log_softmax(logits(dense, held_out), -1)
    out = []
    for criterion in ("reap", "frequency", "random"):
        model = copy.deepcopy(dense)
        hfprune.prune(model, data, hfprune.PruningConfig(criterion=criterion, expert_ratio=0.5))
        pruned = torch.log_softmax(logits(model, held_out), -1)
        kl = (base.exp() * (base - pruned)).sum(-1).mean().item()
        out.append((criterion, kl, (logits(model, held_out).argmax(-1) == base.argmax(-1)).float().mean().item()))
    return out


def dense_reload_diff(model_type: str = "mixtral") -> float:
    """Max abs logit difference of the unpruned model after a save and a stock reload (transformers alone)."""
    dense, held_out = build(model_type), batches(2, n=2)
    with tempfile.TemporaryDirectory() as out:
        dense.save_pretrained(out)
        again = T.AutoModelForCausalLM.from_pretrained(out).eval()
        return (logits(again, held_out) - logits(dense, held_out)).abs().max().item()


def main() -> None:
    torch.set_num_threads(2)
    rows = [row(t, kind) for t in FAMILIES for kind in ("plain", "per_layer")]
    lines = ["# Expert pruning of tiny random MoE models", "",
             "Pruned logits against the dense model's with the removed experts' router logits at minus infinity "
             "(2 x 4 x 32 held-out random tokens); reload: the saved checkpoint loaded back with transformers.", "",
             "| family | checkpoint | experts kept per layer | params dense → pruned | max abs diff vs masked | "
             "bit-identical | reload max abs diff | prune s |", "|---|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['checkpoint']} | {r['experts']} | {r['params'][0]:,} → "
                     f"{r['params'][1]:,} ({r['params'][1] / r['params'][0]:.2f}) | {r['diff']:.2e} | "
                     f"{'yes' if r['equal'] else 'no'} | {r['reload']:.2e} | {r['seconds']:.2f} |")
    lines += ["", "Mixtral, half of the experts in every layer: which ones (next-token distributions on held-out "
              "random tokens; random weights: a sanity check of the criteria only).", "",
              "| criterion | mean KL(dense ‖ pruned) | top-1 agreement with dense |", "|---|---:|---:|"]
    lines += [f"| {c} | {kl:.4f} | {agree:.1%} |" for c, kl, agree in kl_rows()]
    lines += ["", f"- Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"transformers {T.__version__}, hfprune {hfprune.__version__}, Python {sys.version.split()[0]}",
              "- Command: `python benchmarks/moe_experts.py`",
              "- Reload differences come from transformers re-fusing the experts on load (its grouped_mm kernel then "
              "sums in another order): the unpruned Mixtral, saved and reloaded by transformers alone, differs by "
              f"{dense_reload_diff():.2e}."]
    text = "\n".join(lines) + "\n"
    path = Path(__file__).parent / "results" / "moe_experts.md"
    path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
