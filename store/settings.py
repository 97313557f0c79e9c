"""Settings from ``RATCHET_*`` environment variables.

``RATCHET_HOME`` (default ``./.ratchet``) holds the embedded SQLite file, the
local artifacts and Prefect's home for a first run; ``RATCHET_DATABASE_URL``
and ``RATCHET_ARTIFACTS_URL`` point elsewhere in production.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from store.errors import InvalidInput


class ScalePoint(BaseModel):
    """One point of the comparison page's preference scale: what the rater reads and what it registers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(min_length=1, max_length=100)
    """what its button says (e.g. A slightly better)"""
    choice: Literal["a", "b", "tie"]
    """the comparison's choice"""
    strength: float = Field(ge=0, allow_inf_nan=False)
    """the comparison's strength: 0 for a tie, above 0 for A or B (``store.feedback.MAX_STRENGTH`` at most)"""


DEFAULT_LABEL_SCALE = (
    ScalePoint(label="A much better", choice="a", strength=3),
    ScalePoint(label="A better", choice="a", strength=2),
    ScalePoint(label="A slightly better", choice="a", strength=1),
    ScalePoint(label="About the same", choice="tie", strength=0),
    ScalePoint(label="B slightly better", choice="b", strength=1),
    ScalePoint(label="B better", choice="b", strength=2),
    ScalePoint(label="B much better", choice="b", strength=3),
)
LABEL_SCALE_POINTS = (2, 9)
"""fewest and most points a scale may have (keys 1..9 pick them)"""


