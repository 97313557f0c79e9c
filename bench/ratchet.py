"""Does the ratchet hold? The demo from many start weeks (and seeds), every run reported.

    python bench/ratchet.py                                  # 8 start weeks x seed 0, one run at a time (~15 min)
    python bench/ratchet.py --weeks 2026-W49,2027-W01 --seeds 0,1,2
    python bench/ratchet.py --jobs 2                         # two runs at once: quicker, but wall times are not comparable
    python bench/ratchet.py --qc off                         # the same raters, quality control flagging but excluding none
    python bench/ratchet.py --raters one                     # the careful rater alone
    python bench/ratchet.py --method dpo,rloo                # each method over the same weeks and seeds

Each run is ``ratchet demo --cycles N --json --start-week W --seed S
--raters R --method M [--no-qc]`` in a fresh process with a fresh ``RATCHET_HOME``
(embedded SQLite store, local artifacts, Prefect's temporary server),
exactly what a user's ``make demo`` runs, with the demo's own settings (by
default its three raters, careful, noisy and random, with quality control
leaving flagged raters out of the snapshots). Per run it prints the gold score of the
deployed policy after each cycle, the deploys, the regressions (a deploy
whose gold is lower than that of the policy it replaced by more than
``--tolerance``, 0.01) and the wall time of the whole command.

The gold score of a policy is the demo world's gold preference averaged over
the held-out evaluation prompts (the evaluate step's samples, the same seed
every cycle), so the policy a cycle replaced has the same gold in the cycle
that replaced it as in the cycle that deployed it.

The last line is JSON: {"runs", "deploys", "regressions", "runs_improved",
"median_final_gold", "median_wall_s", "max_wall_s", "raters", "qc", ...} plus
every run, with the raters each cycle's snapshot left out (``excluded``) and
each rater's quality-control numbers at the end (``rater_qc``); with several
methods, ``by_method`` holds the same numbers per method, plus the
comparisons the last cycle's PMs were trained on (``median_comparisons``:
every comparison is a simulated person's answer) and the median gold after
each cycle.
Targets (issue "the ratchet must hold"): 0 regressions; the final gold above
P0's in at least 7 of 8 runs; median final gold >= 0.6; each run <= 180 s,
median <= 120 s, on 2 CPU cores, one run at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

START_WEEKS = (
    "2026-W40", "2026-W45", "2026-W48", "2026-W49", "2026-W52", "2027-W01", "2027-W07", "2027-W13",
)
"""the default start weeks: the week the demo was first tuned on (W48), the weeks it failed on (W49,
2027-W01), and others spread over half a year"""


def run_one(week: str, seed: int, *, cycles: int, timeout_s: float, keep: Path | None, raters: str = "all",
            qc: bool = True, method: str = "ppo") -> dict[str, Any]:
    """One ``ratchet demo`` run in a fresh home; its JSON summary plus wall time and exit status."""
    home = Path(tempfile.mkdtemp(prefix=f"ratchet-bench-{method}-{week}-{seed}-", dir=keep))
    env = {
        **os.environ,
        "RATCHET_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    for name in ("RATCHET_DATABASE_URL", "RATCHET_ARTIFACTS_URL", "RATCHET_WORK_DIR", "PREFECT_API_URL"):
        env.pop(name, None)
    command = [sys.executable, "-m", "orchestrator.cli", "demo", "--cycles", str(cycles), "--json",
               "--start-week", week, "--seed", str(seed), "--raters", raters, "--method", method] + ([] if qc else ["--no-qc"])
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        code, stdout, stderr = "timeout", exc.stdout or "", exc.stderr or ""
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
    wall = time.perf_counter() - started
    (home / "demo.stdout").write_text(stdout)
    (home / "demo.stderr").write_text(stderr)
    summary = None
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            summary = json.loads(line)
            break
    return {"week": week, "seed": seed, "raters": raters, "qc": qc, "method": method, "exit": code, "wall_s": round(wall, 1),
            "summary": summary, "home": str(home)}


def score_run(run: dict[str, Any], *, tolerance: float) -> dict[str, Any]:
    """Gold after each cycle, deploys and regressions of one run."""
    summary = run["summary"] or {}
    cycles = summary.get("cycles", [])
    previous = summary.get("gold_score_initial")
    golds, deploys, regressions, excluded = [], 0, [], []
    for row in cycles:
        gold = row.get("gold_score")
        golds.append(gold)
        excluded.append(row.get("excluded_raters") or [])
        if row.get("deployed"):
            deploys += 1
            if gold is not None and previous is not None and gold < previous - tolerance:
                regressions.append({"cycle": row["cycle"], "week": row["week"], "from": previous, "to": gold})
        if gold is not None:
            previous = gold
    final = golds[-1] if golds else None
    initial = summary.get("gold_score_initial")
    return {
        "week": run["week"],
        "seed": run["seed"],
        "raters": run["raters"],
        "qc": "on" if run["qc"] else "off",
        "method": run["method"],
        "comparisons": cycles[-1].get("comparisons") if cycles else None,
        "ok": run["exit"] == 0 and summary.get("cycles") is not None,
        "exit": run["exit"],
        "gold_initial": initial,
        "gold": golds,
        "final_gold": final,
        "improved": final is not None and initial is not None and final > initial,
        "deploys": deploys,
        "regressions": regressions,
        "excluded": excluded,
        "rater_qc": summary.get("rater_qc", []),
        "wall_s": run["wall_s"],
        "home": run["home"],
    }


def _fmt(value: float | None) -> str:
    return "  -   " if value is None else f"{value:+.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weeks", default=",".join(START_WEEKS), help="comma-separated ISO start weeks")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every week runs with every seed")
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (1 for wall times that mean something)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="a deploy losing more gold than this regresses")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a run counts as failed")
    parser.add_argument("--keep", type=Path, default=None, help="folder for the runs' homes (default: a temp folder)")
    parser.add_argument("--raters", choices=("all", "one"), default="all",
                        help="the demo's raters: all (careful, noisy, random) or one (the careful one)")
    parser.add_argument("--qc", choices=("on", "off"), default="on",
                        help="off: quality control flags raters but leaves none out of the snapshots (--no-qc)")
    parser.add_argument("--method", default="ppo",
                        help="comma-separated improve methods (ppo, dpo, online_dpo, rloo, grpo, rejection_sampling); "
                             "every method runs on every week and seed")
    args = parser.parse_args(argv)
    qc = args.qc == "on"
    methods = [m.strip() for m in args.method.split(",") if m.strip()]

    weeks = [w.strip() for w in args.weeks.split(",") if w.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    plan = [(w, s, m) for m in methods for s in seeds for w in weeks]
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    print(f"{len(plan)} run(s) of {args.cycles} cycles, {args.jobs} at a time; raters {args.raters}, "
          f"quality control {args.qc}; methods {', '.join(methods)}", flush=True)
    print(f"{'method':>18} {'start week':>10} {'seed':>4}  {'P0':>6}  " + "  ".join(f"{'c' + str(i + 1):>6}" for i in range(args.cycles))
          + "  deploys  regressions  wall s  left out", flush=True)

    def one(item):
        week, seed, method = item
        return score_run(run_one(week, seed, cycles=args.cycles, timeout_s=args.timeout, keep=args.keep,
                                 raters=args.raters, qc=qc, method=method), tolerance=args.tolerance)

    scored: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(one, plan):
            scored.append(row)
            golds = row["gold"] + [None] * (args.cycles - len(row["gold"]))
            status = "" if row["ok"] else f"  FAILED (exit {row['exit']}; see {row['home']})"
            left_out = ",".join(sorted({r for cycle in row["excluded"] for r in cycle})) or "-"
            print(f"{row['method']:>18} {row['week']:>10} {row['seed']:>4}  {_fmt(row['gold_initial'])}  "
                  + "  ".join(_fmt(g) for g in golds)
                  + f"  {row['deploys']:>7}  {len(row['regressions']):>11}  {row['wall_s']:>6.1f}  {left_out}{status}",
                  flush=True)

    result = {**totals(scored), "jobs": args.jobs, "raters": args.raters, "qc": args.qc, "methods": methods}
    if len(methods) > 1:
        result["by_method"] = {m: totals([r for r in scored if r["method"] == m]) for m in methods}
        print(f"{'method':>18}  deploys  regressions  improved  median gold (min)  median comparisons  median wall s")
        for m, t in result["by_method"].items():
            print(f"{m:>18}  {t['deploys']:>7}  {t['regressions']:>11}  {t['runs_improved']:>4}/{t['runs']:<3}  "
                  f"{_fmt(t['median_final_gold'])} ({_fmt(t['min_final_gold'])})  {t['median_comparisons']!s:>18}  "
                  f"{t['median_wall_s']!s:>13}")
    result["per_run"] = [{k: r[k] for k in ("method", "week", "seed", "raters", "qc", "gold_initial", "gold", "deploys",
                                            "regressions", "comparisons", "excluded", "rater_qc", "wall_s", "exit")}
                         for r in scored]
    print(json.dumps(result))
    return 0 if result["failed_runs"] == 0 else 1


def totals(scored: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers of a set of scored runs: deploys, regressions, improved runs, gold, comparisons, wall time."""
    finals = [r["final_gold"] for r in scored if r["final_gold"] is not None]
    walls = [r["wall_s"] for r in scored]
    comparisons = [r["comparisons"] for r in scored if r["comparisons"] is not None]
    cycles = max((len(r["gold"]) for r in scored), default=0)
    return {
        "runs": len(scored),
        "failed_runs": sum(not r["ok"] for r in scored),
        "deploys": sum(r["deploys"] for r in scored),
        "regressions": sum(len(r["regressions"]) for r in scored),
        "runs_improved": sum(r["improved"] for r in scored),
        "median_final_gold": round(statistics.median(finals), 3) if finals else None,
        "min_final_gold": round(min(finals), 3) if finals else None,
        "median_wall_s": round(statistics.median(walls), 1) if walls else None,
        "max_wall_s": round(max(walls), 1) if walls else None,
        "median_comparisons": statistics.median(comparisons) if comparisons else None,
        "median_gold_by_cycle": [
            round(statistics.median(gs), 3) if (gs := [r["gold"][i] for r in scored
                                                       if len(r["gold"]) > i and r["gold"][i] is not None]) else None
            for i in range(cycles)
        ],
    }


if __name__ == "__main__":
    raise SystemExit(main())
