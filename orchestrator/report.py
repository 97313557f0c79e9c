"""A cycle's report: versions, metrics and the gate's decision, as a dict and as markdown.

The dict is what ``ratchet demo`` tabulates; the markdown is the Prefect
artifact each cycle publishes (key ``cycle-<week>``, ``cycle-<target>-<week>``
for a deployment target other than "default": ``orchestrator.flow.report_key``),
so the Prefect UI shows the same report as the store.
"""

from __future__ import annotations

from typing import Any

from store.cycles import DEFAULT_TARGET, cycle_label
from store.status import cycle_summary

__all__ = ["cycle_markdown", "cycle_summary"]


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return str(value)


def _human(summary: dict[str, Any]) -> str:
    if summary.get("human_eval") == "off":
        return "off"
    return (f"{_num(summary.get('human_win_rate'))} / {_num(summary.get('human_lower_bound'))} / "
            f"{_num(summary.get('human_bar'))} ({_num(summary.get('human_answers'))})")


def cycle_markdown(summary: dict[str, Any]) -> str:
    """The report as markdown (the Prefect artifact)."""
    lines = [
        f"# Ratchet cycle {cycle_label(summary['week'], summary.get('deploy_target', DEFAULT_TARGET))}",
        "",
        f"**Status:** {summary['status']}" + (f" — {summary['reason']}" if summary.get("reason") else ""),
        "",
        "| | |",
        "|---|---|",
        f"| comparisons in D(k) | {_num(summary.get('comparisons'))} ({_num(summary.get('new_comparisons'))} new) |",
        f"| PM version / held-out accuracy | v{_num(summary.get('pm_version'))} / {_num(summary.get('pm_accuracy'))} |",
        f"| test PM held-out accuracy | {_num(summary.get('test_pm_accuracy'))} |",
        f"| candidate policy | v{_num(summary.get('policy_version'))} |",
        f"| method / training reward / KL | {summary.get('method') or '-'} / {_num(summary.get('policy_reward'))} / {_num(summary.get('kl'), 4)} |",
        f"| win rate vs deployed (test PM / train PM) | {_num(summary.get('win_rate'))} / {_num(summary.get('win_rate_train_pm'))} |",
        f"| human win rate / lower bound / bar (answers) | {_human(summary)} |",
        f"| Elo (candidate / deployed) | {_num(summary.get('elo_candidate'), 1)} / {_num(summary.get('elo_baseline'), 1)} |",
        f"| PM ensemble (members, held-out spread; training reward spread) | {_num(summary.get('pm_ensemble_size'))}, "
        f"{_num(summary.get('pm_ensemble_spread'))}; {_num(summary.get('policy_reward_spread'))} |",
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