class Settings(BaseSettings):
    """Every setting of the service; read once per process by ``get_settings``."""

    model_config = SettingsConfigDict(env_prefix="RATCHET_", extra="ignore")

    home: Path = Field(default=Path(".ratchet"))
    """folder for the embedded database, local artifacts and Prefect's home"""
    database_url: str | None = None
    """SQLAlchemy URL; default: SQLite file ``<home>/ratchet.db``"""
    artifacts_url: str | None = None
    """fsspec URL of the artifact root; default: folder ``<home>/artifacts``"""
    log_level: str = "INFO"
    """log level of the service's loggers"""

    max_batch_records: int = Field(default=50_000, ge=1)
    """most comparisons in one feedback batch (over it: 413)"""
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """largest JSON request body in bytes (over it: 413)"""
    max_import_bytes: int = Field(default=2 * 1024 * 1024 * 1024, ge=1024)
    """largest JSONL import body in bytes, counted after gzip decoding (over it: 413)"""
    inline_batch_bytes: int = Field(default=256 * 1024, ge=0)
    """on PostgreSQL, feedback batches whose JSON body is at most this many bytes are written from the event loop in
    one statement (asyncpg); larger ones stream through COPY in a worker thread; 0 sends every batch the COPY way"""
    inline_pool_size: int = Field(default=16, ge=1)
    """most asyncpg connections each API process holds for small batches (PostgreSQL); 4 of them are opened at start-up"""
    db_pool_timeout_s: float = Field(default=5.0, gt=0)
    """how long a request waits for a free database connection (and a new one to open) before it is answered
    503 with Retry-After; the pools of the API never queue a request longer"""
    max_imports: int = Field(default=8, ge=1)
    """most JSONL imports one API process streams at once, each holding a database connection
    (over it: 503 with Retry-After)"""
    max_imports_per_key: int = Field(default=2, ge=1)
    """most JSONL imports one API key streams at once (over it: 429 with Retry-After)"""
    import_idle_timeout_s: float = Field(default=30.0, gt=0)
    """longest an import waits for the next chunk of its body; a body that stops arriving is answered 408
    and its transaction rolled back"""
    auth_cache_s: float = Field(default=5.0, ge=0)
    """how long the API remembers an authenticated key; a revocation made elsewhere takes effect within it"""
    task_lease_s: int = Field(default=600, ge=1)
    """how long a labeler holds a fetched comparison task before others may get it"""

    work_dir: Path | None = None
    """where in-process worker steps write (one folder per cycle and stage, so a re-run resumes); default ``<home>/work``"""
    cycle_config: Path | None = None
    """JSON file of the weekly cycle's settings (orchestrator.settings.CycleSettings; read by ``read_cycle_config``);
    unset: the built-in defaults"""
    nproc_per_node: str = Field(default="1", pattern=r"^(auto|[1-9][0-9]*)$")
    """worker processes per node for the steps that run under torchrun (sample, sft, train_pm, ppo, evaluate): a number, or auto
    (one per CUDA device the node's job was given, the GPU pool's ``gpu_count``; 1 without CUDA)"""
    nnodes: int = Field(default=1, ge=1)
    """nodes of one step's torchrun (more than 1: a multi-node job, see docs/deploy.md; needs rdzv_endpoint)"""
    rdzv_endpoint: str | None = None
    """host:port of torchrun's c10d rendezvous for a multi-node step (the first node's address)"""
    cycle_launcher: Literal["thread", "deployment", "off"] | None = None
    """how ``ratchet api`` starts a cycle for POST /v1/cycles: in a thread of the server, with run_deployment of
    ``cycle_deployment``, or not at all (503); default: thread on the embedded store, deployment otherwise"""
    cycle_deployment: str = "weekly-cycle/weekly-cycle"
    """the Prefect deployment (flow name/deployment name) of the weekly cycle"""
    deploy_hook: str | None = None
    """called after every deploy and rollback so a serving stack reloads: an http(s) URL (POSTed the event as
    JSON) or a command (split like a shell, run without one; the event as JSON on stdin)"""
    deploy_hook_timeout_s: float = Field(default=30.0, gt=0)
    """how long a deploy hook may take before it counts as failed"""

    # Alerts (store/alerts.py): recorded in the transaction of their event, then delivered to these channels.
    alert_webhook: str | None = None
    """an http(s) URL POSTed each alert as JSON, Slack-compatible (``text``, plus ``event``, ``cycle``, ``link``,
    ``payload``); unset: no webhook"""
    alert_command: str | None = None
    """a command given each alert's JSON on stdin (split like a shell line, run without one); exit status 0 is
    delivered; unset: no command"""
    alert_retries: int = Field(default=2, ge=0, le=10)
    """retries of an alert whose delivery failed, after the first try (2: three tries in all)"""
    alert_retry_delay_s: float = Field(default=1.0, ge=0)
    """delay before an alert's first retry; it doubles for each later one"""
    alert_timeout_s: float = Field(default=10.0, gt=0)
    """how long one try of the webhook or the command may take before it counts as failed"""
    public_url: str = "http://127.0.0.1:8000"
    """the API's address as people reach it: alerts link to ``<public_url>/dashboard/cycles/<id>``"""

    label_scale: tuple[ScalePoint, ...] = DEFAULT_LABEL_SCALE
    """the comparison page's preference scale, in the order shown (key 1 is the first point): a JSON list of
    {"label", "choice", "strength"}; default seven points from A much better (a, 3) through About the same (tie, 0)
    to B much better (b, 3)"""

    @field_validator("label_scale")
    @classmethod
    def _usable_scale(cls, value: tuple[ScalePoint, ...]) -> tuple[ScalePoint, ...]:
        from store.feedback import MAX_STRENGTH

        fewest, most = LABEL_SCALE_POINTS
        if not fewest <= len(value) <= most:
            raise ValueError(f"label_scale has {len(value)} points; it needs {fewest} to {most}")
        for i, point in enumerate(value):
            if point.strength > MAX_STRENGTH:
                raise ValueError(f"label_scale point {i} ({point.label!r}) has strength {point.strength:g}, over "
                                 f"the most a comparison may carry ({MAX_STRENGTH:g})")
            if point.choice == "tie" and point.strength != 0:
                raise ValueError(f"label_scale point {i} ({point.label!r}) is a tie, so its strength must be 0, "
                                 f"not {point.strength:g}")
            if point.choice != "tie" and point.strength == 0:
                raise ValueError(f"label_scale point {i} ({point.label!r}) chooses {point.choice!r}, so its strength "
                                 "must be above 0 (0 is a tie)")
        seen: set[tuple[str, float]] = set()
        for i, point in enumerate(value):
            if (point.choice, point.strength) in seen:
                raise ValueError(f"label_scale point {i} ({point.label!r}) repeats choice {point.choice!r} with "
                                 f"strength {point.strength:g}")
            seen.add((point.choice, point.strength))
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"log_level {value!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @property
    def resolved_database_url(self) -> str:
        """The database URL, with the embedded SQLite default filled in."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'ratchet.db').resolve()}"

    @property
    def resolved_artifacts_url(self) -> str:
        """The artifact root URL, with the local default filled in."""
        if self.artifacts_url:
            return self.artifacts_url
        return str((self.home / "artifacts").resolve())

    @property
    def resolved_work_dir(self) -> Path:
        """The folder of in-process worker outputs, with the default filled in."""
        return (self.work_dir or self.home / "work").resolve()

    @property
    def resolved_cycle_launcher(self) -> str:
        """``thread``, ``deployment`` or ``off``, with the default filled in."""
        if self.cycle_launcher is not None:
            return self.cycle_launcher
        return "thread" if self.is_embedded else "deployment"

    @property
    def is_embedded(self) -> bool:
        """True when running on the embedded SQLite default."""
        return self.resolved_database_url.startswith("sqlite")

    # The operator dashboard's sign-in (api/routes/dashboard.py, store/sessions.py).
    dashboard_session_s: int = Field(default=12 * 3600, ge=60)
    """longest a dashboard sign-in lasts, however busy (seconds from sign-in)"""
    dashboard_idle_s: int = Field(default=3600, ge=60)
    """a dashboard sign-in unused for this many seconds ends"""
    dashboard_live_s: float = Field(default=5.0, ge=0.1, le=3600)
    """how often a dashboard page showing a running cycle asks whether it changed (with JavaScript), in seconds"""
    dashboard_secure_cookie: bool = False
    """always mark the dashboard's cookies Secure (for TLS ended at a proxy that does not pass the scheme on);
    requests that came over https get it anyway"""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings (cached; ``get_settings.cache_clear()`` re-reads)."""
    return Settings()


def read_cycle_config(path: str | Path) -> dict[str, Any]:
    """The JSON object in the cycle settings file at ``path`` (``RATCHET_CYCLE_CONFIG``), unvalidated: the
    orchestrator checks all of it (``orchestrator.settings.load_defaults``), the API reads its ``qc``
    (``store.raters.default_policy``). ``InvalidInput`` when the file is missing or not a JSON object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInput(f"cycle config {path} (RATCHET_CYCLE_CONFIG) does not exist") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"cycle config {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"cycle config {path} must hold a JSON object of settings, not {type(data).__name__}")
    return data
