"""Which stages an operator's re-run keeps, and which it runs again.

A failed or cancelled cycle is re-run with corrected settings
(``POST /v1/cycles/{id}/rerun``, ``ratchet cycle rerun``). The new params are
merged over the cycle's and resolved and checked as at trigger time; the
settings that changed are compared with those the cycle's open stage recorded
(dotted keys, e.g. ``ppo.learning_rate``).

A finished stage is kept when nothing it reads changed and every stage before
it is kept: ``READS`` names what each stage reads, and each stage reads the
outputs of those before it. So a fix to the PPO settings after ``improve``
failed keeps open to train_pm (the samples people labelled, the snapshot, the
PMs) and runs improve and what follows again. ``RUNTIME`` settings (where and
how steps run: the runner, the device, threads, retries) change no stage's
result: changing them alone keeps every finished stage. The open stage is kept
with the new settings recorded in it (its baseline, reference and prompt sets
are the cycle's own); a change to what it resolved (the prompt set, the
target, the reference) means sampling again, and a re-run refuses that once
sample's tasks are with people (start a new week instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.cycle import DONE, STAGES

RUNTIME = ("runner", "work_pool", "step_deployments", "step_poll_interval_s", "device", "num_threads",
           "stage_retries", "retry_delay_s")
"""settings of where and how steps run, not of what they compute"""

OPENED = ("prompt_set", "policy_name", "reference_policy", "deploy_target", "pm.base_policy", "pm.warm_start",
          "pm.name", "pm.test_name", "evaluate.prompt_set", "sample.snapshots", "sample.top_up_rounds")
"""what the open stage resolves once for the cycle"""

READS: dict[str, tuple[str, ...]] = {
    "open": OPENED,
    "sample": ("sample", "gather.min_comparisons", "qc"),
    "gather": ("gather", "feedback_from"),
    "snapshot": ("pm.name", "snapshot_name", "feedback_from", "human_eval.train_on", "qc"),
    "train_pm": ("pm",),
    "improve": ("improve",),  # and the method's own section (``reads``)
    "evaluate": ("evaluate", "gold"),
    "human_eval": ("human_eval", "qc"),
    "gate": ("gate",),
    "deploy": (),
}
"""the settings (sections, or dotted fields) each stage's result depends on"""


@dataclass(frozen=True)
class RerunPlan:
    changed: list[str]
    """the settings (dotted) that differ from those the cycle ran with"""
    kept: list[str]
    """finished stages kept as they are"""
    rerun: list[str]
    """stages that run (again): the first one whose inputs changed or that did not finish, and all after it"""
    why: dict[str, str]
    """per stage run again, why"""


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A settings dict as dotted keys to leaf values (a list is a leaf)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two resolved settings dicts."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, object()) != b.get(k, object()))


def reads(stage: str, old: dict[str, Any], new: dict[str, Any]) -> tuple[str, ...]:
    """What ``stage`` reads: ``READS``, and for improve the sections of the method before and after."""
    if stage != "improve":
        return READS[stage]
    methods = {s.get("improve", {}).get("method", "ppo") for s in (old, new)}
    return READS["improve"] + tuple(sorted(methods))


def touches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def plan_rerun(old: dict[str, Any] | None, new: dict[str, Any], status: dict[str, str]) -> RerunPlan:
    """The plan of a re-run from the settings the cycle ran with (``old``, None if its open stage never
    finished), the new ones, and each stage's status."""
    changed = [] if old is None else [k for k in changed_settings(old, new) if not touches(k, RUNTIME)]
    kept, rerun, why = [], [], {}
    for stage in STAGES:
        if rerun:
            rerun.append(stage)
            why[stage] = f"after {rerun[0]}"
            continue
        hit = [k for k in changed if touches(k, reads(stage, old or {}, new))]
        reasons = [] if status.get(stage) in DONE else ["it did not finish" if stage in status else "it never ran"]
        if hit:
            reasons.append(f"{', '.join(hit)} changed")
        if reasons:
            rerun.append(stage)
            why[stage] = "; ".join(reasons)
        else:
            kept.append(stage)
    return RerunPlan(changed=changed, kept=kept, rerun=rerun, why=why)
