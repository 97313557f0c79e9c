import math

import pytest

from orchestrator.gate import (
    GateConfig,
    GateInput,
    HumanVerdict,
    PMEvidence,
    bootstrap_lower_bound,
    decide,
)
from store.intervals import wilson_lower_bound, wilson_upper_bound

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
    with pytest.raises(ValueError, match=r"confidence \(0.3\)"):
        GateConfig(confidence=0.3)


# -- the lower bounds, by hand ---------------------------------------------------------------


def test_wilson_lower_bound_by_hand():
    # 8 of 10 at 90% one-sided: z = 1.2816; centre 0.8 + z^2/20 = 0.88212; half-width
    # z * sqrt(0.016 + z^2/400) = 0.18174; divided by 1 + z^2/10 = 1.16424: (0.88212 - 0.18174) / 1.16424
    assert wilson_lower_bound(8, 10, 0.9) == pytest.approx(0.60157, abs=1e-4)
    assert wilson_lower_bound(0, 10, 0.9) == 0.0
    assert wilson_lower_bound(5, 0, 0.9) is None
    # a tie counts half a win: 6 wins and 4 ties of 10 is 8 "wins"
    assert wilson_lower_bound(6 + 0.5 * 4, 10, 0.9) == wilson_lower_bound(8, 10, 0.9)


def test_wilson_upper_bound_by_hand():
    # 2 of 10 at 90% one-sided is one minus the lower bound of the 8 failures: 1 - 0.60157
    assert wilson_upper_bound(2, 10, 0.9) == pytest.approx(0.39843, abs=1e-4)
    # 0 of 5 at 95%: z = 1.6449, (0 + z^2/10 + z * sqrt(z^2/100)) / (1 + z^2/5) = 0.54110 / 1.54113
    assert wilson_upper_bound(0, 5, 0.95) == pytest.approx(0.35112, abs=1e-4)
    assert wilson_upper_bound(10, 10, 0.9) == 1.0 and wilson_upper_bound(3, 0, 0.9) is None


def test_bootstrap_lower_bound_is_seeded_and_sits_below_the_mean():
    outcomes = [1.0] * 30 + [0.5] * 50 + [0.0] * 20  # mean 0.55
    low = bootstrap_lower_bound(outcomes, 0.9)
    assert low == bootstrap_lower_bound(outcomes, 0.9)  # the same every time
    # ~ mean - z * sd / sqrt(n): sd of the outcomes = sqrt(0.3 + 0.125 - 0.3025) = 0.35, so 0.55 - 1.2816 * 0.035
    assert low == pytest.approx(0.55 - 1.2816 * math.sqrt(0.1225 / 100), abs=0.01)
    assert bootstrap_lower_bound([1.0] * 5, 0.9) == 1.0 and bootstrap_lower_bound([], 0.9) is None
    # ties are not coin flips: with many of them Wilson's bound is the lower (more cautious) one
    assert wilson_lower_bound(30 + 25, 100, 0.9) < low


# -- people are the first judge ----------------------------------------------------------------


def test_a_candidate_both_pms_prefer_but_people_do_not_is_refused_with_its_human_win_rate_and_bound():
    human = HumanVerdict(wins=10, ties=20, losses=30, required=50)  # the PMs' win rates are 0.6 and 0.65
    decision = decide(measured(human=human), GateConfig())
    assert not decision.deploy and decision.checks["beats_deployed_under_test_pm"] and decision.checks["pms_agree"]
    assert decision.checks["people_prefer_candidate"] is False
    (reason,) = decision.reasons
    assert reason.startswith("human win rate 0.333 (10 wins, 20 ties, 30 losses): its 90% lower bound 0.2")
    assert reason.endswith("(bootstrap) is not above 0.500")
    assert decision.measures["human_win_rate"] == pytest.approx(1 / 3)
    assert decision.measures["human_lower_bound"] < 1 / 3


def test_a_candidate_people_prefer_with_confidence_is_deployed():
    decision = decide(measured(human=HumanVerdict(wins=40, ties=40, losses=20, required=50)), GateConfig())
    assert decision.deploy and decision.measures["human_lower_bound"] > 0.5
    # the same answers, but the bar raised above what they support
    assert not decide(measured(human=HumanVerdict(wins=40, ties=40, losses=20, required=50)),
                      GateConfig(human_margin=0.1)).deploy


def test_too_few_human_answers_by_the_deadline_is_no_deploy():
    decision = decide(measured(human=HumanVerdict(wins=12, ties=0, losses=0, required=50)), GateConfig())
    assert not decision.deploy
    assert decision.reasons == ["only 12 of the 50 human answers the gate needs arrived by the deadline"]
    few = decide(measured(human=HumanVerdict(wins=3, ties=0, losses=0, required=50, tasks=3, outcome="answered")),
                 GateConfig())
    assert few.reasons == ["only 3 of the 50 human answers the gate needs arrived (all 3 eval tasks are answered)"]


def test_with_human_evaluation_off_the_pms_decide_and_the_decision_says_so():
    decision = decide(GOOD, GateConfig())
    assert decision.deploy and decision.measures["human_eval"] == "off" and "people_prefer_candidate" not in decision.checks


def test_a_pm_no_better_than_chance_on_held_out_data_is_no_evidence():
    # the measured case: a test PM at 0.545 on 22 decisive held-out comparisons gave a 0.709 win rate
    weak = measured(win_rate_test_pm=0.709, train_pm=PMEvidence(accuracy=0.9, decisive=40),
                    test_pm=PMEvidence(accuracy=0.545, decisive=22))
    decision = decide(weak, GateConfig())
    assert not decision.deploy and decision.checks["test_pm_is_evidence"] is False and decision.checks["train_pm_is_evidence"]
    assert decision.reasons == [
        "the test PM is no evidence: held-out accuracy 0.545 on 22 decisive comparisons, lower bound 0.411 is not "
        "above 0.500"
    ]
    assert decide(measured(test_pm=PMEvidence(accuracy=None, decisive=0)), GateConfig()).deploy is False
    assert decide(measured(test_pm=PMEvidence(accuracy=0.85, decisive=40)), GateConfig()).deploy
