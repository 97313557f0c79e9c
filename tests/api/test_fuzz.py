"""Fuzz the OpenAPI schema with schemathesis against the real app and PostgreSQL.

Every operation is one test: the schema's boundary cases (schemathesis's
coverage phase) and ``MAX_EXAMPLES`` generated requests, valid and invalid,
sent with an admin key to the real app on a PostgreSQL store seeded with one
row of everything, so 200 answers are reached as well as the 4xx ones. Every
answer must be no 5xx, a status code the operation declares, the declared
content type, and a body that matches the declared schema.

The run is bounded and deterministic (derandomized, fixed seed, no example
database): CI sends the same ~1,200 requests every time (~840 coverage cases,
the rest generated), in about 25 s on two cores. The inputs that broke the app once are
kept below as plain tests, since a bounded run cannot promise to draw them
again.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from api.errors import ErrorResponse
from api.schemas.feedback import ImportResult
from store.artifacts import ArtifactStore
from store.cycles import finish_stage, open_cycle, start_stage
from store.datasets import snapshot_comparisons
from store.db import Database
from store.deployments import deploy
from store.keys import create_api_key
from store.settings import Settings
from store.tasks import create_tasks
from tests import builders
from tests.api.conftest import batch_body, bearer, comparison

MAX_EXAMPLES = 15
"""generated requests per operation, on top of the coverage phase's boundary cases"""
SEED = 20261123
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

# --- JSON Lines bodies for POST /v1/feedback-batches/import ------------------------


@st.composite
def _pair_line(draw) -> bytes:
    """A preference pair in either format (it may still be refused: empty, identical, not Unicode)."""
    prompt = draw(st.text(min_size=1, max_size=20))
    chosen, rejected = draw(st.text(max_size=20)), draw(st.text(max_size=20))
    trl = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    dialogue = f"\n\nHuman: {prompt}\n\nAssistant: "
    hh = {"chosen": dialogue + chosen, "rejected": dialogue + rejected}
    return json.dumps(draw(st.sampled_from([trl, hh]))).encode()


_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=6,
)
_noise_line = st.one_of(_json_value.map(lambda v: json.dumps(v).encode()), st.binary(max_size=40), st.just(b""))


@st.composite
def jsonl_bodies(draw) -> bytes:
    """Import bodies: mostly preference pairs, some stray JSON, raw bytes and blank lines;
    sometimes gzipped, sometimes gzipped and cut short."""
    lines = draw(st.lists(_pair_line(), max_size=4)) + draw(st.lists(_noise_line, max_size=2))
    body = b"\n".join(draw(st.permutations(lines)))
    encoding = draw(st.sampled_from(["plain", "plain", "gzip", "gzip-truncated"]))
    if encoding != "plain":
        body = gzip.compress(body, mtime=0)
    if encoding == "gzip-truncated":
        body = body[: draw(st.integers(0, len(body) - 1))]
    return body


schemathesis.openapi.media_type("application/jsonl", jsonl_bodies(), aliases=["application/x-ndjson"])

# --- the schema, and the app it is run against --------------------------------------


def _openapi() -> dict:
    """The app's OpenAPI document (building it opens no database connection)."""
    unused = Database(f"sqlite:///{Path(tempfile.gettempdir()) / 'ratchet-openapi-only.db'}")
    app = create_app(Settings(), database=unused, artifacts=ArtifactStore("memory://ratchet-openapi-only"))
    return app.openapi()


schema = schemathesis.openapi.from_dict(
    _openapi(),
    config=schemathesis.Config.from_dict(
        {"seed": SEED, "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"}}
    ),
)

SEEDED = {
    "batch_id": [1, 2], "dataset_id": [1], "pm_id": [1], "policy_id": [1, 2], "cycle_id": [1], "name": ["vendor-x"]
}
"""What ``_seed`` writes on a fresh store (ids restart at 1): the rows path parameters may name."""


