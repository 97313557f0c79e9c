"""The PM's math against hand-computed numbers: Bradley-Terry loss, packing, fitting, calibration."""

from __future__ import annotations

import math

import pytest
import torch

from workers.common.metrics import calibration, pairwise_calibration
from workers.common.modeling import load_trunk
from workers.common.pm import (
    PAD,
    PROMPT,
    RESPONSE_A,
    RESPONSE_B,
    PreferenceModel,
    bradley_terry_loss,
    check_pair_packing,
    fit_pair,
    pack_pairs,
    pad_sequences,
    pair_attention_mask,
)

# -logsigmoid(2) = log(1 + e^-2), -logsigmoid(-2) = log(1 + e^2), -logsigmoid(0) = log 2, -logsigmoid(1) = log(1 + e^-1)
NLS_2 = 0.1269280110429725
NLS_NEG2 = 2.1269280110429727
LOG2 = 0.6931471805599453
NLS_1 = 0.31326168751822286


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_bt_loss_decisive_labels():
    # A preferred with d = 2 and d = 0; B preferred with d = 1 - 3 = -2.
    losses, stats = bradley_terry_loss(_t(2.0, 0.0, 1.0), _t(0.0, 0.0, 3.0), _t(1.0, 1.0, 0.0))
    assert losses.tolist() == pytest.approx([NLS_2, LOG2, NLS_2], abs=1e-6)
    # the preferred response scores higher in the first and third (d = 0 is not a win)
    assert stats.accuracy.item() == pytest.approx(2 / 3)
    assert stats.num_decisive.item() == 3
    assert stats.margin.item() == pytest.approx((2 + 0 + 2) / 3)
    assert stats.mean_reward.item() == pytest.approx(1.0)


def test_bt_loss_tie_counts_half_each_way():
    # tie at d = 2: 0.5 * -logsig(2) + 0.5 * -logsig(-2); at d = 0 it is log 2, the minimum
    losses, stats = bradley_terry_loss(_t(2.0, 0.5), _t(0.0, 0.5), _t(0.5, 0.5))
    assert losses.tolist() == pytest.approx([0.5 * NLS_2 + 0.5 * NLS_NEG2, LOG2], abs=1e-6)
    assert losses[0].item() == pytest.approx(1.1269280110429726, abs=1e-6)
    assert math.isnan(stats.accuracy.item()) and stats.num_decisive.item() == 0


def test_bt_loss_margin_applies_to_decisive_labels_only():
    # margin 1: A wins with d = 2 -> -logsig(1); B wins with d = -2 -> -logsig(1); tie unchanged
    losses, _ = bradley_terry_loss(_t(2.0, 0.0, 2.0), _t(0.0, 2.0, 0.0), _t(1.0, 0.0, 0.5), margin=1.0)
    assert losses.tolist() == pytest.approx([NLS_1, NLS_1, 0.5 * NLS_2 + 0.5 * NLS_NEG2], abs=1e-6)


def test_bt_loss_gradients():
    # dL/dr_A = -(t - sigmoid(d)): at d = 0 that is -0.5 for A, +0.5 for B, 0 for a tie
    r_a = torch.zeros(3, requires_grad=True)
    r_b = torch.zeros(3, requires_grad=True)
    losses, _ = bradley_terry_loss(r_a, r_b, _t(1.0, 0.0, 0.5))
    losses.sum().backward()
    assert r_a.grad.tolist() == pytest.approx([-0.5, 0.5, 0.0])
    assert r_b.grad.tolist() == pytest.approx([0.5, -0.5, 0.0])


def test_bt_loss_is_symmetric_in_a_and_b():
    r_a, r_b, t = _t(0.3, -1.2, 2.0), _t(1.1, 0.4, -0.5), _t(1.0, 0.0, 0.5)
    forward, _ = bradley_terry_loss(r_a, r_b, t, margin=0.5)
    swapped, _ = bradley_terry_loss(r_b, r_a, 1 - t, margin=0.5)
    assert torch.allclose(forward, swapped)


