"""Feedback ingest through the running API vs raw PostgreSQL COPY.

    python bench/ingest.py [--rounds 3] [--workers 2] [--clients 16] [--requests 100]

1. A scratch PostgreSQL database (RATCHET_BENCH_POSTGRES_URL names the server;
   default the local one), migrated, with a labeler key.
2. `ratchet api` (uvicorn) on a free loopback port.
3. Throughput, alternating: one batch of 10,000 comparisons (real HH-RLHF
   texts) POSTed to /v1/feedback-batches (ours), then the same rows loaded
   with COPY into a scratch table of the same shape (peer: the CSV buffer is
   built before the clock starts, so the peer is the database's own speed).
   Each side's median over the rounds is reported.
4. Latency: 16 concurrent clients POST batches of 10 comparisons, each with
   its own Idempotency-Key; p50 / p99 as the clients saw them and as the
   server measured them (Server-Timing). The clients are wrk
   (bench/ingest_latency.lua; `apt-get install wrk`), a C load generator that
   costs the 2-core box almost no CPU, after a 3 s warm-up. Without wrk (or
   with ``--latency-client python``) they are asyncio httpx clients in this
   process, which cost about 1.1 ms of CPU per request on the same cores and
   so inflate the latency they measure (``--client-processes N`` spreads
   them over N processes).

5. Task answers: ``--task-clients`` raters (16), each with its own labeler
   key, lease 10 tasks (GET /v1/comparison-tasks) and answer them in one
   batch, ``--task-requests`` times each: the path that checks the lease rules
   with the task rows locked (store.answers). p50 / p99 of the answering POST
   as the clients saw it (python clients: their own CPU inflates it a little)
   and in the server.

The last line is JSON: {"ours", "peer", "ratio", "p50_ms", "p99_ms", "task_p50_ms", "task_p99_ms", ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import gzip
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg2
import sqlalchemy as sa
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.formats import split_hh_dialogue  # noqa: E402
from store.db import Database, upgrade  # noqa: E402
from store.keys import create_api_key  # noqa: E402

HH = ROOT / "tests" / "data" / "hh-rlhf" / "harmless-base-test.first1000.jsonl.gz"
SERVER = os.environ.get("RATCHET_BENCH_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


@functools.cache
def hh_pairs() -> list[tuple[str, str, str]]:
    with gzip.open(HH, "rt") as fh:
        return [split_hh_dialogue(**json.loads(line)) for line in fh]


def comparisons(n: int, salt: str) -> list[dict]:
    pairs = hh_pairs()
    out = []
    for i in range(n):
        prompt, chosen, rejected = pairs[i % len(pairs)]
        out.append({
            "prompt": prompt,
            "response_a": chosen,
            "response_b": rejected + f" [{salt}:{i}]",
            "choice": "a",
            "rater_id": f"rater-{i % 37}",
        })
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_database() -> tuple[str, str]:
    name = f"ratchet_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(SERVER, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, make_url(SERVER).set(database=name).render_as_string(hide_password=False)


def drop_database(name: str) -> None:
    admin = sa.create_engine(SERVER, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def start_api(url: str, port: int, workers: int) -> subprocess.Popen:
    env = os.environ | {"RATCHET_DATABASE_URL": url, "RATCHET_LOG_LEVEL": "WARNING", "RATCHET_HOME": "/tmp/ratchet-bench"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "api", "--port", str(port), "--workers", str(workers)],
        cwd=ROOT, env=env,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the API did not become healthy within 60 s")


def copy_buffer(rows: list[dict], batch_id: int) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for i, r in enumerate(rows):
        writer.writerow((batch_id, i, r["prompt"], r["response_a"], r["response_b"], r["choice"], r["rater_id"], None, None))
    return buf.getvalue()


def peer_copy(dsn: str, rows: list[dict], batch_id: int) -> float:
    """Seconds to COPY ``rows`` into the scratch table and commit."""
    payload = copy_buffer(rows, batch_id)
    conn = psycopg2.connect(dsn)
    try:
        start = time.perf_counter()
        with conn.cursor() as cur:
            cur.copy_expert(
                "COPY scratch_comparisons (batch_id, position, prompt, response_a, response_b, choice, rater_id, "
                "task_id, metadata) FROM STDIN WITH (FORMAT csv, FORCE_NULL (task_id, metadata))",
                io.StringIO(payload),
            )
        conn.commit()
        return time.perf_counter() - start
    finally:
        conn.close()


def ours_post(client: httpx.Client, body: bytes, headers: dict) -> float:
    start = time.perf_counter()
    r = client.post("/v1/feedback-batches", content=body, headers=headers)
    elapsed = time.perf_counter() - start
    if r.status_code != 201:
        raise SystemExit(f"POST failed: {r.status_code} {r.text[:300]}")
    return elapsed


async def latency(base: str, headers: dict, clients: int, requests: int) -> tuple[list[float], list[float]]:
    samples: list[float] = []
    server: list[float] = []
    run = uuid.uuid4().hex[:8]

    bodies = [
        [json.dumps({"source": "latency", "comparisons": comparisons(10, f"lat{c}-{k}")}).encode() for k in range(requests)]
        for c in range(clients)
    ]

    async def one_client(c: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            for k, body in enumerate(bodies[c]):
                keyed = headers | {"Idempotency-Key": f"py-{run}-{c}-{k}"}
                start = time.perf_counter()
                r = await client.post("/v1/feedback-batches", content=body, headers=keyed)
                samples.append(time.perf_counter() - start)
                server.append(float(r.headers["server-timing"].split("dur=")[1]) / 1000)
                if r.status_code != 201:
                    raise SystemExit(f"POST failed: {r.status_code} {r.text[:300]}")

    cpu = time.process_time()
    wall = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    print(f"latency client: {len(samples) / (time.perf_counter() - wall):.0f} requests/s, "
          f"client CPU {(time.process_time() - cpu) / len(samples) * 1000:.2f} ms per request")
    return samples, server


def _latency_process(args: tuple) -> tuple[list[float], list[float]]:
    base, headers, clients, requests = args
    return asyncio.run(latency(base, headers, clients, requests))


def latency_processes(base: str, headers: dict, clients: int, requests: int, processes: int) -> tuple[list[float], list[float]]:
    """The latency run with the clients spread over ``processes`` client processes."""
    if processes == 1:
        return asyncio.run(latency(base, headers, clients, requests))
    from multiprocessing import get_context

    share = [clients // processes + (i < clients % processes) for i in range(processes)]
    with get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_latency_process, [(base, headers, n, requests) for n in share])
    return [x for p in parts for x in p[0]], [x for p in parts for x in p[1]]


def latency_wrk(base: str, token: str, clients: int, seconds: float) -> dict:
    """The latency run with wrk: a 3 s warm-up (the pool's connections and
    prepared statements), then ``seconds`` measured. Returns wrk's summary."""
    script = ROOT / "bench" / "ingest_latency.lua"
    with tempfile.TemporaryDirectory(prefix="ratchet-wrk-") as tmp:
        Path(tmp, "token").write_text(token + "\n")
        with open(Path(tmp, "bodies.jsonl"), "w") as fh:
            for k in range(64):
                fh.write(json.dumps({"source": "latency", "comparisons": comparisons(10, f"lat-{k}")}) + "\n")
        summary = {}
        for run, duration in (("warmup", 3), ("measured", seconds)):
            out = subprocess.run(
                ["wrk", "-t1", f"-c{clients}", f"-d{duration}s", "-s", str(script), base, "--", tmp, f"{run}-{uuid.uuid4().hex[:8]}"],
                check=True, capture_output=True, text=True,
            ).stdout
            summary = json.loads(next(line for line in out.splitlines() if line.startswith("WRK ")).removeprefix("WRK "))
            if summary["non_201"] or summary["errors"]:
                raise SystemExit(f"latency run {run}: {summary['non_201']} answers were not 201, {summary['errors']} socket errors")
    return summary


