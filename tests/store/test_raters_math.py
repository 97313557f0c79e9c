"""Cohen's kappa, Krippendorff's alpha and the gold flag against numbers worked out by hand (no database)."""

import pytest

from store.raters import QCPolicy, cohen_kappa, gold_flag, krippendorff_alpha


def test_kappa_of_a_worked_example():
    # (this rater, other rater): (a,a) (a,a) (b,b) (b,a)
    # p_o = 3/4 (three of four pairs agree)
    # left marginals a: 2/4, b: 2/4; right marginals a: 3/4, b: 1/4
    # p_e = 1/2 * 3/4 + 1/2 * 1/4 = 1/2
    # kappa = (3/4 - 1/2) / (1 - 1/2) = 1/2
    assert cohen_kappa([("a", "a"), ("a", "a"), ("b", "b"), ("b", "a")]) == pytest.approx(0.5)


def test_kappa_of_a_tie_label_counts_as_a_label_of_its_own():
    # (a,a) (tie,tie) (b,tie): p_o = 2/3
    # left a: 1/3, tie: 1/3, b: 1/3; right a: 1/3, tie: 2/3
    # p_e = 1/3 * 1/3 + 1/3 * 2/3 = 1/3
    # kappa = (2/3 - 1/3) / (2/3) = 1/2
    assert cohen_kappa([("a", "a"), ("tie", "tie"), ("b", "tie")]) == pytest.approx(0.5)


def test_kappa_of_perfect_agreement_is_one():
    assert cohen_kappa([("a", "a"), ("b", "b"), ("tie", "tie"), ("a", "a")]) == pytest.approx(1.0)


def test_kappa_at_chance_level_is_zero():
    # p_o = 1/2, marginals 1/2 each side, p_e = 1/2: (1/2 - 1/2) / (1/2) = 0
    assert cohen_kappa([("a", "a"), ("a", "b"), ("b", "a"), ("b", "b")]) == pytest.approx(0.0)


def test_kappa_below_chance_is_negative():
    # p_o = 0, p_e = 1/2: (0 - 1/2) / (1/2) = -1
    assert cohen_kappa([("a", "b"), ("b", "a")]) == pytest.approx(-1.0)


def test_kappa_is_none_when_chance_agreement_is_certain_or_there_is_no_pair():
    assert cohen_kappa([("a", "a"), ("a", "a"), ("a", "a")]) is None  # p_e = 1
    assert cohen_kappa([]) is None


# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C (nominal data, missing
# values): 4 observers x 12 units, values 1-5, "." where an observer gave none.
KRIPPENDORFF_2011 = {
    "A": "1 2 3 3 2 1 4 1 2 . . .",
    "B": "1 2 3 3 2 2 4 1 2 5 . 3",
    "C": ". 3 3 3 2 3 4 2 2 5 1 .",
    "D": "1 2 3 3 2 4 4 1 2 5 1 .",
}
LABELS = {"1": "a", "2": "b", "3": "tie", "4": "d", "5": "e"}
"""the paper's values as labels: nominal, so only equal or not counts"""


def krippendorff_units() -> list[list[str]]:
    rows = [line.split() for line in KRIPPENDORFF_2011.values()]
    return [[LABELS[v] for v in unit if v != "."] for unit in zip(*rows)]


def test_alpha_of_the_textbook_example():
    # The coincidence matrix (values 1..5; unit 12 has one value and is left out):
    #   1: 7    4/3  1/3  1/3  0   | 9
    #   2: 4/3  10   4/3  1/3  0   | 13
    #   3: 1/3  4/3  8    1/3  0   | 10
    #   4: 1/3  1/3  1/3  4    0   | 5
    #   5: 0    0    0    0    3   | 3        n = 40
    # alpha = 1 - (n - 1) * (n - sum o_cc) / (n^2 - sum n_c^2)
    #       = 1 - 39 * (40 - 32) / (1600 - (81 + 169 + 100 + 25 + 9)) = 1 - 312 / 1216 = 0.743
    units = krippendorff_units()
    assert len(units) == 12 and units[11] == ["tie"]
    assert round(krippendorff_alpha(units), 3) == 0.743
    assert krippendorff_alpha(units) == pytest.approx(1 - 312 / 1216)


def test_alpha_ignores_a_unit_with_one_label():
    units = krippendorff_units()
    assert krippendorff_alpha(units + [["a"], ["e"], []]) == pytest.approx(krippendorff_alpha(units))
    assert krippendorff_alpha([["a"], ["b"]]) is None  # nothing pairable


def test_alpha_of_perfect_agreement_is_one():
    assert krippendorff_alpha([["a", "a"], ["b", "b", "b"], ["tie", "tie"]]) == pytest.approx(1.0)


def test_alpha_is_none_without_variation():
    assert krippendorff_alpha([["a", "a"], ["a", "a", "a"]]) is None


def test_alpha_of_two_raters_who_always_disagree_is_below_zero():
    # two units (a,b) and (b,a): o_ab = o_ba = 2, n = 4, n_a = n_b = 2
    # alpha = 1 - 3 * 4 / (16 - 8) = -0.5
    assert krippendorff_alpha([["a", "b"], ["b", "a"]]) == pytest.approx(-0.5)


def test_gold_flags_a_rater_only_once_its_upper_bound_is_under_the_threshold():
    policy = QCPolicy(min_gold_answers=5, min_gold_accuracy=0.6, gold_confidence=0.95)
    assert gold_flag(0, 4, policy) is None  # too few answers yet
    # 0 of 5: upper bound 0.351 (worked in test_gate) < 0.6
    assert gold_flag(0, 5, policy) == "gold accuracy 0.00 over 5 gold answers is under 0.6 (at most 0.35 at 95% confidence)"
    # 4 of 8 is a share of 0.5, but its 95% upper bound is 0.751: a short run, not evidence
    assert gold_flag(4, 8, policy) is None
    # 15 of 40 (0.375): upper bound 0.51 < 0.6
    assert gold_flag(15, 40, policy).startswith("gold accuracy 0.38 over 40 gold answers is under 0.6 (at most 0.51")
    assert gold_flag(15, 40, policy.model_copy(update={"min_gold_accuracy": 0.5})) is None
