import pytest

from orchestrator.gate import GateConfig, GateInput, decide

GOOD = GateInput(win_rate_test_pm=0.6, win_rate_train_pm=0.65, kl=0.3, test_pm_delta=0.2, train_pm_delta=0.25)


def measured(**changes) -> GateInput:
    return GateInput(**{**GOOD.__dict__, **changes})


def test_a_better_candidate_within_budget_is_deployed():
    decision = decide(GOOD, GateConfig())
    assert decision.deploy and decision.reasons == []
    assert all(decision.checks.values())


def test_a_candidate_that_does_not_beat_the_deployed_policy_is_rejected():
    decision = decide(measured(win_rate_test_pm=0.51), GateConfig(win_margin=0.02))
    assert not decision.deploy
    assert decision.reasons == ["test-PM win rate 0.510 is below the required 0.520"]


def test_a_kl_budget_of_zero_rejects_any_change():
    decision = decide(GOOD, GateConfig(kl_budget=0.0))
    assert not decision.deploy and decision.checks["within_kl_budget"] is False
    assert "KL to the reference 0.3000 is over the budget 0.0000" in decision.reasons


def test_train_pm_rising_while_test_pm_falls_is_reward_hacking():
    decision = decide(measured(train_pm_delta=0.5, test_pm_delta=-0.1), GateConfig())
    assert not decision.deploy and "possible reward hacking" in decision.reasons[0]
    gap = decide(measured(win_rate_train_pm=0.95, win_rate_test_pm=0.6), GateConfig(max_pm_gap=0.2))
    assert not gap.deploy and gap.checks["pms_agree"] is False


def test_every_failed_check_is_reported():
    decision = decide(measured(win_rate_test_pm=0.4, kl=9.0, train_pm_delta=1.0, test_pm_delta=-1.0), GateConfig())
    assert len(decision.reasons) == 3


def test_bad_thresholds_are_refused_with_their_values():
    with pytest.raises(ValueError, match=r"win_margin \(0.7\)"):
        GateConfig(win_margin=0.7)
    with pytest.raises(ValueError, match=r"kl_budget \(-1\)"):
        GateConfig(kl_budget=-1)
