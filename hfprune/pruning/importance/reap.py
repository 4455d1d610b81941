# Copyright hfprune contributors. Apache-2.0.
"""REAP (router-weighted expert activation pruning, Lasby et al. 2025): an expert's score is the mean, over the
calibration tokens routed to it, of its router weight times the norm of its output, ``mean g_e(x) ||f_e(x)||``, so
an expert that is rarely picked, picked with little weight, or adds little when picked, goes first. An expert
never picked scores 0.

Neurons inside experts (``expert_ffn``, the Mixtral / Qwen-MoE / OLMoE layout) get the same router-weighted form:
``g_e(x) |h_j(x)| ||down[:, j]||``, each neuron's contribution to its expert's output, over the expert's tokens.
Heads and other FFNs are not scored (kept whole).
"""

from __future__ import annotations

import torch

from ...core.calibration import reduce_across_processes
from ...core.experts import expert_outputs, routed_pass
from .base import ACTIVATIONS, Importance, register_importance
from .routing_frequency import expert_scoring


@register_importance
class ReapImportance(Importance):
    name = "reap"
    signal = ACTIVATIONS
    experts_only = True

    def score(self, model, batches=None) -> dict:
        model, blocks, device = expert_scoring(self.name, model, batches)
        sums, counts, neurons = {}, {}, {}
        for b in blocks:
            sums[b.key] = torch.zeros(b.units, device=device)
            counts[b.key] = torch.zeros(b.units, device=device)
            if b.spec.layout == "gate_up":
                neurons[b.key._replace(name="expert_ffn")] = torch.zeros(b.units, b.module().down_proj.shape[-1],
                                                                         device=device)

        def on_route(block, x, weights, index):
            for e in torch.unique(index).tolist():
                token, slot = torch.nonzero(index == e, as_tuple=True)
                g = weights[token, slot].to(device)  # (routed tokens,)
                out, parts = expert_outputs(block, x[token], e)
                sums[block.key][e] += (g * out.float().norm(dim=-1).to(device)).sum()
                counts[block.key][e] += len(token)
                if parts is not None:
                    neurons[block.key._replace(name="expert_ffn")][e] += (g[:, None] * parts.float().to(device)).sum(0)

        routed_pass(model, batches, on_route, self.name)
        sums, counts = reduce_across_processes(sums), reduce_across_processes(counts)
        neurons = reduce_across_processes(neurons)
        if not any(float(c.sum()) > 0 for c in counts.values()):
            raise ValueError("the calibration data is empty")
        scores = {key: sums[key] / counts[key].clamp_min(1.0) for key in sums}
        for key, per_neuron in neurons.items():
            experts_key = key._replace(name="experts")
            scores[key] = (per_neuron / counts[experts_key].clamp_min(1.0)[:, None]).flatten()  # (E * I,)
        return scores
