"""Registering a real deployment's starting point: a prompt set and P0."""

import json

import pytest
from typer.testing import CliRunner

from orchestrator.bootstrap import check_prompt_set, register_policy, register_prompt_set
from store.deployments import active_deployment
from store.errors import InvalidInput, NotFound


def prompts_file(tmp_path, lines) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def model_dir(tmp_path, weights: str = "model.safetensors"):
    path = tmp_path / "sft-model"
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "gpt2"}')
    (path / weights).write_bytes(b"\x00" * 16)
    return path


def test_a_prompt_set_is_registered_once(db, artifacts, tmp_path):
    path = prompts_file(tmp_path, [{"id": 1, "prompt": "Hi?"}, {"id": "b", "prompt": "How?"}])
    first, created = register_prompt_set(db, artifacts, path)
    again, created_again = register_prompt_set(db, artifacts, path)
    assert created and not created_again and again.id == first.id
    assert (first.kind, first.row_count, first.version) == ("prompts", 2, 1)


def test_bad_prompt_lines_are_all_named(db, artifacts, tmp_path):
    path = prompts_file(tmp_path, [{"id": 1, "prompt": "ok"}, "{oops", {"id": 1, "prompt": " "}, {"prompt": "x"}])
    with pytest.raises(InvalidInput) as info:
        register_prompt_set(db, artifacts, path)
    assert [(e["index"], e["field"]) for e in info.value.errors] == [(2, "line"), (3, "id"), (3, "prompt"), (4, "id")]


def test_a_policy_is_registered_and_deployed(db, artifacts, tmp_path):
    policy, deployment = register_policy(db, artifacts, model_dir(tmp_path), deploy_to="default")
    assert (policy.name, policy.version, policy.init_policy_id) == ("policy", 1, None)
    with db.session() as s:
        assert active_deployment(s).policy_id == policy.id


def test_pickle_only_and_missing_models_are_refused(db, artifacts, tmp_path):
    with pytest.raises(InvalidInput, match="pytorch_model.bin: convert them to safetensors"):
        register_policy(db, artifacts, model_dir(tmp_path, "pytorch_model.bin"))
    with pytest.raises(NotFound):
        register_policy(db, artifacts, tmp_path / "nowhere")


def test_the_cli_commands(tmp_path, monkeypatch):
    from orchestrator.cli import app
    from store.settings import get_settings

    monkeypatch.setenv("RATCHET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RATCHET_DATABASE_URL", raising=False)
    monkeypatch.delenv("RATCHET_ARTIFACTS_URL", raising=False)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
        out = runner.invoke(app, ["prompts", "add", prompts_file(tmp_path, [{"id": 1, "prompt": "Hi?"}])])
        assert out.exit_code == 0 and "registered prompts v1 (1 prompts" in out.output
        out = runner.invoke(app, ["policy", "add", str(model_dir(tmp_path)), "--deploy", "default"])
        assert out.exit_code == 0 and "deployed on default v1" in out.output, out.output
        bad = runner.invoke(app, ["prompts", "add", prompts_file(tmp_path, ["{oops"])])
        assert bad.exit_code == 2 and "  line 1: invalid JSON" in bad.stderr
    finally:
        get_settings.cache_clear()


def test_a_prompt_set_may_hold_chat_prompts_and_a_bad_message_is_named():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    lines = [{"id": 1, "messages": chat}, {"id": 2, "prompt": "\n\nHuman: Hi\n\nAssistant:"},
             {"id": 3, "prompt": "Hi", "messages": chat}]
    assert check_prompt_set("\n".join(json.dumps(x) for x in lines).encode(), source="p.jsonl") == 3
    bad = [{"id": 1, "messages": [{"role": "bot", "content": "x"}]}, {"id": 2, "messages": chat, "prompt": 7}]
    with pytest.raises(InvalidInput) as err:
        check_prompt_set("\n".join(json.dumps(x) for x in bad).encode(), source="p.jsonl")
    assert [(p["index"], p["field"]) for p in err.value.errors] == [(1, "messages"), (2, "prompt")]
    assert "messages[0].role 'bot'" in err.value.errors[0]["message"]
