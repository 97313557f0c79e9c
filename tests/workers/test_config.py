"""Step configs: JSON + key=value overrides, coercion, errors naming fields, docs, the command line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.common.config import ConfigError, cli, coerce, field_docs, load_config, parse_overrides, usage
from workers.sample import SampleConfig
from workers.sample import main as sample_main
from workers.train_pm import TrainPMConfig
from workers.train_pm import main as train_pm_main

REPO = Path(__file__).resolve().parents[2]
STEP_CONFIGS = [SampleConfig, TrainPMConfig]


@pytest.mark.parametrize("cls", STEP_CONFIGS)
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert undocumented == []
    assert "--config" in usage(cls, "workers.x", "A step.")


def test_json_file_and_overrides_are_coerced(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model_path": "m", "dataset_path": "d", "output_dir": "o", "batch_size": 8}))
    cfg = load_config(
        TrainPMConfig,
        path,
        ["learning_rate=3e-4", "max_steps=10", "two_pms=true", "max_grad_norm=null", "lr_schedule=cosine", "micro_batch_size=4"],
    )
    assert (cfg.batch_size, cfg.learning_rate, cfg.max_steps, cfg.two_pms) == (8, 3e-4, 10, True)
    assert cfg.max_grad_norm is None and cfg.lr_schedule == "cosine" and cfg.micro_batch_size == 4
    # a saved ratchet_step_config.json loads as it is
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"step": "train_pm", "config": dataclasses.asdict(cfg)}))
    assert load_config(TrainPMConfig, saved) == cfg


def test_dict_fields_from_json_and_overrides():
    cfg = load_config(SampleConfig, None, ['policies={"v1": "/m/a", "v2": "/m/b"}', "prompts_path=p", "output_dir=o", "top_p=0.9"])
    assert cfg.policies == {"v1": "/m/a", "v2": "/m/b"} and list(cfg.policies) == ["v1", "v2"]
    assert cfg.top_p == 0.9


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["batch_size=ten"], r"batch_size: expected an integer, got 'ten'"),
        (["learning_rate=fast"], r"learning_rate: expected a number, got 'fast'"),
        (["two_pms=maybe"], r"two_pms: expected a boolean, got 'maybe'"),
        (["lr_schedule=step"], r"lr_schedule: expected one of 'constant', 'linear', 'cosine', got 'step'"),
        (["batch_sise=3"], r"has no field 'batch_sise'"),
        (["batch_size"], r"not of the form key=value"),
        (["batch_size=12", "micro_batch_size=5"], r"batch_size \(12\) must be divisible by micro_batch_size \(5\)"),
        (["batch_size=0"], r"batch_size \(0\) must be >= 1"),
    ],
)
def test_errors_name_the_field_and_value(overrides, message):
    required = ["model_path=m", "dataset_path=d", "output_dir=o"]
    with pytest.raises(ConfigError, match=message):
        load_config(TrainPMConfig, None, required + overrides)


def test_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing required field\\(s\\) dataset_path, output_dir"):
        load_config(TrainPMConfig, None, ["model_path=m"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_path": "m", "batch_size": "8"')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(TrainPMConfig, bad)
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps({"model_path": "m", "dataset_path": "d", "output_dir": "o", "batch_size": True}))
    with pytest.raises(ConfigError, match="batch_size: expected an integer, got True"):
        load_config(TrainPMConfig, typed)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_path": "m", "dataset_path": "d", "output_dir": "o", "lr": 1}))
    with pytest.raises(ConfigError, match="unknown field\\(s\\) lr for TrainPMConfig"):
        load_config(TrainPMConfig, unknown)
    with pytest.raises(ConfigError, match="config file .*nowhere.json does not exist"):
        load_config(TrainPMConfig, tmp_path / "nowhere.json")


def test_coerce_unions_and_lists():
    assert coerce("none", int | None, "x", from_text=True) is None
    assert coerce("7", int | None, "x", from_text=True) == 7
    assert coerce("a,b", list[str], "x", from_text=True) == ["a", "b"]
    assert coerce([1, 2.0], list[float], "x") == [1.0, 2.0]
    with pytest.raises(ConfigError, match=r"x\[1\]: expected an integer, got 'b'"):
        coerce([1, "b"], list[int], "x")
    assert parse_overrides(SampleConfig, ["num-samples=2"]) == {"num_samples": 2}


def test_cli_prints_the_result_as_json(tmp_path, capsys, tiny_gpt2, synthetic_path):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"model_path": str(tiny_gpt2), "dataset_path": str(synthetic_path),
                                  "output_dir": str(tmp_path / "o"), "max_length": 64, "progress": False}))
    assert train_pm_main(["--config", str(config), "max_steps=2", "batch_size=4", "learning_rate=1e-3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == "train_pm" and result["complete"] is True
    assert "pm/model.safetensors" in result["files"] and "heldout/accuracy" in result["metrics"]


def test_cli_errors_and_help(tmp_path, capsys):
    assert sample_main(["--config", str(tmp_path / "missing.json")]) == 2
    assert "config file" in capsys.readouterr().err
    config = tmp_path / "s.json"
    config.write_text(json.dumps({"policies": {"v1": str(tmp_path / "nope")}, "prompts_path": "p", "output_dir": "o"}))
    assert sample_main(["--config", str(config)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert sample_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "num_samples (an integer) = 4" in out and "responses per prompt and policy (K)" in out
    assert cli(SampleConfig, lambda c: c, ["--config"], prog="x", description="d") == 2


def test_python_dash_m_entry_point(tmp_path, tiny_gpt2, prompts_path):
    config = tmp_path / "sample.json"
    config.write_text(json.dumps({"policies": {"v1": str(tiny_gpt2)}, "prompts_path": str(prompts_path),
                                  "output_dir": str(tmp_path / "out")}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "workers.sample", "--config", str(config), "num_samples=1", "max_new_tokens=4", "progress=false"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["metrics"]["samples/responses"] == 8
    assert Path(result["outputs"]["samples"]).is_file()