async def task_answers(base: str, tokens: list[str], requests: int) -> tuple[list[float], list[float], int]:
    """Each rater leases 10 tasks and answers them in one batch, ``requests`` times; POST latencies, and how
    many leasing GETs came back empty (the tasks they reached were all taken at the same moment)."""
    samples: list[float] = []
    server: list[float] = []
    empty_pages: list[int] = []

    async def one_rater(token: str) -> None:
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=auth) as client:
            k = 0
            while k < requests:
                leased = (await client.get("/v1/comparison-tasks", params={"limit": 10})).json()
                if not leased["data"]:  # every task it reached was taken by raters leasing at the same moment
                    empty_pages.append(1)
                    if len(empty_pages) > 10 * len(tokens):
                        raise SystemExit("raters keep getting empty pages from a pool of open tasks")
                    continue
                body = {"source": "task-bench", "comparisons": [
                    {"prompt": t["prompt"], "response_a": t["response_a"], "response_b": t["response_b"],
                     "choice": "a", "strength": 2, "rater_id": leased["rater_id"], "task_id": t["id"]}
                    for t in leased["data"]]}
                start = time.perf_counter()
                r = await client.post("/v1/feedback-batches", json=body,
                                      headers={"Idempotency-Key": f"{leased['rater_id']}-{k}"})
                samples.append(time.perf_counter() - start)
                if r.status_code != 201:
                    raise SystemExit(f"answering POST failed: {r.status_code} {r.text[:300]}")
                server.append(float(r.headers["server-timing"].split("dur=")[1]) / 1000)
                k += 1

    await asyncio.gather(*(one_rater(t) for t in tokens))
    return samples, server, len(empty_pages)


