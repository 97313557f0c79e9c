"""PPO math against numbers computed by hand."""

import math

import pytest
import torch

from workers.rl.advantages import gae, masked_mean, masked_var, whiten
from workers.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate, penalised_rewards, sqrt_kl
from workers.rl.losses import ppo_loss


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_with_gamma_one_and_lambda_one_is_return_minus_value():
    rewards, values, mask = t([0.0, 0.0, 1.0]), t([0.5, 0.25, 0.75]), t([1, 1, 1])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # Every token's return is the final reward 1.0.
    assert torch.allclose(ret, t([1.0, 1.0, 1.0]))
    assert torch.allclose(adv, t([0.5, 0.75, 0.25]))


def test_gae_by_hand_with_lambda_half_and_padding():
    rewards, values, mask = t([1.0, 0.0, 2.0, 9.0]), t([0.5, 1.0, 1.5, 9.0]), t([1, 1, 1, 0])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # V = 0 past the last real token (index 2); the padded token is ignored.
    # delta2 = 2 - 1.5 = 0.5; A2 = 0.5
    # delta1 = 0 + 1.5 - 1.0 = 0.5; A1 = 0.5 + 0.5 * 0.5 = 0.75
    # delta0 = 1 + 1.0 - 0.5 = 1.5; A0 = 1.5 + 0.5 * 0.75 = 1.875
    assert torch.allclose(adv, t([1.875, 0.75, 0.5, 0.0]))
    assert torch.allclose(ret, t([2.375, 1.75, 2.0, 0.0]))


def test_masked_statistics_and_whitening():
    values, mask = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_var(values, mask).item() == pytest.approx(1.0)  # (1 + 0 + 1) / (3 - 1)
    w = whiten(values, mask)
    assert torch.allclose(w, t([-1.0, 0.0, 1.0, 0.0]), atol=1e-6)
    # Without shifting the mean, only the scale changes: (x - 2) / 1 + 2.
    assert torch.allclose(whiten(values, mask, shift_mean=False), t([1.0, 2.0, 3.0, 0.0]), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(values, t([1, 0, 0, 0]))


def test_kl_estimators():
    logp, ref = t([math.log(0.5), math.log(0.25)]), t([math.log(0.25), math.log(0.5)])
    # k1 = log(p / q): [ln 2, -ln 2]
    assert torch.allclose(kl_estimate(logp, ref, "k1"), t([math.log(2), -math.log(2)]))
    # k3 = (q/p - 1) - log(q/p): [(0.5 - 1) + ln 2, (2 - 1) - ln 2]
    assert torch.allclose(kl_estimate(logp, ref, "k3"), t([-0.5 + math.log(2), 1 - math.log(2)]))
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(logp, ref, "k2")


def test_penalised_rewards_put_the_score_on_the_last_response_token():
    scores, kl, mask = t(2.0, -1.0), t([0.1, 0.2, 0.3], [0.5, 0.5, 0.5]), t([1, 1, 1], [1, 1, 0])
    rewards = penalised_rewards(scores, kl, mask, kl_coef=0.1)
    assert torch.allclose(rewards, t([-0.01, -0.02, -0.03 + 2.0], [-0.05, -0.05 - 1.0, 0.0]))


def test_sqrt_kl_is_zero_for_a_slightly_negative_estimate():
    # the k1 estimate of a mean KL can dip below 0 by sampling noise; the chart's x-axis then reads 0
    assert sqrt_kl(0.25) == 0.5
    assert sqrt_kl(-1e-6) == 0.0


def test_adaptive_controller_moves_toward_the_target():
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10_000)
    # KL 12 is twice the target: error clipped to +0.2; beta *= 1 + 0.2 * 1000 / 10000.
    assert ctl.update(12.0, 1000) == pytest.approx(0.1 * 1.02)
    # KL 3 is half the target: error -0.5 clipped to -0.2.
    assert ctl.update(3.0, 1000) == pytest.approx(0.1 * 1.02 * 0.98)
    # On target: no change.
    assert ctl.update(6.0, 1000) == pytest.approx(0.1 * 1.02 * 0.98)
    assert FixedKLController(0.001).update(100.0, 1000) == 0.001


def test_ppo_loss_clips_the_ratio_by_hand():
    # ratio = e for every token, so it is clipped to 1.2 where the advantage is positive.
    old = t([0.0, 0.0, 0.0])
    new = t([1.0, 1.0, 1.0])
    adv = t([1.0, -1.0, 2.0])
    mask = t([1, 1, 1])
    values, returns = t([0.0, 0.0, 0.0]), t([0.0, 0.0, 0.0])
    loss, stats = ppo_loss(
        logprobs=new, old_logprobs=old, advantages=adv, values=values, old_values=values, returns=returns, mask=mask
    )
    e = math.e
    # token 0: max(-1 * e, -1 * 1.2) = -1.2; token 1: max(e, 1.2) = e; token 2: max(-2e, -2.4) = -2.4
    expected = (-1.2 + e - 2.4) / 3
    assert stats.policy_loss.item() == pytest.approx(expected)
    assert loss.item() == pytest.approx(expected)
    assert stats.clipfrac.item() == pytest.approx(2 / 3)
    assert stats.approx_kl.item() == pytest.approx((e - 1) - 1)
    assert stats.ratio_mean.item() == pytest.approx(e)


def test_value_loss_is_clipped_around_the_old_value():
    zeros, mask = t([0.0, 0.0]), t([1, 1])
    values, old_values, returns = t([1.0, 0.1]), t([0.0, 0.0]), t([1.0, 1.0])
    _, stats = ppo_loss(
        logprobs=zeros, old_logprobs=zeros, advantages=zeros, values=values, old_values=old_values,
        returns=returns, mask=mask, value_clip=0.2,
    )
    # token 0: unclipped (1 - 1)^2 = 0, clipped (0.2 - 1)^2 = 0.64 -> 0.64
    # token 1: unclipped (0.1 - 1)^2 = 0.81, clipped (0.1 - 1)^2 = 0.81 -> 0.81
    assert stats.value_loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert stats.value_clipfrac.item() == pytest.approx(0.5)


def test_masked_tokens_do_not_count():
    new, old = t([1.0, 5.0]), t([0.0, 0.0])
    adv, mask = t([1.0, 100.0]), t([1, 0])
    zeros = t([0.0, 0.0])
    _, stats = ppo_loss(logprobs=new, old_logprobs=old, advantages=adv, values=zeros, old_values=zeros, returns=zeros, mask=mask)
    assert stats.policy_loss.item() == pytest.approx(-1.2)
