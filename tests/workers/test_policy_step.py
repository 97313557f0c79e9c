"""What the policy steps (ppo, rloo, online_dpo, rejection_sampling) share, against hand-computed numbers."""

from __future__ import annotations

import torch

from workers.common.generation import row_seed, row_uniforms
from workers.common.policy_step import conservative_reward, policy_metrics, sample_uniforms, this_run


def test_conservative_reward_by_hand():
    # members [[1, 3], [3, 1]]: mean [2, 2], population std [1, 1]; lambda 0.5 -> [1.5, 1.5];
    # the second response did not end: 1 more off -> [1.5, 0.5]
    members = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    ended = torch.tensor([True, False])
    scores = conservative_reward(members, ended, ensemble_penalty=0.5, missing_eos_penalty=1.0)
    assert scores.mean.tolist() == [2.0, 2.0]
    assert scores.spread.tolist() == [1.0, 1.0]
    assert scores.conservative.tolist() == [1.5, 1.5]
    assert scores.reward.tolist() == [1.5, 0.5]
    # no missing-EOS penalty: the reward is the conservative score, ended or not
    unpenalised = conservative_reward(members, ended, ensemble_penalty=0.5, missing_eos_penalty=None)
    assert unpenalised.reward.tolist() == [1.5, 1.5]
    # one member (a single PM): no spread, so lambda changes nothing; mean [1, 3], the second 2 off -> [1, 1]
    single = conservative_reward(members[:1], ended, ensemble_penalty=2.0, missing_eos_penalty=2.0)
    assert single.spread.tolist() == [0.0, 0.0]
    assert single.conservative.tolist() == [1.0, 3.0]
    assert single.reward.tolist() == [1.0, 1.0]


def test_policy_metrics_are_the_keys_the_improve_stage_records():
    # members' means [2, 2] and spreads [1, 1] as above; test PM scores [0.5, 1.5]: mean 1
    scores = conservative_reward(torch.tensor([[1.0, 3.0], [3.0, 1.0]]), torch.tensor([True, False]),
                                 ensemble_penalty=0.5, missing_eos_penalty=1.0)
    assert policy_metrics(scores, 0.25, 8, torch.tensor([0.5, 1.5])) == {
        "policy/reward": 2.0, "policy/reward_spread": 1.0, "policy/kl": 0.25, "policy/episodes": 8,
        "policy/reward_test_pm": 1.0,
    }
    assert "policy/reward_test_pm" not in policy_metrics(scores, 0.25, 8, None)


def test_this_run_is_at_most_max_this_run_units_from_where_the_last_stopped():
    assert list(this_run(2, 5, None)) == [2, 3, 4]
    assert list(this_run(2, 5, 2)) == [2, 3]
    assert list(this_run(2, 5, 9)) == [2, 3, 4]
    assert list(this_run(5, 5, 1)) == []


def test_sample_uniforms_are_slot_major_and_seeded_by_each_row():
    # 2 prompt slots x 3 samples: row 5 is slot 1, sample 2
    uniforms = sample_uniforms(7, "rloo", 3, 2, 3, 4)
    assert uniforms.shape == (6, 4)
    assert torch.equal(uniforms[5], row_uniforms(row_seed(7, "rloo", [3, 1], 2), 4))
    assert torch.equal(uniforms[0], row_uniforms(row_seed(7, "rloo", [3, 0], 0), 4))
