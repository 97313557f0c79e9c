"""Elo ratings from human A/B matches, checked by hand."""

import math

import pytest

from orchestrator.elo import Match, fit_elo


def test_two_policies_three_wins_to_one_is_400_log10_3_apart():
    ratings = fit_elo([Match(a=2, b=1, wins_a=3, ties=0, wins_b=1)], prior_sd=None)
    assert ratings[1] == 0.0  # the anchor: the lowest id
    assert ratings[2] == pytest.approx(400 * math.log10(3))  # P = 3/4 = 1 / (1 + 10^(-d/400))


def test_a_tie_counts_half_a_win_for_each_side():
    # 3 wins, 2 ties, 1 loss: 4 of 6, so P = 2/3 and d = 400 log10 2
    ratings = fit_elo([Match(a=2, b=1, wins_a=3, ties=2, wins_b=1)], prior_sd=None)
    assert ratings[2] == pytest.approx(400 * math.log10(2))


def test_a_chain_of_snapshots_adds_up_and_the_anchor_can_be_chosen():
    matches = [Match(2, 1, 3, 2, 1), Match(3, 2, 5, 0, 5), Match(4, 3, 1, 0, 3)]
    r = fit_elo(matches, prior_sd=None)
    assert r[3] == pytest.approx(r[2]) and r[4] == pytest.approx(r[3] - 400 * math.log10(3))
    shifted = fit_elo(matches, prior_sd=None, anchor=3)
    assert shifted[3] == 0.0 and shifted[1] == pytest.approx(-r[3])


def test_the_prior_keeps_an_unbeaten_policy_finite_and_shrinks_toward_zero():
    unbeaten = fit_elo([Match(2, 1, 10, 0, 0)])
    assert 300 < unbeaten[2] < 1000
    assert fit_elo([Match(2, 1, 3, 0, 1)])[2] < 400 * math.log10(3)
    assert fit_elo([]) == {}
    with pytest.raises(ValueError, match="anchor 9 played no match"):
        fit_elo([Match(2, 1, 1, 0, 1)], anchor=9)
