"""A cycle's report: versions, metrics and the gate's decision, as a dict and as markdown.

The dict is what ``ratchet demo`` tabulates; the markdown is the Prefect
artifact each cycle publishes (key ``cycle-<week>``), so the Prefect UI shows
the same report as the store.
"""

from __future__ import annotations

from typing import Any

from store.cycles import get_cycle
from store.db import Database


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return str(value)


def cycle_summary(database: Database, cycle_id: int) -> dict[str, Any]:
    """The cycle's headline numbers from its stage outputs (None where a stage has not finished)."""
    with database.session() as session:
        cycle = get_cycle(session, cycle_id)
        stages = {run.stage: run for run in cycle.stages}
        out: dict[str, Any] = {
            "cycle_id": cycle.id,
            "week": cycle.week,
            "status": cycle.status,
            "reason": cycle.reason,
            "stages": {
                name: {"status": run.status, "attempts": run.attempts, "compute_s": run.compute_s, "error": run.error}
                for name, run in stages.items()
            },
        }
        outputs = {name: dict(run.outputs) for name, run in stages.items() if run.status in ("succeeded", "skipped")}
    pm = outputs.get("train_pm", {})
    ppo = outputs.get("ppo", {})
    metrics = outputs.get("evaluate", {}).get("metrics", {})
    gate = outputs.get("gate", {})
    deploy = outputs.get("deploy", {})
    deployed = deploy.get("deployed") if deploy else None
    gold_key = "eval/gold_candidate" if deployed else "eval/gold_baseline"
    out.update(
        {
            "comparisons": outputs.get("snapshot", {}).get("rows"),
            "new_comparisons": outputs.get("gather", {}).get("comparisons"),
            "pm_version": pm.get("pm_version"),
            "pm_accuracy": pm.get("heldout_accuracy"),
            "test_pm_accuracy": pm.get("test_pm_heldout_accuracy"),
            "policy_version": ppo.get("policy_version"),
            "ppo_reward": ppo.get("reward"),
            "kl": ppo.get("kl"),
            "eval_kl": metrics.get("eval/kl"),
            "win_rate": metrics.get("eval/win_rate_test_pm"),
            "win_rate_train_pm": metrics.get("eval/win_rate_train_pm"),
            "deployed": deployed,
            "gate_reasons": gate.get("reasons"),
            "gold_candidate": metrics.get("eval/gold_candidate"),
            "gold_baseline": metrics.get("eval/gold_baseline"),
            # the gold score of the policy deployed at the end of the cycle
            "gold_score": metrics.get(gold_key) if deployed is not None else None,
        }
    )
    return out


def cycle_markdown(summary: dict[str, Any]) -> str:
    """The report as markdown (the Prefect artifact)."""
    lines = [
        f"# Ratchet cycle {summary['week']}",
        "",
        f"**Status:** {summary['status']}" + (f" — {summary['reason']}" if summary.get("reason") else ""),
        "",
        "| | |",
        "|---|---|",
        f"| comparisons in D(k) | {_num(summary.get('comparisons'))} ({_num(summary.get('new_comparisons'))} new) |",
        f"| PM version / held-out accuracy | v{_num(summary.get('pm_version'))} / {_num(summary.get('pm_accuracy'))} |",
        f"| test PM held-out accuracy | {_num(summary.get('test_pm_accuracy'))} |",
        f"| candidate policy | v{_num(summary.get('policy_version'))} |",
        f"| PPO reward / KL | {_num(summary.get('ppo_reward'))} / {_num(summary.get('kl'), 4)} |",
        f"| win rate vs deployed (test PM / train PM) | {_num(summary.get('win_rate'))} / {_num(summary.get('win_rate_train_pm'))} |",
        f"| KL to reference (eval) | {_num(summary.get('eval_kl'), 4)} |",
        f"| gold (candidate / deployed before) | {_num(summary.get('gold_candidate'))} / {_num(summary.get('gold_baseline'))} |",
        f"| deployed | {_num(summary.get('deployed'))} |",
    ]
    if summary.get("gate_reasons"):
        lines += ["", "## Gate: rejected", ""] + [f"- {r}" for r in summary["gate_reasons"]]
    lines += ["", "## Stages", "", "| stage | status | attempts | compute s | error |", "|---|---|---|---|---|"]
    for name, st in summary["stages"].items():
        error = (st.get("error") or "").replace("|", "\\|").replace("\n", " ")[:200]
        lines.append(f"| {name} | {st['status']} | {st['attempts']} | {_num(st.get('compute_s'), 2)} | {error} |")
    return "\n".join(lines) + "\n"
