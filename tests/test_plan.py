"""PrunePlan: the documented JSON form, round trips, and errors that name layer and field."""

import json

import pytest

import hfprune
from hfprune import PlanError, PrunePlan
from hfprune.core.apply import compose

from .cases import CASES


def test_documented_form_round_trips():
    doc = {"layers": [{"heads": [0, 2, 5], "ffn": [1, 4, 9]}, {"heads": None}, {}, {"drop": True},
                      {"heads": [], "ffn": []}]}
    plan = PrunePlan.from_dict(doc)
    assert plan.layers[0].get("heads") == (0, 2, 5)
    assert plan.layers[1].get("heads") is None and plan.layers[2].get("ffn") is None
    assert plan.layers[3].drop and plan.layers[4].get("heads") == ()
    again = PrunePlan.from_json(plan.to_json())
    assert again == plan
    assert json.loads(plan.to_json())["layers"][3] == {"drop": True}


def test_decoder_layers_and_cross_heads():
    plan = PrunePlan.from_dict({"layers": [{}], "decoder_layers": [{"heads": [1], "cross_heads": [0, 1]}]})
    assert plan.decoder_layers[0].get("cross_heads") == (0, 1)
    assert PrunePlan.from_dict(plan.to_dict()) == plan


def test_unsorted_indices_are_sorted():
    assert PrunePlan.from_dict({"layers": [{"heads": [3, 1]}]}).layers[0].get("heads") == (1, 3)


@pytest.mark.parametrize("doc,message", [
    ({"layers": [{"heads": [0, 0]}]}, "layers[0].heads: index 0 appears twice"),
    ({"layers": [{}, {"ffn": [-1]}]}, "layers[1].ffn: indices must be >= 0"),
    ({"layers": [{"ffn": [1.5]}]}, "layers[0].ffn: indices must be integers"),
    ({"layers": [{"ffn": "all"}]}, "layers[0].ffn must be a list"),
    ({"layers": [{"head": [1]}]}, "layers[0]: unknown field(s) ['head']"),
    ({"layers": [{"drop": "yes"}]}, "layers[0].drop must be true or false"),
    ({"layers": [{"drop": True, "ffn": [1]}]}, "a dropped layer cannot also keep ['ffn']"),
    ({"encoder": []}, "unknown plan key(s) ['encoder']"),
    ({}, "a plan needs a 'layers' list"),
    ({"layers": {"0": {}}}, "'layers' must be a list"),
])
def test_structural_errors(doc, message):
    with pytest.raises(PlanError) as err:
        PrunePlan.from_dict(doc)
    assert message in str(err.value)


def _bert():
    return CASES["bert"].build("eager")


@pytest.mark.parametrize("doc,message", [
    ({"layers": [{"heads": [4]}, {}, {}]}, "layers[0].heads: index 4 out of range; the layer has 4 (0..3)"),
    ({"layers": [{}, {}, {"ffn": [37]}]}, "layers[2].ffn: index 37 out of range"),
    ({"layers": [{}, {}]}, "'layers' has 2 entries but the model has 3 layers"),
    ({"layers": [{"drop": True}] * 3}, "drops all 3 layers"),
    ({"layers": [{"cross_heads": [0]}, {}, {}]}, "layers[0].cross_heads: this layer has no 'cross_heads' block"),
    ({"layers": [{}, {}, {}], "decoder_layers": [{}]}, "'decoder_layers': this model has no such stack"),
    ({"model_type": "llama", "layers": [{}, {}, {}]}, "the plan is for model_type 'llama'"),
])
def test_errors_against_a_model_leave_it_untouched(doc, message):
    model = _bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError) as err:
        hfprune.apply_plan(model, doc)
    assert message in str(err.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)
    assert type(model).__name__ == "BertForSequenceClassification"