@schema.hook
def flatmap_path_parameters(ctx, path_parameters: dict | None) -> st.SearchStrategy:
    """Half the time, name a seeded row, so that 200 answers are reached as well as 404s."""
    seeded = {name: st.sampled_from(SEEDED[name]) for name in path_parameters or () if name in SEEDED}
    if not seeded:
        return st.just(path_parameters)
    drawn = {name: st.just(value) for name, value in path_parameters.items()}
    return st.just(path_parameters) | st.fixed_dictionaries(drawn | seeded)


TEXTS = ("prompt", "response_a", "response_b", "rater_id")


def _registrable(batch: dict) -> dict:
    """``batch`` with what random data almost never gets right made right: no NUL in its texts,
    a prompt and a rater that are not blank, a tie for identical responses, and no task id
    (no task is open under a random one)."""

    def repaired(c: dict) -> dict:
        c = c | {name: c[name].replace("\x00", "") for name in TEXTS} | {"task_id": None}
        c |= {"prompt": "Q" + c["prompt"], "rater_id": "r" + c["rater_id"][:199]}
        if c["response_a"] == c["response_b"]:
            c["choice"] = "tie"
        return c

    source = "s" + str(batch.get("source", "")).replace("\x00", "")[:199]
    return batch | {"source": source, "comparisons": [repaired(c) for c in batch["comparisons"]]}


@schema.hook
def flatmap_body(ctx, body):
    """Half the registered batches are repaired as ``_registrable`` says, so that 201 is reached
    too; their texts stay the fuzzer's (any Unicode, through PostgreSQL and back)."""
    comparisons = body.get("comparisons") if isinstance(body, dict) else None
    if ctx.operation.label != "POST /v1/feedback-batches" or not (
        isinstance(comparisons, list)
        and all(isinstance(c, dict) and all(isinstance(c.get(name), str) for name in TEXTS) for c in comparisons)
    ):
        return st.just(body)
    return st.sampled_from([body, _registrable(body)])


def _seed(database, artifacts) -> dict[str, list]:
    """One row of everything the API reads, and the ids (and key names) of those rows."""
    with database.session() as s:
        cycle, _ = open_cycle(s, week="2026-W47", params={"pairs": 8})
        start_stage(s, cycle_id=cycle.id, stage="snapshot")
        finish_stage(s, cycle_id=cycle.id, stage="snapshot", outputs={"dataset_id": 1}, compute_s=0.5)
        batches = [builders.batch(s, 3), builders.batch(s, 2, start=3, source="vendor-y")]
        dataset, _ = snapshot_comparisons(s, artifacts=artifacts, batch_ids=[b.id for b in batches], cycle_id=cycle.id)
        pm = builders.pm(s, dataset_id=dataset.id)
        p0 = builders.policy(s)
        p1 = builders.policy(s, init_policy_id=p0.id, reference_policy_id=p0.id, pm_id=pm.id, cycle_id=cycle.id)
        deploy(s, policy_id=p0.id, actor="seed")
        deploy(s, policy_id=p1.id, actor="seed", cycle_id=cycle.id)  # so a rollback has somewhere to go
        tasks = [{"prompt": f"Human: q{i}?\n\nAssistant:", "response_a": " yes", "response_b": " no"} for i in range(3)]
        create_tasks(s, tasks=tasks, cycle_id=cycle.id)
        create_api_key(s, name="vendor-x", role="labeler")
        return {
            "batch_id": [b.id for b in batches],
            "dataset_id": [dataset.id],
            "pm_id": [pm.id],
            "policy_id": [p0.id, p1.id],
            "cycle_id": [cycle.id],
            "name": ["vendor-x"],
        }


def _cycle_launcher(database):
    """The orchestrator's embedded launcher with its flow replaced by nothing: triggers, cancels and re-runs
    go through the store as the API server's do, and no flow runs (without a launcher POST /v1/cycles and
    the re-run could only answer 503)."""
    from orchestrator.launcher import ThreadLauncher
    from orchestrator.settings import CycleSettings

    return ThreadLauncher(database, CycleSettings(), run=lambda **kw: None)