def test_pack_pairs_layout():
    batch = pack_pairs([([5, 6], [7, 8], [9]), ([5], [7], [8, 9, 10])], pad_id=0, pack_rows=False)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 7, 8, 9, 10]]
    # B's positions restart where the prompt ends
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 3]]
    assert batch.segments.tolist() == [
        [PROMPT, PROMPT, RESPONSE_A, RESPONSE_A, RESPONSE_B],
        [PROMPT, RESPONSE_A, RESPONSE_B, RESPONSE_B, RESPONSE_B],
    ]
    assert batch.row.tolist() == [0, 1]
    assert batch.index_a.tolist() == [3, 1]
    assert batch.index_b.tolist() == [4, 4]


def test_pack_pairs_shares_rows_first_fit_decreasing():
    # lengths 6, 3, 3, 4: rows of 6 -> [0], [3, 1] (4 + 3 > 6? no: 7 > 6), so [0], [3], [1, 2]
    pairs = [([1, 2], [3, 4], [5, 6]), ([1], [2], [3]), ([4], [5], [6]), ([1, 2], [3], [4])]
    batch = pack_pairs(pairs, pad_id=0)
    assert batch.input_ids.shape == (3, 6)
    assert batch.row.tolist() == [0, 2, 2, 1]
    assert batch.input_ids[2].tolist() == [1, 2, 3, 4, 5, 6]
    assert batch.position_ids[2].tolist() == [0, 1, 1, 0, 1, 1]
    assert batch.groups[2].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.groups[1].tolist() == [0, 0, 0, 0, -1, -1]
    assert (batch.index_a.tolist(), batch.index_b.tolist()) == ([3, 1, 4, 2], [5, 2, 5, 3])


def test_pair_attention_mask_hides_a_from_b_other_comparisons_and_padding():
    batch = pack_pairs([([5, 6], [7], [8]), ([5], [7], [8])], pad_id=0, pack_rows=False)
    mask = pair_attention_mask(batch)
    assert mask.shape == (2, 1, 4, 4)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0],  # prompt
        [1, 1, 0, 0],  # prompt
        [1, 1, 1, 0],  # A sees the prompt and itself
        [1, 1, 0, 1],  # B sees the prompt and itself, not A
    ]
    assert batch.segments[1].tolist() == [PROMPT, RESPONSE_A, RESPONSE_B, PAD]
    assert mask[1, 0].int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [0, 0, 0, 1],  # padding sees only itself: never an empty softmax row
    ]
    # two comparisons in one row see nothing of each other
    shared = pack_pairs([([5], [7], [8]), ([6], [9], [10]), ([1, 2, 3, 4], [7], [8])], pad_id=0)
    assert shared.input_ids.shape == (2, 6) and shared.row.tolist() == [1, 1, 0]
    assert pair_attention_mask(shared)[1, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 0, 1],
    ]
    additive = pair_attention_mask(batch, additive_dtype=torch.float32)
    assert additive[0, 0, 3].tolist() == [0.0, 0.0, torch.finfo(torch.float32).min, 0.0]


def test_fit_pair_keeps_the_end_of_the_prompt_and_bos():
    prompt = [100, 1, 2, 3, 4, 5, 6]  # 100 is BOS
    fitted, responses, cut_prompt, cut_response = fit_pair(prompt, [[7, 8, 99], [9, 99]], max_length=6, keep_prefix=1)
    assert fitted == [100, 5, 6] and responses == [[7, 8, 99], [9, 99]]
    assert cut_prompt and not cut_response
    # a response longer than the limit keeps its first tokens and its last (EOS)
    fitted, responses, cut_prompt, cut_response = fit_pair([1, 2], [[3, 4, 5, 6, 99], [7, 99]], max_length=4)
    assert responses == [[3, 4, 99], [7, 99]] and fitted == [2]
    assert cut_prompt and cut_response
    assert fit_pair([1], [[2, 99]], max_length=8) == ([1], [[2, 99]], False, False)


def test_calibration_by_hand():
    # one prediction in each of bins 1, 3, 8, 9: |0.1-0| + |0.3-1| + |0.8-0| + |0.9-1| = 1.7, over 4
    ece, bins = calibration([0.1, 0.9, 0.8, 0.3], [0.0, 1.0, 0.0, 1.0], n_bins=10)
    assert ece == pytest.approx(0.425)
    assert [b.count for b in bins] == [0, 1, 0, 1, 0, 0, 0, 0, 1, 1]
    assert bins[9].lo == pytest.approx(0.9) and bins[9].observed == 1.0
    ece, bins = calibration([0.7, 0.7, 1.0], [1.0, 0.0, 1.0], n_bins=2)
    assert ece == pytest.approx(0.8 - 2 / 3)  # all in bin [0.5, 1]: mean predicted 0.8, observed 2/3
    assert bins[1].count == 3 and bins[1].mean_predicted == pytest.approx(0.8)