def test_gqa_grouping_is_enforced():
    model = CASES["llama"].build("eager")  # 4 query heads in 2 key/value groups: {0,1} {2,3}
    with pytest.raises(PlanError, match=r"layers\[0\].heads: GQA needs the same number .* group 0: 2, group 1: 1"):
        hfprune.apply_plan(model, {"layers": [{"heads": [0, 1, 2]}, {}, {}]})
    hfprune.apply_plan(model, {"layers": [{"heads": [0, 3]}, {"heads": [2, 3]}, {}]})  # valid groupings
    attn = model.model.layers[0].self_attn
    assert (attn.k_proj.out_features, attn.num_key_value_groups) == (16, 1)
    assert model.model.layers[1].self_attn.k_proj.out_features == 8


def test_compose_equals_applying_twice():
    first = PrunePlan.from_dict({"layers": [{"heads": [0, 2, 3], "ffn": [1, 5, 9, 20]}, {"drop": True}, {}]})
    second = PrunePlan.from_dict({"layers": [{"heads": [1], "ffn": [0, 3]}, {"drop": True}]})
    total = compose(first, second)
    assert total.to_dict()["layers"] == [{"heads": [2], "ffn": [1, 20]}, {"drop": True}, {"drop": True}]


def test_plan_with_dense_dims_round_trips_and_reads_prune_plan_json(tmp_path):
    dense = {"layers": [{"heads": [4, 2], "ffn": [37]}] * 3}
    doc = {"model_type": "llama", "base_model": "org/tiny", "layers": [{"heads": [0, 1]}, {}, {"drop": True}],
           "dense": dense}
    plan = PrunePlan.from_dict(doc)
    assert plan.dense["layers"][0] == {"heads": (4, 2), "ffn": (37,)} and plan.base_model == "org/tiny"
    assert plan.to_dict() == doc and PrunePlan.from_json(plan.to_json()).to_dict() == doc
    # what save_pretrained writes: hfprune_version and model_type next to the plan
    (tmp_path / "prune_plan.json").write_text(json.dumps({"hfprune_version": "0.1.0", **doc}))
    assert PrunePlan.from_json(tmp_path / "prune_plan.json").to_dict() == doc
    assert plan.kept_dims() == {"layers": {0: {"heads": (2, 1), "ffn": (37,)}, 1: {"heads": (4, 2), "ffn": (37,)}}}
    # `dense` and `base_model` say what the plan was applied to: plans keeping the same units are equal
    assert plan == PrunePlan.from_dict({"model_type": "llama", "layers": doc["layers"]})


def test_compose_keeps_the_dense_dims():
    dense = {"layers": [{"ffn": [37]}] * 3}
    first = PrunePlan.from_dict({"layers": [{"ffn": [1, 5, 9, 20]}, {"drop": True}, {}], "dense": dense})
    total = compose(first, PrunePlan.from_dict({"layers": [{"ffn": [0, 3]}, {}]}))
    assert total.dense == first.dense and total.to_dict()["dense"] == dense


@pytest.mark.parametrize("doc,message", [
    ({"layers": [{}], "hfprune_versoin": "1"}, "unknown plan key(s) ['hfprune_versoin']"),
    ({"layers": [{}], "dense": {"layers": []}}, "dense['layers'] needs one entry per layer of the plan (1), got 0"),
    ({"layers": [{}], "dense": {"layers": [{"heads": [4]}]}}, "dense['layers'][0].heads must be [heads, kv_heads]"),
    ({"layers": [{}], "dense": {"layers": [{"ffn": [-1]}]}}, "dense['layers'][0].ffn must be [neurons]"),
    ({"layers": [{}], "dense": {"decoder_layers": []}}, "dense: stack(s) ['decoder_layers'] are not in the plan"),
    ({"layers": [{}], "base_model": 3}, "base_model must be a Hub id string or null"),
])
def test_metadata_errors(doc, message):
    with pytest.raises(PlanError) as err:
        PrunePlan.from_dict(doc)
    assert message in str(err.value)