@pytest.fixture
def fuzz_target(pg_db, artifacts, api_settings, role) -> tuple:
    """The real app on a seeded PostgreSQL store, and the headers of a key with ``role``."""
    with pg_db.session() as s:
        token = create_api_key(s, name=f"fuzz-{role}", role=role)[1]
    assert _seed(pg_db, artifacts) == SEEDED
    app = create_app(api_settings, database=pg_db, artifacts=artifacts, cycle_launcher=_cycle_launcher(pg_db))
    return app, bearer(token)


FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)


@schema.parametrize()
# The key's role: admin reaches every operation. As a parameter it also gives each operation
# its own test id (schemathesis 4.32's items share one under pytest 9.2 otherwise).
@pytest.mark.parametrize("role", ["admin"])
@FUZZ_SETTINGS
def test_no_server_error_and_every_answer_matches_the_schema(case, fuzz_target):
    app, headers = fuzz_target
    case.call_and_validate(app=app, headers=dict(headers), checks=CHECKS)


@pytest.fixture
def copy_path_target(fuzz_target, pg_db, artifacts, api_settings) -> tuple:
    """The same store and key, on an app that sends every batch the COPY way (the run above
    registers small batches from the event loop, as a real server does)."""
    app = create_app(api_settings.model_copy(update={"inline_batch_bytes": 0}), database=pg_db, artifacts=artifacts)
    return app, fuzz_target[1]


@schema.include(method="POST", path="/v1/feedback-batches").parametrize()
@pytest.mark.parametrize("role", ["admin"])
@FUZZ_SETTINGS
def test_the_copy_write_path_under_the_same_fuzzing(case, copy_path_target):
    app, headers = copy_path_target
    assert app.state.settings.inline_batch_bytes == 0
    case.call_and_validate(app=app, headers=dict(headers), checks=CHECKS)


# --- inputs that broke the app ------------------------------------------------------
# Found by this run (bodies FastAPI cannot decode) or by probing next to what it found.
# Kept as plain tests: a bounded run cannot promise to draw them again.

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    "method, url, body, field",
    [
        # PostgreSQL text cannot hold a NUL: the driver raised, a 500
        pytest.param("GET", "/v1/deployments?name=a%00b", None, "name", id="nul-deployments-name"),
        pytest.param("GET", "/v1/deployments/active?name=a%00b", None, "name", id="nul-active-name"),
        pytest.param("POST", "/v1/api-keys/a%00b/revoke", None, "name", id="nul-key-name"),
        pytest.param("POST", "/v1/deployments/rollback", json.dumps({"reason": "a\x00b"}), "reason", id="nul-rollback-reason"),
        pytest.param("POST", "/v1/feedback-batches", json.dumps(batch_body(1, source="a\x00b")), "source", id="nul-batch-source"),
        # NaN and Infinity are not JSON: PostgreSQL refused the row, a 500
        pytest.param(
            "POST", "/v1/feedback-batches", json.dumps(batch_body(1, metadata={"loss": float("nan")})), "metadata",
            id="nan-batch-metadata",
        ),
        pytest.param(
            "POST", "/v1/feedback-batches", json.dumps(batch_body(1) | {"comparisons": [comparison(0, metadata={"x": 1e999})]}),
            "metadata", id="infinity-comparison-metadata",
        ),
        pytest.param("POST", "/v1/cycles", '{"params": {"lr": Infinity}}', "params", id="infinity-cycle-params"),
        # a lone surrogate was stored, then every read of the cycle failed to encode it, a 500
        pytest.param("POST", "/v1/cycles", '{"params": {"note": "\\ud800"}}', "params", id="surrogate-cycle-params"),
        # bodies FastAPI cannot decode were an undeclared 400
        pytest.param("POST", "/v1/cycles", b'{"week": "\xff"}', "(body)", id="not-utf8"),
        pytest.param("POST", "/v1/deployments/rollback", b"[" * 5000, "(body)", id="nested-too-deep"),
        pytest.param("POST", "/v1/api-keys", '{"name": %s}' % ("9" * 5000), "(body)", id="integer-too-long"),
    ],
)
def test_inputs_that_broke_the_app_are_invalid_input(client, keys, method, url, body, field):
    r = client.request(method, url, content=body, headers=keys.admin | (JSON if body else {}))
    assert r.status_code == 422, r.text
    assert field in [e["field"] for e in r.json()["errors"]], r.text