def make_task_pool(url: str, n: int) -> None:
    """``n`` open tasks of no cycle, from HH-RLHF texts."""
    from store.tasks import create_tasks

    db = Database(url)
    pairs = hh_pairs()
    with db.session() as s:
        create_tasks(s, tasks=[{"prompt": p + f" [{i}]", "response_a": a, "response_b": b}
                               for i, (p, a, b) in ((i, pairs[i % len(pairs)]) for i in range(n))])
    db.dispose()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` (seconds) in milliseconds."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=60, help="requests per latency client")
    parser.add_argument("--latency-client", choices=("auto", "wrk", "python"), default="auto",
                        help="auto: wrk when it is on PATH, else the python clients")
    parser.add_argument("--latency-seconds", type=int, default=15, help="length of the measured wrk run")
    parser.add_argument("--client-processes", type=int, default=1, help="spread the python latency clients over this many processes")
    parser.add_argument("--task-clients", type=int, default=16, help="raters answering leased tasks (0: skip)")
    parser.add_argument("--task-requests", type=int, default=20, help="answering batches per rater")
    args = parser.parse_args()

    name, url = scratch_database()
    proc = None
    try:
        upgrade(url)
        db = Database(url)
        with db.session() as s:
            _, token = create_api_key(s, name="bench", role="labeler")
            rater_tokens = [create_api_key(s, name=f"rater-{i}", role="labeler")[1] for i in range(args.task_clients)]
        with db.engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE scratch_comparisons (LIKE comparisons INCLUDING ALL)"))
        db.dispose()
        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        port = free_port()
        proc = start_api(url, port, args.workers)
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

        ours_s, peer_s = [], []
        with httpx.Client(base_url=base, timeout=120) as client:
            ours_post(client, json.dumps({"source": "warmup", "comparisons": comparisons(100, "warm")}).encode(), headers)
            for r in range(args.rounds):
                rows = comparisons(args.size, f"round{r}")
                body = json.dumps({"source": "bench", "comparisons": rows}).encode()
                ours_s.append(ours_post(client, body, headers))
                peer_s.append(peer_copy(dsn, rows, r + 1))
                print(f"round {r + 1}: ours {args.size / ours_s[-1]:,.0f}/s ({ours_s[-1] * 1000:.0f} ms, "
                      f"{len(body) / 1e6:.1f} MB)  peer COPY {args.size / peer_s[-1]:,.0f}/s ({peer_s[-1] * 1000:.0f} ms)",
                      flush=True)
        ours = args.size / statistics.median(ours_s)
        peer = args.size / statistics.median(peer_s)

        client = args.latency_client
        if client == "auto":
            client = "wrk" if shutil.which("wrk") else "python"
            if client == "python":
                print("wrk is not on PATH (apt-get install wrk): measuring latency with python clients, "
                      "which take CPU from the server on a small machine")
        if client == "wrk":
            summary = latency_wrk(base, token, args.clients, args.latency_seconds)
            count, p50, p99 = summary["requests"], summary["p50_ms"], summary["p99_ms"]
            s50, s99 = summary["server_p50_ms"], summary["server_p99_ms"]
            rate = count / summary["seconds"]
        else:
            wall = time.perf_counter()
            samples, server = latency_processes(base, headers, args.clients, args.requests, args.client_processes)
            rate = len(samples) / (time.perf_counter() - wall)
            count, p50, p99 = len(samples), percentile(samples, 0.5), percentile(samples, 0.99)
            s50, s99 = percentile(server, 0.5), percentile(server, 0.99)
        print(f"latency ({client}): {count} requests of 10 comparisons, {args.clients} clients, {rate:.0f} requests/s: "
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms as the clients saw it; in the server (Server-Timing) "
              f"p50 {s50:.1f} ms, p99 {s99:.1f} ms")
        task = {}
        if args.task_clients:
            make_task_pool(url, args.task_clients * args.task_requests * 20)  # twice what is answered: SKIP LOCKED pages can come short
            wall = time.perf_counter()
            t_samples, t_server, empty = asyncio.run(task_answers(base, rater_tokens, args.task_requests))
            t_rate = len(t_samples) / (time.perf_counter() - wall)
            task = {"task_p50_ms": round(percentile(t_samples, 0.5), 1), "task_p99_ms": round(percentile(t_samples, 0.99), 1),
                    "task_server_p50_ms": round(percentile(t_server, 0.5), 1),
                    "task_server_p99_ms": round(percentile(t_server, 0.99), 1), "task_batches": len(t_samples),
                    "task_empty_pages": empty}
            print(f"task answers (python clients): {len(t_samples)} batches of 10 answers, {args.task_clients} raters, "
                  f"{t_rate:.0f} batches/s (with their leasing GETs): p50 {task['task_p50_ms']} ms, "
                  f"p99 {task['task_p99_ms']} ms; in the server p50 {task['task_server_p50_ms']} ms, "
                  f"p99 {task['task_server_p99_ms']} ms; {empty} leasing GETs came back empty")
        print(json.dumps({
            "ours": round(ours), "peer": round(peer), "ratio": round(ours / peer, 3),
            "batch_size": args.size, "rounds": args.rounds, "workers": args.workers,
            "p50_ms": round(p50, 1), "p99_ms": round(p99, 1), "server_p50_ms": round(s50, 1), "server_p99_ms": round(s99, 1),
            "latency_client": client, "latency_clients": args.clients, "latency_requests": count,
            "latency_requests_per_s": round(rate), "client_processes": args.client_processes if client == "python" else None,
            **task,
        }))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        drop_database(name)


if __name__ == "__main__":
    main()
