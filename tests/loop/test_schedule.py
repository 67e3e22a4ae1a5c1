"""The progressive schedule against hand computation."""

from __future__ import annotations

import pytest
from rich.console import Console

from covr_lightning.loop.schedule import Round, plan_rounds, round_at, round_lengths, schedule_table


def test_factorial_rule_by_hand():
    # psi_1 = psi_0 + psi_0 * 0 = 5k; psi_2 = 5k + 5k * 1 = 10k; psi_3 = 10k + 10k * 2 = 30k;
    # psi_4 = 30k + 30k * 3 = 120k.
    assert round_lengths(5000, "factorial", 5) == [5000, 5000, 10000, 30000, 120000]


def test_linear_rule_by_hand():
    assert round_lengths(5000, "linear", 4) == [5000, 10000, 15000, 20000]


def test_paper_dmc_plan():
    # 100k budget, psi_0 = 5k: ends at 5k, 10k, 20k, 50k, then the budget cuts the 120k round.
    rounds = plan_rounds(100_000, 5000, "factorial", cold_start_rounds=4)
    assert rounds == [
        Round(0, 0, 5000, guided=False, fine_tune=True),
        Round(1, 5000, 10000, guided=False, fine_tune=True),
        Round(2, 10000, 20000, guided=False, fine_tune=True),
        Round(3, 20000, 50000, guided=False, fine_tune=True),
        Round(4, 50000, 100000, guided=True, fine_tune=False),
    ]
    assert sum(r.fine_tune for r in rounds) == 4


def test_carla_cold_start_two_and_linear():
    rounds = plan_rounds(60_000, 10_000, "linear", cold_start_rounds=2)
    assert [(r.start, r.end) for r in rounds] == [(0, 10_000), (10_000, 30_000), (30_000, 60_000)]
    assert [r.guided for r in rounds] == [False, False, True]
    assert [r.fine_tune for r in rounds] == [True, True, False]


def test_many_rounds_extend_the_lengths():
    rounds = plan_rounds(100, 1, "linear", cold_start_rounds=0)
    assert rounds[-1].end == 100 and all(r.guided for r in rounds)
    assert [r.length for r in rounds[:4]] == [1, 2, 3, 4]


def test_round_at():
    rounds = plan_rounds(100_000, 5000)
    assert round_at(rounds, 0).index == 0
    assert round_at(rounds, 4999).index == 0
    assert round_at(rounds, 5000).index == 1
    assert round_at(rounds, 10**9).index == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 5000), "total_env_steps"), ((100, 0), "psi_0"), ((100, 5, "cubic"), "growth")],
)
def test_bad_schedules_raise(args, message):
    with pytest.raises(ValueError, match=message):
        plan_rounds(*args)


def test_table_lists_every_round():
    console = Console(record=True, width=120)
    console.print(schedule_table(plan_rounds(100_000, 5000), action_repeat=4))
    text = console.export_text()
    assert "50,000 - 100,000" in text and "12,500" in text and "off (cold start)" in text