def test_import_refuses_a_nul_in_its_source(client, keys):
    r = client.post(
        "/v1/feedback-batches/import?format=trl&rater_id=r&source=a%00b",
        content=b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n',
        headers=keys.labeler | {"Content-Type": "application/jsonl"},
    )
    assert r.status_code == 422
    assert [e["field"] for e in r.json()["errors"]] == ["source"]


# --- the import route under hostile bodies ---------------------------------------------
# The schema run above sends small JSON Lines bodies; these are the ones a hostile client
# sends: nesting deeper than the decoder's recursion limit, texts over the 200,000-character
# limit, lines too long to buffer, gzip bombs, gzip that is cut short or corrupted, random
# bytes. Whatever the body, the answer is a 2xx with an ImportResult or a 4xx with the
# documented error body: never a 500.

_nested_line = st.sampled_from([10, 1_000, 10_000, 100_000]).map(lambda depth: b"[" * depth + b"]" * depth) | (
    st.sampled_from([1_000, 50_000]).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth)
)
_long_line = st.sampled_from([199_999, 200_001, 1_000_000]).flatmap(
    lambda n: st.sampled_from([
        {"prompt": "p", "chosen": "x" * n, "rejected": "y"},
        {"prompt": "p" * n, "chosen": "x", "rejected": "y"},
        {"chosen": "\n\nHuman: q\n\nAssistant: " + "x" * n, "rejected": "\n\nHuman: q\n\nAssistant: y"},
    ])
).map(lambda record: json.dumps(record).encode())
_hostile_line = st.one_of(_pair_line(), _noise_line, _nested_line, _long_line, st.binary(min_size=1, max_size=200))


@st.composite
def hostile_import_bodies(draw) -> tuple[bytes, dict]:
    """(body, extra headers): JSON Lines of hostile lines, plain or gzip in several states of repair."""
    body = b"\n".join(draw(st.lists(_hostile_line, min_size=1, max_size=5)))
    encoding = draw(st.sampled_from(["plain", "gzip", "gzip", "gzip-truncated", "gzip-corrupt", "gzip-bomb", "random"]))
    if encoding == "random":
        body = draw(st.binary(min_size=1, max_size=2_000))
    elif encoding == "gzip-bomb":
        body = gzip.compress(b"\n" * draw(st.sampled_from([9_000_000, 64_000_000])), compresslevel=9)
    elif encoding != "plain":
        body = gzip.compress(body, mtime=0)
        if encoding == "gzip-truncated":
            body = body[: draw(st.integers(2, len(body) - 1))]
        elif encoding == "gzip-corrupt":
            at = draw(st.integers(10, len(body) - 1))
            body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]
    declared = draw(st.booleans()) and encoding.startswith("gzip")
    return body, ({"Content-Encoding": "gzip"} if declared else {})


@given(case=hostile_import_bodies(), fmt=st.sampled_from(["trl", "hh-rlhf"]), strict=st.booleans())
@settings(
    max_examples=40, derandomize=True, database=None, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
def test_the_import_route_never_answers_500(client, keys, case, fmt, strict):
    body, headers = case
    r = client.post(
        f"/v1/feedback-batches/import?format={fmt}&strict={str(strict).lower()}", content=body,
        headers=keys.labeler | {"Content-Type": "application/jsonl"} | headers,
    )
    assert r.status_code in (200, 201, 413, 422), r.text
    if r.status_code < 300:
        result = ImportResult.model_validate(r.json())
        assert result.imported >= 1
    else:
        error = ErrorResponse.model_validate(r.json())
        assert error.detail
