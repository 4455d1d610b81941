"""Masks: plan round trip, gradients stop at masked weights, hooks come off cleanly."""

import torch

from hfprune.core.masking import Masks, masked

from .cases import CASES, random_plan


def test_plan_round_trip_through_gates():
    model = CASES["llama"].build("eager")
    plan = random_plan(model, 3)
    masks = Masks(model).set_plan(plan)
    again = Masks(model).set_plan(masks.to_plan())
    assert again.dropped == masks.dropped == {("layers", 2)}
    assert all(torch.equal(again.gates[k], masks.gates[k]) for k in masks.gates)
    assert masks.gates[("layers", 0, "heads")].sum() == 0  # random_plan empties layer 0's attention


def test_masked_weights_get_no_gradient():
    case = CASES["bert"]
    model = case.build("eager").train()
    plan = {"layers": [{"heads": [1, 2], "ffn": list(range(10))}, {}, {}]}
    with masked(model, plan):
        out = model(**case.inputs(0)).logits
        out.pow(2).sum().backward()
    layer = model.bert.encoder.layer[0]
    q = layer.attention.self.query.weight.grad.view(4, 8, -1)  # (heads, head_dim, hidden)
    assert q[[0, 3]].abs().max() == 0 and q[[1, 2]].abs().max() > 0
    o = layer.attention.output.dense.weight.grad.view(-1, 4, 8)  # (hidden, heads, head_dim)
    assert o[:, [0, 3]].abs().max() == 0 and o[:, [1, 2]].abs().max() > 0
    down = layer.output.dense.weight.grad  # (hidden, neurons)
    assert down[:, 10:].abs().max() == 0 and down[:, :10].abs().max() > 0


def test_gate_gradients_for_scoring_and_removal():
    case = CASES["gpt2"]
    model = case.build("eager").eval()
    masks = Masks(model)
    for gate in masks.gates.values():
        gate.requires_grad_(True)
    masks.attach()
    model(**case.inputs(0)).logits.sum().backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in masks.gates.values())
    masks.remove()
    reference = model(**case.inputs(0)).logits
    with masked(model, {"layers": [{}, {}, {}]}):  # keep-all plan: same outputs
        assert torch.equal(model(**case.inputs(0)).logits, reference)
    assert torch.equal(model(**case.inputs(0)).logits, reference)  # hooks removed


def test_kept_counts():
    model = CASES["bert"].build("eager")
    masks = Masks(model).set_plan({"layers": [{"heads": [0], "ffn": [1, 2]}, {"drop": True}, {}]})
    assert masks.kept() == {"heads": 1 + 0 + 4, "neurons": 2 + 0 + 37}
