"""train_pm on tiny models: learning, resume equivalence, scoring, two PMs, warm start, HH data, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.workers.builders import comparison, synthetic_preferences, write_jsonl
from workers.common.config import ConfigError, WorkerError
from workers.common.data import is_heldout, load_comparisons, split_comparisons
from workers.common.metrics import read_metrics, sha256_file
from workers.common.modeling import load_tokenizer
from workers.common.pm import TokenLayout, pack_pairs
from workers.common.score import load_pm, score
from workers.train_pm import TrainPMConfig, _build_pm, encode, evaluate, run


def _config(model: Path, data: Path, out: Path, **kw) -> TrainPMConfig:
    base = dict(
        model_path=str(model),
        dataset_path=str(data),
        output_dir=str(out),
        heldout_fraction=0.2,
        batch_size=8,
        learning_rate=1e-3,
        max_steps=6,
        max_length=64,
        progress=False,
    )
    return TrainPMConfig(**{**base, **kw})


def _weights(pm_dir: Path) -> dict[str, torch.Tensor]:
    return {**load_file(pm_dir / "model.safetensors"), **{f"head.{k}": v for k, v in load_file(pm_dir / "pm_head.safetensors").items()}}


def test_learns_a_synthetic_preference(trained_pm):
    _, result = trained_pm
    m = result.metrics
    assert m["heldout/accuracy"] >= 0.9
    assert m["heldout/count"] == m["data/heldout_comparisons"] > 40
    assert m["heldout/log_loss"] < 0.4
    assert 0.0 <= m["heldout/ece"] <= 1.0
    bins = m["heldout/reliability"]
    assert len(bins) == 10 and sum(b["count"] for b in bins) == 2 * m["heldout/count"]  # each pair in both orders
    assert set(m["heldout/accuracy_by_source"]) == {"synthetic-even", "synthetic-odd"}
    assert sum(v["count"] for v in m["heldout/accuracy_by_source"].values()) == m["heldout/decisive"]
    # the loss went down over the run
    lines = read_metrics(Path(result.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(1, 25))
    assert lines[-1]["losses/bt"] < lines[0]["losses/bt"]
    assert m["perf/comparisons_per_s"] > 0 and 0 <= m["perf/pad_fraction"] < 1


def test_output_directory_checksums_and_config(trained_pm, tiny_gpt2):
    cfg, result = trained_pm
    out = Path(result.output_dir)
    pm_dir = Path(result.outputs["pm"])
    assert result.complete
    for rel, sha in result.files.items():
        assert sha256_file(out / rel) == sha
    assert {"pm/model.safetensors", "pm/pm_head.safetensors", "pm/ratchet_pm.json", "pm/config.json",
            "pm/ratchet_step_config.json", "ratchet_step_config.json", "metrics.jsonl", "summary.json"} <= set(result.files)
    assert not any(f.endswith((".bin", ".pt")) for f in result.files)
    assert not (out / "checkpoints").exists()  # the PM directory is the durable output
    saved = json.loads((pm_dir / "ratchet_step_config.json").read_text())
    assert saved["step"] == "train_pm" and saved["config"] == dataclasses.asdict(cfg)
    spec = json.loads((pm_dir / "ratchet_pm.json").read_text())
    assert spec["format"] == "ratchet-pm" and spec["append_eos"] is True and spec["max_length"] == 64
    assert spec["metrics"]["heldout/accuracy"] == result.metrics["heldout/accuracy"]
    # the weights moved away from the base model's
    base = load_file(Path(tiny_gpt2) / "model.safetensors")
    trained = load_file(pm_dir / "model.safetensors")
    moved = [k for k in trained if not torch.equal(trained[k], base["transformer." + k])]
    assert len(moved) > len(trained) // 2


def test_rerun_of_a_finished_run_returns_its_result_and_refuses_another_config(trained_pm):
    cfg, result = trained_pm
    again = run(dataclasses.replace(cfg, progress=True, eval_batch_size=7))  # run-only fields may change
    assert again.files == result.files and again.metrics == result.metrics
    with pytest.raises(WorkerError, match=r"different config \(learning_rate: 0.003 then, 0.001 now\)"):
        run(dataclasses.replace(cfg, learning_rate=1e-3))


def test_score_helper_matches_training_scores_and_ranks(trained_pm):
    cfg, result = trained_pm
    pm = load_pm(result.outputs["pm"], device="cpu")
    comps = load_comparisons(cfg.dataset_path)[:12]
    scores = score(pm, [(c.prompt, r) for c in comps for r in (c.response_a, c.response_b)], batch_size=5)
    items, _ = encode(comps, pm.layout, truncation="left")
    with torch.no_grad():
        packed = pack_pairs([(i.prompt, i.response_a, i.response_b) for i in items], pad_id=pm.layout.pad_id)
        r_a, r_b = pm.model.score_pairs(packed)
    assert torch.allclose(torch.tensor(scores), torch.stack([r_a, r_b], 1).flatten(), atol=1e-4)
    wins = [(s_a > s_b) == (c.choice == "a") for c, s_a, s_b in zip(comps, scores[0::2], scores[1::2])]
    assert sum(wins) >= 10
    assert score(pm, []) == []


def test_packed_and_concatenated_pairs_give_the_same_scores(tiny_gpt2, synthetic_path):
    tokenizer = load_tokenizer(tiny_gpt2)
    layout = TokenLayout(tokenizer, max_length=64, append_eos=True)
    items, _ = encode(load_comparisons(synthetic_path)[:20], layout, truncation="left")
    pm = _build_pm(_config(tiny_gpt2, synthetic_path, Path("unused"), head_init_std=1.0), seed=0, device=torch.device("cpu"))
    kw = dict(layout=layout, batch_size=6, device=torch.device("cpu"))
    packed = evaluate(pm, items, pair_mode="packed", **kw)
    concat = evaluate(pm, items, pair_mode="concat", **kw)
    assert packed["heldout/log_loss"] == pytest.approx(concat["heldout/log_loss"], abs=1e-5)
    assert packed["heldout/reward_mean"] == pytest.approx(concat["heldout/reward_mean"], abs=1e-5)


def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_gpt2, synthetic_path):
    # dropout on (RNG state matters), gradient accumulation, warmup + cosine, weight decay
    kw = dict(max_steps=9, micro_batch_size=4, disable_dropout=False, warmup_steps=2, lr_schedule="cosine",
              weight_decay=0.01, checkpoint_every=2)
    full = run(_config(tiny_gpt2, synthetic_path, tmp_path / "full", **kw))
    killed_cfg = _config(tiny_gpt2, synthetic_path, tmp_path / "killed", max_steps_this_run=4, **kw)
    first = run(killed_cfg)
    assert not first.complete and first.outputs == {}
    assert [p.name for p in (tmp_path / "killed/checkpoints/pm").iterdir()] == ["step-00000004"]
    # a half-written checkpoint from a later kill is ignored
    (tmp_path / "killed/checkpoints/pm/.tmp-deadbeef-step-00000006").mkdir()
    assert not run(killed_cfg).complete  # steps 5-8
    last = run(killed_cfg)  # step 9, evaluation, save
    assert last.complete
    a, b = _weights(tmp_path / "full/pm"), _weights(tmp_path / "killed/pm")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert last.metrics["heldout/log_loss"] == pytest.approx(full.metrics["heldout/log_loss"], abs=1e-5)
    steps = [r["step"] for r in read_metrics(tmp_path / "killed/metrics.jsonl")]
    assert steps == list(range(1, 10))
    # resuming with another config is refused, with the difference named
    other = _config(tiny_gpt2, synthetic_path, tmp_path / "other", max_steps_this_run=1, **kw)
    run(other)
    with pytest.raises(WorkerError, match=r"different config \(margin: 0.0 then, 0.5 now\)"):
        run(dataclasses.replace(other, margin=0.5))


def test_two_pms_train_on_disjoint_halves(tmp_path, tiny_gpt2, synthetic_path):
    result = run(_config(tiny_gpt2, synthetic_path, tmp_path / "two", two_pms=True, max_steps=3))
    assert set(result.outputs) == {"pm", "test_pm"}
    m = result.metrics
    split = ("data/train_comparisons", "data/validation_comparisons", "data/heldout_comparisons")
    total = sum(m[k] for k in split) + sum(m[f"test_pm/{k}"] for k in split)
    assert total == 400
    assert 150 < sum(m[k] for k in split) < 250
    assert "test_pm/heldout/accuracy" in m and "test_pm/heldout/ece" in m
    assert json.loads((tmp_path / "two/test_pm/ratchet_pm.json").read_text())["name"] == "test_pm"
    assert {r["pm"] for r in read_metrics(tmp_path / "two/metrics.jsonl")} == {"pm", "test_pm"}


def test_selection_keeps_the_weights_of_the_lowest_validation_loss(tmp_path, tiny_gpt2, synthetic_path):
    # a learning rate high enough to overshoot: the last step is not the best one
    cfg = _config(tiny_gpt2, synthetic_path, tmp_path / "sel", max_steps=16, eval_every=2, learning_rate=3e-2,
                  lr_schedule="constant", validation_fraction=0.2)
    result = run(cfg)
    m = result.metrics
    evals = [(r["step"], r["val/loss"]) for r in read_metrics(tmp_path / "sel/metrics.jsonl") if "val/loss" in r]
    assert [step for step, _ in evals] == list(range(2, 17, 2))
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert (m["train/selected_step"], m["train/best_val_loss"]) == (best_step, pytest.approx(best_loss))
    assert m["train/steps_run"] == 16 and m["data/validation_comparisons"] > 20
    # the saved PM is the selected one: its validation loss is the best one, recomputed from the directory
    pm = load_pm(result.outputs["pm"], device="cpu")
    comps = load_comparisons(synthetic_path)
    train, _ = split_comparisons(comps, fraction=0.2, split_by="prompt")
    validation = [c for c in train if is_heldout(c, fraction=0.2, split_by="prompt", salt="validation")]
    items, _ = encode(validation, pm.layout, truncation="left")
    again = evaluate(pm.model, items, layout=pm.layout, batch_size=32, device=torch.device("cpu"))
    assert again["heldout/log_loss"] == pytest.approx(best_loss, abs=1e-4)
    # "last" keeps the final step's weights, which differ from the selected ones
    last = run(dataclasses.replace(cfg, output_dir=str(tmp_path / "last"), select_by="last"))
    assert last.metrics["train/selected_step"] == 16
    a, b = _weights(tmp_path / "last/pm"), _weights(tmp_path / "sel/pm")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_ends_a_pm_after_evaluations_without_a_new_best(tmp_path, tiny_gpt2, synthetic_path):
    result = run(_config(tiny_gpt2, synthetic_path, tmp_path / "es", max_steps=60, eval_every=2, learning_rate=3e-2,
                         lr_schedule="constant", early_stop_patience=2))
    m = result.metrics
    assert m["train/steps_run"] < 60 and m["train/steps_run"] == m["train/selected_step"] + 2 * 2
    with pytest.raises(ConfigError, match=r"early_stop_patience \(2\) needs select_by 'val_loss'"):
        run(_config(tiny_gpt2, synthetic_path, tmp_path / "o", select_by="last", early_stop_patience=2))


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory, tiny_gpt2, synthetic_path):
    """(config, result) of a two-PM run whose train PM is a 3-member ensemble."""
    cfg = _config(tiny_gpt2, synthetic_path, tmp_path_factory.mktemp("ens") / "run", two_pms=True, ensemble_size=3,
                  max_steps=8, learning_rate=3e-3)
    return cfg, run(cfg)


def test_an_ensemble_pm_is_its_first_member_plus_the_others_and_scores_their_mean(ensemble):
    cfg, result = ensemble
    pm_dir = Path(result.outputs["pm"])
    spec = json.loads((pm_dir / "ratchet_pm.json").read_text())
    assert spec["members"] == ["members/1", "members/2"] and len(spec["member_metrics"]) == 3
    assert not (Path(cfg.output_dir) / "members").exists()  # moved into the ensemble directory
    ensemble_pm, single = load_pm(pm_dir, device="cpu"), load_pm(result.outputs["test_pm"], device="cpu")
    assert (ensemble_pm.size, single.size) == (3, 1)
    members = [dataclasses.replace(ensemble_pm, models=[model]) for model in ensemble_pm.models]
    alone = load_pm(pm_dir / "members/2", device="cpu")  # each member is a PM directory of its own
    pairs = [(c.prompt, c.response_a) for c in load_comparisons(cfg.dataset_path)[:6]]
    assert score(alone, pairs) == pytest.approx(score(members[2], pairs), abs=1e-6)
    each = torch.tensor([score(m, pairs) for m in members])  # [3, 6]
    assert torch.allclose(torch.tensor(score(ensemble_pm, pairs)), each.mean(0), atol=1e-5)
    assert each.std(0).min() > 0  # different seeds and resamples: the members disagree a little
    m = result.metrics
    assert m["ensemble/size"] == 3 and m["ensemble/heldout_spread"] > 0
    assert m["ensemble/member_accuracy_min"] <= m["heldout/accuracy"] + 0.2
    # bootstrap resamples: each member saw about 63% of the distinct training comparisons, and selected on the rest
    for member in spec["member_metrics"]:
        assert 0.5 < member["data/unique_train_comparisons"] / member["data/train_comparisons"] < 0.75
        assert member["data/validation_comparisons"] == member["data/train_comparisons"] - member["data/unique_train_comparisons"]
    assert "ensemble/size" not in {k.removeprefix("test_pm/") for k in m if k.startswith("test_pm/")}


def test_a_killed_ensemble_run_resumes_to_the_same_members(tmp_path, ensemble):
    cfg, result = ensemble
    killed = dataclasses.replace(cfg, output_dir=str(tmp_path / "killed"), max_steps_this_run=5)
    while not (last := run(killed)).complete:  # stops in member 0, then member 1, ... and resumes each
        pass
    for rel in (".", "members/1", "members/2"):
        a, b = _weights(Path(result.outputs["pm"]) / rel), _weights(tmp_path / "killed/pm" / rel)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5, rel
    assert last.metrics["heldout/log_loss"] == pytest.approx(result.metrics["heldout/log_loss"], abs=1e-5)


def test_members_trained_two_at_a_time_train_exactly_as_one_at_a_time(tmp_path, ensemble):
    cfg, result = ensemble
    parallel = run(dataclasses.replace(cfg, output_dir=str(tmp_path / "par"), parallel_pms=2))
    for rel in (".", "members/1", "members/2"):
        a, b = _weights(Path(result.outputs["pm"]) / rel), _weights(tmp_path / "par/pm" / rel)
        assert all(torch.equal(a[k], b[k]) for k in a), rel
    assert _weights(Path(result.outputs["test_pm"])).keys() == _weights(tmp_path / "par/test_pm").keys()
    assert parallel.metrics["heldout/log_loss"] == result.metrics["heldout/log_loss"]
    labels = {r["pm"] for r in read_metrics(tmp_path / "par/metrics.jsonl")}
    assert labels == {"pm/member-0", "pm/member-1", "pm/member-2", "test_pm"}
    with pytest.raises(ConfigError, match=r"parallel_pms \(2\) needs disable_dropout"):
        run(dataclasses.replace(cfg, parallel_pms=2, disable_dropout=False))


def test_warm_start_from_an_earlier_pm(tmp_path, trained_pm, tiny_gpt2, synthetic_path):
    _, earlier = trained_pm
    fresh = write_jsonl(tmp_path / "more.jsonl", synthetic_preferences(80, seed=7))
    result = run(_config(tiny_gpt2, fresh, tmp_path / "warm", warm_start_path=earlier.outputs["pm"],
                         max_steps=1, learning_rate=1e-6))
    # one tiny step: the PM still knows the preference it learned before
    assert result.metrics["heldout/accuracy"] >= 0.9
    spec = json.loads((tmp_path / "warm/pm/ratchet_pm.json").read_text())
    assert spec["warm_start"] == str(Path(earlier.outputs["pm"]).resolve())


def test_hh_rlhf_sample_end_to_end(tmp_path, tiny_gpt2, hh_path):
    result = run(_config(tiny_gpt2, hh_path, tmp_path / "hh", max_steps=3, batch_size=4, max_length=256, heldout_fraction=0.25))
    m = result.metrics
    assert m["data/train_comparisons"] + m["data/validation_comparisons"] + m["data/heldout_comparisons"] == 160
    assert m["heldout/count"] > 20 and 0.0 <= m["heldout/accuracy"] <= 1.0
    assert 0.0 <= m["heldout/ece"] <= 1.0 and len(m["heldout/reliability"]) == 10
    assert m["heldout/accuracy_by_source"]["hh-harmless-base"]["count"] == m["heldout/count"]
    assert m["data/truncated_prompts"] > 0  # long dialogues keep their end
    # packing shares the prompt: far fewer tokens than two full sequences per comparison
    assert m["perf/tokens_per_s"] > 0


def test_does_not_change_the_callers_config(tmp_path, tiny_gpt2, synthetic_path):
    cfg = _config(tiny_gpt2, synthetic_path, tmp_path / "o", max_steps=1)
    before = dataclasses.asdict(cfg)
    run(cfg)
    assert dataclasses.asdict(cfg) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 3  # type: ignore[misc]


# -- bad inputs ---------------------------------------------------------------------


def test_missing_model_directory(tmp_path, synthetic_path):
    with pytest.raises(WorkerError, match=r"base model directory .*nope does not exist"):
        run(_config(tmp_path / "nope", synthetic_path, tmp_path / "o"))


def test_model_directory_with_pickle_weights_only(tmp_path, tiny_gpt2, synthetic_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_gpt2, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not even a pickle")  # never opened
    with pytest.raises(WorkerError, match=r"pickle format \(pytorch_model.bin\).*safetensors weights only"):
        run(_config(pickled, synthetic_path, tmp_path / "o"))


def test_empty_dataset(tmp_path, tiny_gpt2):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(WorkerError, match="is empty: there is nothing to train on"):
        run(_config(tiny_gpt2, empty, tmp_path / "o"))


def test_dataset_of_one_class_only(tmp_path, tiny_gpt2):
    ties = write_jsonl(tmp_path / "ties.jsonl", [comparison(f"q{i}", " x", " y", "tie") for i in range(30)])
    with pytest.raises(WorkerError, match=r"all ties \(\d+ of them\): one class only"):
        run(_config(tiny_gpt2, ties, tmp_path / "o"))


def test_bad_records_name_their_line(tmp_path, tiny_gpt2):
    bad = write_jsonl(tmp_path / "bad.jsonl", [comparison("q", " x", " y", "a"), comparison("q", " x", " y", "c")])
    with pytest.raises(WorkerError, match=r"line 2: choice 'c' must be one of a, b, tie"):
        run(_config(tiny_gpt2, bad, tmp_path / "o"))
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "q", "response_a": " x", "choice": "a"}])
    with pytest.raises(WorkerError, match=r"line 1: missing field 'response_b'"):
        run(_config(tiny_gpt2, missing, tmp_path / "o"))


def test_heldout_split_that_selects_nothing(tmp_path, tiny_gpt2):
    few = write_jsonl(tmp_path / "few.jsonl", synthetic_preferences(3))
    with pytest.raises(WorkerError, match=r"held-out split is empty: 3 comparison\(s\)"):
        run(_config(tiny_gpt2, few, tmp_path / "o", heldout_fraction=0.01))


def test_config_validation_names_the_values(tmp_path, tiny_gpt2, synthetic_path):
    with pytest.raises(ConfigError, match=r"batch_size \(12\) must be divisible by micro_batch_size \(5\)"):
        run(_config(tiny_gpt2, synthetic_path, tmp_path / "o", batch_size=12, micro_batch_size=5))
    with pytest.raises(ConfigError, match=r"max_length \(4096\) exceeds the model's 512 position embeddings"):
        run(_config(tiny_gpt2, synthetic_path, tmp_path / "o", max_length=4096))
    with pytest.raises(ConfigError, match=r"heldout_fraction \(1.5\) must be in \[0, 1\)"):
        run(_config(tiny_gpt2, synthetic_path, tmp_path / "o", heldout_fraction=1.5))
    with pytest.raises(ConfigError, match=r"ensemble_size \(0\) must be >= 1"):
        run(_config(tiny_gpt2, synthetic_path, tmp_path / "o", ensemble_size=0))
    with pytest.raises(WorkerError, match=r"select_by val_loss has no validation comparisons"):
        run(_config(tiny_gpt2, synthetic_path, tmp_path / "o", validation_fraction=0.0))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device \('cuda'\) asks for CUDA, but torch sees no CUDA device"):
            run(_config(tiny_gpt2, synthetic_path, tmp_path / "o", device="cuda"))
