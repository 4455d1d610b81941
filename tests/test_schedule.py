"""Schedules are pure functions of the step: validation, event steps, cubic shape, budgets."""

import pytest

from hfprune import PruningConfig
from hfprune.pruning.schedule import ScheduleConfig, budget_at, cubic_fraction, fraction_at, prune_steps


def test_oneshot_prunes_everything_at_its_step():
    s = ScheduleConfig(kind="oneshot", start_step=5)
    assert prune_steps(s) == [5]
    assert [fraction_at(s, t) for t in (0, 4, 5, 100)] == [0.0, 0.0, 1.0, 1.0]


def test_iterative_rounds_are_equal_steps_ending_at_end_step():
    s = ScheduleConfig(kind="iterative", start_step=0, end_step=10, rounds=4)
    assert prune_steps(s) == [3, 5, 8, 10]
    assert [fraction_at(s, t) for t in (2, 3, 5, 9, 10)] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_gradual_follows_the_cubic_of_zhu_and_gupta():
    s = ScheduleConfig(kind="gradual", start_step=10, end_step=110, every=10)
    steps = prune_steps(s)
    assert steps[0] == 20 and steps[-1] == 110 and len(steps) == 10
    fractions = [fraction_at(s, t) for t in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # s_t = s_f (1 - (1 - (t - t0) / (n dt))^3): at 30 steps of 100, 1 - 0.7^3
    assert fraction_at(s, 45) == pytest.approx(1 - 0.7 ** 3)
    gains = [b - a for a, b in zip(fractions, fractions[1:])]
    assert gains == sorted(gains, reverse=True)  # fast first, slow at the end
    assert cubic_fraction(0, 0, 4) == 0.0 and cubic_fraction(9, 0, 4) == 1.0


def test_gradual_default_every_gives_ten_updates_and_resolve_fills_end_step():
    s = ScheduleConfig(kind="gradual", start_step=0)
    with pytest.raises(ValueError, match="resolve"):
        prune_steps(s)
    r = s.resolve(300)
    assert r.end_step == 200 and len(prune_steps(r)) == 10
    assert ScheduleConfig.from_dict(r.to_dict()) == r


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "cubic"}, "kind='cubic'"),
    ({"start_step": -1}, "start_step=-1"),
    ({"kind": "gradual", "start_step": 5, "end_step": 5}, "end_step=5"),
    ({"rounds": 0}, "rounds=0"),
    ({"every": 0}, "every=0"),
    ({"start_step": 1.5}, "start_step=1.5"),
])
def test_bad_schedules_name_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown schedule keys"):
        ScheduleConfig.from_dict({"kind": "gradual", "steps": 3})


def test_budget_at_loosens_each_ratio_proportionally():
    cfg = PruningConfig(criterion="magnitude", macs_ratio=0.4)
    assert budget_at(cfg, 0.0).macs_ratio == pytest.approx(1.0)
    assert budget_at(cfg, 0.5).macs_ratio == pytest.approx(0.7)
    assert budget_at(cfg, 1.0).macs_ratio == pytest.approx(0.4)
    both = budget_at(PruningConfig(criterion="magnitude", head_ratio=0.5, ffn_ratio=0.25), 0.5)
    assert (both.head_ratio, both.ffn_ratio) == pytest.approx((0.75, 0.625))
    with pytest.raises(ValueError, match="fraction=1.5"):
        budget_at(cfg, 1.5)
