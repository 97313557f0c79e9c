"""DPO / IPO losses and RLOO / GRPO advantages against numbers worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from workers.rl.group import grpo_advantages, rloo_advantages
from workers.rl.preference import preference_loss


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Three copies of one pair, labelled A, B and tie. Policy log-probs A = -10, B = -12; reference both -11:
# logratio_a = 1, logratio_b = -1, logits = 2; with beta 0.1, beta * logits = 0.2.
PAIR = dict(policy_logps_a=_t(-10, -10, -10), policy_logps_b=_t(-12, -12, -12),
            ref_logps_a=_t(-11, -11, -11), ref_logps_b=_t(-11, -11, -11), target=_t(1.0, 0.0, 0.5))
NLS_02 = math.log(1 + math.exp(-0.2))  # -log sigmoid(0.2) = 0.598138869
NLS_M02 = math.log(1 + math.exp(0.2))  # -log sigmoid(-0.2) = 0.798138869


def test_dpo_loss_for_a_b_and_a_tie():
    losses, stats = preference_loss(**PAIR, beta=0.1)
    assert NLS_02 == pytest.approx(0.598138869) and NLS_M02 == pytest.approx(0.798138869)
    # A preferred: -log sigmoid(0.2); B: -log sigmoid(-0.2); a tie: the mean of both, least at logits = 0
    assert losses.tolist() == pytest.approx([NLS_02, NLS_M02, 0.5 * (NLS_02 + NLS_M02)], abs=1e-9)
    # implicit rewards 0.1 * 1 and 0.1 * -1; the A pair is ranked right, the B pair wrong, the tie not counted
    assert (stats.reward_a.item(), stats.reward_b.item()) == pytest.approx((0.1, -0.1))
    assert stats.accuracy.item() == 0.5 and stats.num_decisive.item() == 2
    assert stats.margin.item() == pytest.approx(0.0)  # (+0.2 - 0.2) / 2


def test_a_tie_is_least_where_the_implicit_rewards_are_equal():
    h = torch.linspace(-3, 3, 61, dtype=torch.float64)
    zeros = torch.zeros_like(h)
    losses, _ = preference_loss(h, zeros, zeros, zeros, torch.full_like(h, 0.5), beta=0.5)
    assert h[losses.argmin()].item() == pytest.approx(0.0)


def test_label_smoothing_moves_a_decisive_target_and_leaves_a_tie():
    losses, _ = preference_loss(**PAIR, beta=0.1, label_smoothing=0.1)
    # t = 0.9 for A: 0.9 * 0.598138869 + 0.1 * 0.798138869 = 0.618138869; B mirrored; the tie as before
    assert losses.tolist() == pytest.approx([0.618138869, 0.778138869, 0.698138869], abs=1e-9)


def test_ipo_loss_is_the_squared_distance_to_its_target_gap():
    losses, _ = preference_loss(**PAIR, beta=0.1, loss_type="ipo")
    # target gap 1 / (2 beta) = 5 for A, -5 for B, 0 for a tie; logits = 2
    assert losses.tolist() == pytest.approx([(2 - 5) ** 2, (2 + 5) ** 2, 2 ** 2])


def test_dpo_gradient_pushes_the_preferred_response_up():
    policy_a = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    losses, _ = preference_loss(policy_a, _t(-12), _t(-11), _t(-11), _t(1.0), beta=0.1)
    losses.sum().backward()
    # d/d logp(A) of -log sigmoid(beta * h) = -beta * (1 - sigmoid(0.2)) = -0.1 * 0.450166 = -0.0450166
    assert policy_a.grad.item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-0.2))))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="beta"):
        preference_loss(**PAIR, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(**PAIR, label_smoothing=0.5)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(**PAIR, loss_type="hinge")


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    # 1 - (2 + 3) / 2 = -1.5; 2 - (1 + 3) / 2 = 0; 3 - (1 + 2) / 2 = 1.5; and k / (k - 1) * (r - mean)
    adv = rloo_advantages(_t(1, 2, 3).unsqueeze(0))
    assert adv.tolist() == [[-1.5, 0.0, 1.5]]
    rewards = torch.tensor([[0.2, -1.0, 0.7, 0.1], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    expected = 4 / 3 * (rewards - rewards.mean(dim=1, keepdim=True))
    assert torch.allclose(rloo_advantages(rewards), expected)
    assert rloo_advantages(rewards)[1].tolist() == [0.0] * 4  # equal rewards: nothing to learn


def test_grpo_normalises_within_each_group():
    # mean 2, population std sqrt(2/3) = 0.8164966: (-1.2247449, 0, 1.2247449)
    adv = grpo_advantages(_t(1, 2, 3).unsqueeze(0), eps=0.0)
    assert adv[0].tolist() == pytest.approx([-1.2247449, 0.0, 1.2247449])
    assert grpo_advantages(_t(5, 5).unsqueeze(0)).tolist() == [[0.0, 0.0]]  # std 0: advantages 0
    assert grpo_advantages(_t(1, 2, 3).unsqueeze(0), scale=False).tolist() == [[-1.0, 0.0, 1.0]]


def test_group_advantages_need_two_samples_a_prompt():
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(_t(1, 2, 3))
    with pytest.raises(ValueError, match="k >= 2"):
        grpo_advantages(torch.ones(4, 1))
