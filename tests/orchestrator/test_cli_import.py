"""``ratchet feedback import`` (the API import route's code, from a file) and the CLI's one-line errors, on SQLite."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from orchestrator.cli import app as cli_app
from store.db import Database
from store.models import Comparison, FeedbackBatch
from store.settings import get_settings

HH_SAMPLE = Path(__file__).parents[1] / "data" / "hh-rlhf" / "harmless-base-test.first1000.jsonl.gz"
GOOD = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}


@pytest.fixture
def store(tmp_path, monkeypatch, sqlite_template) -> Database:
    """A migrated SQLite store that the CLI is configured to use."""
    path = tmp_path / "ratchet.db"
    shutil.copy(sqlite_template, path)
    monkeypatch.setenv("RATCHET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RATCHET_DATABASE_URL", f"sqlite:///{path}")
    get_settings.cache_clear()
    database = Database(f"sqlite:///{path}")
    yield database
    database.dispose()
    get_settings.cache_clear()


def _ratchet(*args: str):
    return CliRunner().invoke(cli_app, list(args))


def _rows(db: Database) -> tuple[int, int]:
    with db.session() as s:
        return (s.scalar(select(func.count()).select_from(FeedbackBatch)),
                s.scalar(select(func.count()).select_from(Comparison)))


def _write(path: Path, lines: list) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


# -- ratchet feedback import ----------------------------------------------------------------------------


def test_the_hh_sample_imports_through_the_cli_as_one_batch(store):
    result = _ratchet("feedback", "import", str(HH_SAMPLE), "--format", "hh-rlhf", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert (answer["imported"], answer["skipped"], answer["skipped_lines"]) == (1000, 0, [])
    assert answer["batch"]["source"] == "import:hh-rlhf" and answer["batch"]["comparison_count"] == 1000
    assert _rows(store) == (1, 1000)
    originals = [json.loads(line) for line in gzip.decompress(HH_SAMPLE.read_bytes()).decode().splitlines()]
    with store.session() as s:
        first = s.scalars(select(Comparison).order_by(Comparison.position)).first()
        batch = s.get(FeedbackBatch, answer["batch"]["id"])
        assert (first.prompt + first.response_a, first.prompt + first.response_b, first.choice, first.rater_id) == (
            originals[0]["chosen"], originals[0]["rejected"], "a", "import:hh-rlhf")
        assert batch.meta["import_format"] == "hh-rlhf" and batch.meta["imported"] == 1000
        assert batch.api_key_id is None  # the API's import records the key that posted it; the CLI has none


def test_a_bad_line_is_named_and_the_rest_imported_as_the_route_does(store, tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [GOOD, "{not json", {"chosen": "no assistant turn", "rejected": "x"}, GOOD])
    result = _ratchet("feedback", "import", path, "--source", "vendor-a", "--rater-id", "r7")
    assert result.exit_code == 0, result.output
    assert "skipped line 2: invalid JSON" in result.stderr
    assert "skipped line 3: chosen has no Assistant turn" in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(
        f"imported 2 comparison(s) from {path} as feedback batch ")
    assert "(source 'vendor-a', rater 'r7'); 2 line(s) skipped" in result.stdout
    assert _rows(store) == (1, 2)
    with store.session() as s:
        batch = s.scalars(select(FeedbackBatch)).one()
        assert batch.meta["skipped_lines"] == [
            {"line": 2, "reason": "invalid JSON: Expecting property name enclosed in double quotes at column 2"},
            {"line": 3, "reason": "chosen has no Assistant turn ('\\n\\nAssistant:')"}]
        assert set(s.scalars(select(Comparison.rater_id))) == {"r7"}


def test_strict_mode_or_a_file_with_no_usable_line_writes_nothing_and_names_the_lines(store, tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [GOOD, "{not json"])
    strict = _ratchet("feedback", "import", path, "--strict")
    assert strict.exit_code == 2, strict.output
    assert strict.stderr.splitlines() == [
        "error: 1 line(s) could not be imported (strict mode): nothing was written",
        "  line 2: invalid JSON: Expecting property name enclosed in double quotes at column 2",
    ]
    nothing = _ratchet("feedback", "import", _write(tmp_path / "trl.jsonl", [GOOD]), "--format", "trl")
    assert nothing.exit_code == 2
    assert nothing.stderr.splitlines() == ["error: no line could be imported (1 skipped)",
                                           "  line 1: field 'prompt' is missing"]
    assert _rows(store) == (0, 0)


def test_the_same_file_under_an_idempotency_key_imports_once(store, tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [GOOD, "oops"])
    first = _ratchet("feedback", "import", path, "--idempotency-key", "vendor-a-week-48")
    again = _ratchet("feedback", "import", path, "--idempotency-key", "vendor-a-week-48")
    assert (first.exit_code, again.exit_code) == (0, 0), again.output
    assert "imported under idempotency key 'vendor-a-week-48' already: nothing written" in " ".join(again.stderr.split())
    assert "skipped line 2: invalid JSON" in again.stderr  # the first import's skipped lines, kept with its batch
    assert first.stdout.split("(source")[0] == again.stdout.split("(source")[0]
    other = _ratchet("feedback", "import", _write(tmp_path / "other.jsonl", [GOOD]), "--idempotency-key", "vendor-a-week-48")
    assert other.exit_code == 2 and other.stderr.startswith("error: idempotency key")
    assert _rows(store) == (1, 1)


def test_a_corrupt_gzip_file_is_one_line_and_writes_nothing(store, tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(HH_SAMPLE.read_bytes()[:5000])
    result = _ratchet("feedback", "import", str(path))
    assert result.exit_code == 2
    assert result.stderr == f"error: {path} could not be read: gzip stream is truncated; nothing was written\n"
    assert _rows(store) == (0, 0)


# -- errors: one line on stderr, exit code 2 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["feedback", "import", "{tmp}/nowhere.jsonl"], "error: cannot read {tmp}/nowhere.jsonl: No such file or directory"),
        (["feedback", "import", "{tmp}"], "error: cannot read {tmp}: Is a directory"),
        (["prompts", "add", "{tmp}/nowhere.jsonl"], "error: prompt set {tmp}/nowhere.jsonl does not exist"),
        (["cycle", "show", "--week", "2026-W10"], "error: there is no cycle for week 2026-W10"),
        (["cycle", "show", "--week", "2026-W99"], "error: --week '2026-W99' does not exist: ISO year 2026 has 53 weeks (W01 to W53)"),
        (["cycle", "defaults", "--params", "{nope"],
         "error: --params is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        (["cycle", "defaults", "--param", "sample"],
         "error: --param 'sample' is not of the form key=value (dotted keys for sections: ppo.config.learning_rate=1e-4)"),
        (["keys", "revoke", "--name", "nobody"], "error: no API key named 'nobody'"),
        (["deploy", "rollback", "--target", "nowhere"], None),
    ],
)
def test_bad_input_is_one_line_on_stderr_with_exit_code_2(store, tmp_path, args, message):
    result = _ratchet(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    if message is not None:
        assert lines[0] == message.replace("{tmp}", str(tmp_path))


def test_invalid_settings_name_each_bad_field_under_the_line(store):
    result = _ratchet("cycle", "defaults", "--param", "sample.config.num_samples=1", "--param", "gather.nope=3")
    assert result.exit_code == 2
    error, *details = result.stderr.splitlines()
    assert error.startswith("error: invalid cycle params")
    assert any(d.startswith("  params.sample.config.num_samples: num_samples (1) must be >= 2") for d in details)
    assert any(d.startswith("  params.gather.nope:") for d in details)


def test_a_bug_keeps_its_traceback(store, monkeypatch):
    import store.keys

    def broken(session, *, name):
        raise KeyError(name)

    monkeypatch.setattr(store.keys, "revoke_api_key", broken)
    result = _ratchet("keys", "revoke", "--name", "x")
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)
