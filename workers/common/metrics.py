"""Metrics files, checksums, atomic writes and calibration statistics.

A step writes ``metrics.jsonl`` (one JSON object per logged training step)
and ``summary.json`` (the final metrics) under its output directory, and
returns the sha256 of every output file. Checksums use the same directory
manifest as the store (sorted ``<relative path>\\t<sha256>\\t<size>`` lines),
so the orchestrator can register a directory without reading it twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILENAME = "metrics.jsonl"
SUMMARY_FILENAME = "summary.json"


# -- atomic files ------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (no torn files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# -- checksums ---------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(root: str | os.PathLike, *, exclude: Iterable[str] = ()) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root``, skipping temporaries and ``exclude`` prefixes."""
    root = Path(root)
    skip = tuple(exclude)
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".tmp-") for part in path.relative_to(root).parts):
            continue
        if skip and any(rel == s or rel.startswith(s.rstrip("/") + "/") for s in skip):
            continue
        out[rel] = sha256_file(path)
    return out


def manifest_sha256(root: str | os.PathLike) -> str:
    """The store's directory checksum: sha256 of sorted ``rel\\tsha256\\tsize`` lines."""
    root = Path(root)
    lines = []
    for rel, sha in file_checksums(root).items():
        lines.append(f"{rel}\t{sha}\t{(root / rel).stat().st_size}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


# -- the metrics file --------------------------------------------------------------


class MetricsWriter:
    """Appends one JSON line per logged step to ``metrics.jsonl``.

    On resume, ``rewind`` drops the lines logged after the checkpoint the run
    restarts from, so the file reads as one uninterrupted history. In a
    distributed run only rank 0's writer is ``enabled``; the others write nothing.
    """

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # several PMs of one run may log at once (train_pm parallel_pms)

    def log(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (flushed, so a killed run keeps what it logged)."""
        if not self.enabled:
            return
        line = json.dumps(dict(record), sort_keys=True, default=_json_default) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()

    def rewind(self, *, after_step: int, where: Mapping[str, Any] | None = None) -> None:
        """Drop lines whose ``step`` is greater than ``after_step`` (and that match ``where``)."""
        if not self.enabled:
            return
        with self._lock:
            self._rewind(after_step, where)

    def _rewind(self, after_step: int, where: Mapping[str, Any] | None) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill
                continue
            matches = all(record.get(k) == v for k, v in (where or {}).items())
            if matches and record.get("step", -1) > after_step:
                continue
            kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def clear(self, where: Mapping[str, Any] | None = None) -> None:
        """Drop every line (matching ``where``): a fresh run over a stale file."""
        self.rewind(after_step=-(2**62), where=where)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# -- step results ------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    """What a worker step returns: where its outputs are, their checksums and its metrics."""

    step: str
    """the step's name (``sample``, ``train_pm``)"""
    output_dir: str
    """the directory all outputs were written under"""
    outputs: dict[str, str]
    """named outputs (``samples``, ``pm``, ``test_pm``) -> absolute path"""
    files: dict[str, str]
    """every output file, relative to ``output_dir`` -> sha256 (checkpoints excluded)"""
    manifests: dict[str, str]
    """named outputs -> store manifest sha256 (directories) or file sha256"""
    metrics: dict[str, Any] = field(default_factory=dict)
    """final metrics, namespaced keys (``heldout/accuracy``, ``perf/tokens_per_s``)"""
    complete: bool = True
    """False when the run stopped early (``max_steps_this_run``) and a re-run resumes it"""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {
            "step": self.step,
            "output_dir": self.output_dir,
            "complete": self.complete,
            "outputs": dict(self.outputs),
            "files": dict(self.files),
            "manifests": dict(self.manifests),
            "metrics": dict(self.metrics),
        }


def finished_metrics(out: Path, cfg: Any, *, step: str, ignore: set[str]) -> dict[str, Any] | None:
    """The metrics of a finished run of the same config in ``out`` (its summary.json), or None.

    A finished run whose config differs (fields in ``ignore`` aside) is an
    error: reusing its outputs would hand back the wrong results.
    """
    from workers.common.config import WorkerError, diff_configs, to_dict

    summary_path = Path(out) / SUMMARY_FILENAME
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    diffs = diff_configs(summary.get("config", {}), to_dict(cfg), ignore=ignore)
    if diffs:
        raise WorkerError(
            f"output_dir {out} already holds a finished {step} run with a different config ({'; '.join(diffs)}); "
            "use a new output_dir"
        )
    return summary["metrics"]


def collect_result(
    step: str, output_dir: Path, outputs: Mapping[str, Path], metrics: Mapping[str, Any], *, complete: bool = True
) -> StepResult:
    """Checksum the outputs under ``output_dir`` (not its checkpoints) into a ``StepResult``."""
    files = file_checksums(output_dir, exclude=("checkpoints",))
    manifests = {}
    for name, path in outputs.items():
        manifests[name] = manifest_sha256(path) if Path(path).is_dir() else sha256_file(path)
    return StepResult(
        step=step,
        output_dir=str(output_dir),
        outputs={k: str(v) for k, v in outputs.items()},
        files=files,
        manifests=manifests,
        metrics=dict(metrics),
        complete=complete,
    )


# -- calibration -------------------------------------------------------------------


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of a reliability diagram: predictions in [lo, hi)."""

    lo: float
    """lower edge of the bin"""
    hi: float
    """upper edge of the bin (the last bin includes 1.0)"""
    count: int
    """number of predictions in the bin"""
    mean_predicted: float | None
    """mean predicted probability in the bin (None when empty)"""
    observed: float | None
    """mean outcome in the bin (None when empty)"""


def calibration(
    probs: Sequence[float], outcomes: Sequence[float], n_bins: int = 10
) -> tuple[float, list[ReliabilityBin]]:
    """Expected calibration error and reliability bins of probabilistic predictions.

    ``probs[i]`` is the predicted probability of an event and ``outcomes[i]``
    its observed value in [0, 1] (a tie counts 0.5). Equal-width bins on
    [0, 1]; ECE = sum over bins of (count / N) * |mean predicted - observed|
    (Guo et al. 2017, eq. 3). Returns (nan, bins) for no predictions.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins ({n_bins}) must be >= 1")
    if len(probs) != len(outcomes):
        raise ValueError(f"probs ({len(probs)}) and outcomes ({len(outcomes)}) differ in length")
    sums = [[0, 0.0, 0.0] for _ in range(n_bins)]
    for p, y in zip(probs, outcomes):
        b = min(int(p * n_bins), n_bins - 1) if p >= 0 else 0
        sums[b][0] += 1
        sums[b][1] += p
        sums[b][2] += y
    n = len(probs)
    ece = 0.0
    bins = []
    for i, (count, psum, ysum) in enumerate(sums):
        mean_p = psum / count if count else None
        obs = ysum / count if count else None
        if count:
            ece += count / n * abs(mean_p - obs)
        bins.append(ReliabilityBin(lo=i / n_bins, hi=(i + 1) / n_bins, count=count, mean_predicted=mean_p, observed=obs))
    return (ece if n else math.nan), bins


def pairwise_calibration(
    p_first: Sequence[float], first_won: Sequence[float], n_bins: int = 10
) -> tuple[float, list[ReliabilityBin]]:
    """``calibration`` of pairwise preferences, each pair counted in both orders.

    ``p_first[i]`` is the predicted probability that pair i's first response
    wins and ``first_won[i]`` the label (a tie 0.5). Counting (p, y) and
    (1 - p, 1 - y) makes the result independent of which response a dataset
    lists first: HH-RLHF lists the chosen one first, so taken one way every
    label would be 1 and a PM at 0.5 would show an ECE near 0.5 whatever its
    calibration. Bin counts are twice the number of pairs.
    """
    return calibration(
        [*p_first, *(1.0 - p for p in p_first)], [*first_won, *(1.0 - y for y in first_won)], n_bins=n_bins
    )