def test_pairwise_calibration_does_not_depend_on_which_response_comes_first():
    # HH-RLHF order: the chosen response first, so every label is 1. A PM that is right 6 times
    # in 10 with P = 0.52 (and wrong with P = 0.48) is well calibrated within 0.08...
    p = [0.52] * 6 + [0.48] * 4
    ece, bins = pairwise_calibration(p, [1.0] * 10, n_bins=10)
    # ...bin [0.5, 0.6): six (0.52, 1) and four (0.52, 0) -> observed 0.6; bin [0.4, 0.5) mirrors it
    assert ece == pytest.approx(0.08)
    assert bins[5].count == 10 and bins[5].observed == pytest.approx(0.6)
    # taken one way only, the same PM would show 0.48 and 0.52 against an outcome of 1
    assert calibration(p, [1.0] * 10)[0] == pytest.approx(0.5 - 0.02 * (6 - 4) / 10)
    # listing the rejected response first changes nothing
    flipped = pairwise_calibration([1 - x for x in p], [0.0] * 10, n_bins=10)
    assert flipped[0] == pytest.approx(ece)


@pytest.mark.parametrize("model_fixture", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_scores_equal_separate_forward_passes(request, model_fixture, attn):
    path = request.getfixturevalue(model_fixture)
    trunk = load_trunk(path, device=torch.device("cpu"), dtype=torch.float32, attn_implementation=attn)
    pm = PreferenceModel(trunk, PreferenceModel.new_head(trunk.config.hidden_size, std=0.5, seed=0)).eval()
    pairs = [([3, 4, 5, 6, 7, 17, 18], [8, 9, 1], [10, 1]), ([3], [11, 1], [1]), ([3, 4], [14, 1], [15, 16, 1])]
    with torch.no_grad():
        r_a, r_b = pm.score_pairs(pack_pairs(pairs, pad_id=0))
        assert pack_pairs(pairs, pad_id=0).input_ids.shape[0] == 2  # the short two share a row
        ref = pm.score_sequences(pad_sequences([p + a for p, a, _ in pairs] + [p + b for p, _, b in pairs], pad_id=0))
    assert torch.allclose(torch.cat([r_a, r_b]), ref, atol=1e-5)
    assert check_pair_packing(pm, token_ids=range(3, 13)) < 1e-5


def test_packing_check_catches_a_model_that_misreads_the_mask(tiny_gpt2, monkeypatch):
    # eager attention adds the mask to the scores; handing it a boolean mask is the kind of mismatch to catch
    trunk = load_trunk(tiny_gpt2, device=torch.device("cpu"), dtype=torch.float32, attn_implementation="eager")
    pm = PreferenceModel(trunk, PreferenceModel.new_head(64, std=0.02, seed=0))
    monkeypatch.setattr(PreferenceModel, "_uses_boolean_mask", lambda self: True)
    with pytest.raises(ValueError, match="does not honour a custom 4D attention mask.*pair_mode=concat"):
        check_pair_packing(pm, token_ids=range(3, 13))


def test_margin_from_strength_adds_per_unit_of_strength():
    from workers.train_pm import EncodedPair, TrainPMConfig, margin_of

    cfg = TrainPMConfig(model_path="m", dataset_path="d", output_dir="o", margin=0.5, margin_per_strength=1.0)
    pairs = [EncodedPair([1], [2], [3], 1.0, None, s) for s in (None, 1.0, 3.0)]
    assert [margin_of(p, cfg) for p in pairs] == [0.5, 1.5, 3.5]
    # strength 3 with margin 3.5: A wins by d = 4 -> -logsig(0.5); a tie ignores whatever margin it is given
    losses, _ = bradley_terry_loss(_t(4.0, 1.0), _t(0.0, 1.0), _t(1.0, 0.5), margin=_t(3.5, 3.5))
    assert losses.tolist() == pytest.approx([-math.log(1 / (1 + math.exp(-0.5))), LOG2], abs=1e-6)
