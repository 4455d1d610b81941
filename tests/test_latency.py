"""Latency tables: well-formed, monotone fits, JSON round trip, and latency budgets met on prediction.

No timing is asserted: on shared CPUs single timings swing; only what the table predicts is checked.
"""

import pytest
import torch

import hfprune
from hfprune.core.masking import Masks
from hfprune.pruning.latency import BlockLatency, LatencyTable, fit_line, measure

from .cases import CASES


@pytest.fixture(scope="module")
def bert_table():
    return measure(CASES["bert"].build("eager"), batch_size=2, seq_len=16, points=3, repeats=2)


def test_table_is_well_formed(bert_table, tmp_path):
    model = CASES["bert"].build("eager")
    assert set(bert_table.entries) == set(Masks(model).gates)
    for key, entry in bert_table.entries.items():
        assert list(entry.widths) == sorted(set(entry.widths)) and len(entry.widths) == 3
        assert entry.widths[-1] == len(Masks(model).gates[key])  # measured up to the full width
        assert all(s > 0 for s in entry.seconds) and entry.slope >= 0 and entry.intercept >= 0
        preds = [entry.predict(k) for k in range(entry.widths[-1] + 1)]
        assert preds[0] == 0 and all(a <= b for a, b in zip(preds, preds[1:]))  # monotone
    bert_table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json") == bert_table


def test_fit_line_is_non_negative():
    assert fit_line([1, 2, 3], [1.0, 2.0, 3.0]) == pytest.approx((0.0, 1.0), abs=1e-9)
    intercept, slope = fit_line([1, 2, 3], [3.0, 2.0, 1.0])  # decreasing timings: a flat line
    assert slope == 0 and intercept == pytest.approx(2.0)
    intercept, slope = fit_line([2, 4], [0.0, 4.0])  # negative intercept: through the origin instead
    assert intercept == 0 and slope > 0


def test_gqa_widths_are_whole_groups():
    table = measure(CASES["llama"].build("eager"), batch_size=1, seq_len=8, points=2, repeats=1)
    assert table.entries[("layers", 0, "heads")].widths == (2, 4)


@pytest.fixture(scope="module")
def steady_table():
    """A table with fixed lines (a measured one swings with the machine's load, and under heavy load its intercepts
    can leave no width that meets a budget): heads cost 2 + k, FFN blocks 2 + 0.2 k."""
    entries = {}
    for key, gate in Masks(CASES["bert"].build("eager")).gates.items():
        full = len(gate)
        intercept, slope = (2.0, 1.0) if key[2] == "heads" else (2.0, 0.2)
        entries[key] = BlockLatency((full,), (intercept + slope * full,), intercept, slope)
    return LatencyTable(2, 16, "synthetic", entries)


# Uniform widths under a measured table can be infeasible on a loaded machine (refused as such): steady table only.
@pytest.mark.parametrize(("scope", "table"), [("global", "measured"), ("global", "steady"), ("uniform", "steady")])
def test_plan_meets_the_predicted_latency_budget(bert_table, steady_table, scope, table):
    bert_table = bert_table if table == "measured" else steady_table
    case = CASES["bert"]
    model = case.build("eager")
    config = hfprune.PruningConfig(criterion="taylor", latency_ratio=0.5, scope=scope, seq_len=16,
                                   latency_batch_size=2)
    result = hfprune.prune(model, [case.inputs(0)], config, latency_table=bert_table)
    counts = {}
    for i, layer in enumerate(result.plan.layers):
        for name, full in (("heads", 4), ("ffn", 37)):
            keep = layer.get(name)
            counts[("layers", i, name)] = full if keep is None else len(keep)
    assert bert_table.predict(counts) <= 0.5 * bert_table.dense() + 1e-12
    assert bert_table.predict(counts) < bert_table.dense()


def test_a_synthetic_table_steers_selection():
    # attention costs nothing per head, FFN neurons are expensive: a 60% budget keeps every head. Seeded: the
    # random weights (so the magnitude scores) must not depend on which tests ran before in the same process.
    torch.manual_seed(0)
    model = CASES["bert"].build("eager")
    entries = {}
    for key in Masks(model).gates:
        full = 4 if key[2] == "heads" else 37
        entries[key] = BlockLatency((full,), (1.0,), 1.0, 0.0) if key[2] == "heads" else \
            BlockLatency((full,), (full * 1.0,), 0.0, 1.0)
    table = LatencyTable(1, 8, "synthetic", entries)
    config = hfprune.PruningConfig(criterion="magnitude", latency_ratio=0.6, seq_len=8)
    result = hfprune.prune(model, None, config, latency_table=table)
    assert all(layer.get("heads") is None for layer in result.plan.layers)
    kept = sum(len(layer.get("ffn")) for layer in result.plan.layers)
    assert 3 + kept <= 0.6 * (3 + 3 * 37)


def test_latency_budget_needs_a_table_or_measures_one():
    from hfprune.pruning.oneshot import select_kept

    model = CASES["bert"].build("eager")
    config = hfprune.PruningConfig(criterion="magnitude", latency_ratio=0.5)
    with pytest.raises(ValueError, match="needs a latency table"):
        select_kept(model, hfprune.pruning.importance.get_importance("magnitude").score(model), config)
