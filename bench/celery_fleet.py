"""Scheduling overhead of pgdr on CeleryExecutor: a fleet backed up and every backup verified.

    make bench                 # after run.py and pitr.py: 50 databases on 2 servers, 3 rounds
    make bench ARGS=--quick    # 6 databases, 1 round: the CI smoke run
    python bench/celery_fleet.py --databases 20 --db-mb 200 --rounds 1   # the fleet of real-sized databases

The deployment is the tests' (tests/celery_cluster.py): Redis, a PostgreSQL metadata database,
api-server, scheduler, dag-processor, triggerer and two Celery workers, configured from
docker-compose.yaml, with the plan include/pgdr.compose.yaml adapted to local servers and moto's S3.
A round is one ``pgdr_backup`` run and the ``pgdr_verify_restore`` runs its asset events start,
until every backup of the round is verified.

    overhead = elapsed / (sum of task durations / worker slots) - 1

``elapsed`` runs from the backup run's start to the end of the last verification run; the worker
slots are workers x ``AIRFLOW__CELERY__WORKER_CONCURRENCY``. It is what the scheduler, the broker and
task start-up add to the work itself (goals: under 40 % for the fleet of small databases, under 10 % for
20 databases of 200 MB). Where the idle slot-seconds went is reported beside it (``idle_slot_s``): waiting to start
(a task queued or scheduled, a slot free: the broker, the fork, the task's start) or nothing ready (no task to
run: the scheduler, serial heads and tails of the runs). Results are merged into bench/results/latest.json
(quick.json with --quick) as ``celery_fleet`` (small databases) or ``celery_fleet_<N>mb`` (``--db-mb N``), and
each shape's overhead into ``celery_overhead``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT / "tests")]

BUCKET = "pgdr-bench-celery"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 databases, one round")
    parser.add_argument("--databases", type=int, help="fleet size (default 50, 6 with --quick)")
    parser.add_argument("--rounds", type=int, help="default 3, 1 with --quick")
    parser.add_argument("--db-mb", type=int, default=0, help="size of each database (default: about 100 rows)")
    parser.add_argument("--output", type=Path, help="default: bench/results/latest.json (quick.json with --quick)")
    parser.add_argument("--scale", type=int, help=argparse.SUPPRESS)  # the other benchmarks'
    parser.add_argument("--partitions", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--load-seconds", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = args.databases or (6 if args.quick else 50)
    rounds = args.rounds or (1 if args.quick else 3)
    output = args.output or ROOT / "bench" / "results" / ("quick.json" if args.quick else "latest.json")

    from celery_cluster import redis_server

    if not redis_server():
        print("celery_fleet: skipped, redis-server is not installed (apt-get install redis-server)")
        return
    work = Path(tempfile.mkdtemp(prefix="pgdr-bench-celery-"))
    work.chmod(0o755)
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    )
    try:
        results = run(work, size, rounds, args.db_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = json.loads(output.read_text()) if output.exists() else {}
    shape = f"{size}x{args.db_mb}mb" if args.db_mb else f"{size}x_small"
    report[f"celery_fleet_{args.db_mb}mb" if args.db_mb else "celery_fleet"] = results
    report.setdefault("celery_overhead", {})[shape] = results["overhead"]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\npgdr on CeleryExecutor: {size} databases on 2 servers, {results['worker_slots']} worker slots, median "
        f"of {rounds} round(s)"
    )
    goal = 0.10 if args.db_mb >= 200 else 0.40
    verdict = "ok" if results["overhead"] < goal else "MISSED"
    print(f"{'overhead':<30}{results['overhead']:>10.1%}  < {goal:.0%}  {verdict}")
    for key in ("elapsed_s", "task_seconds", "backup_run_s", "tasks", "db_size_mb"):
        print(f"  {key:<28}{results[key]:>10}")
    print(f"\nMerged into {output}")


def run(work: Path, size: int, rounds: int, db_mb: int = 0) -> dict:
    import logging

    import psycopg
    from celery_cluster import CeleryCluster, compose_shaped_plan, start_metadata_server
    from moto.server import ThreadedMotoServer
    from pgdr.local.embedded import EmbeddedServer
    from pgdr.postgres.binaries import free_port
    from psycopg import sql
    from support import MailInbox, SlackReceiver, aws_connection

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request otherwise
    servers = [EmbeddedServer(work / "source-a").start()]
    servers.append(EmbeddedServer(work / "source-b", restore_password=servers[0].restore_password).start())
    meta = start_metadata_server(work / "metadata")
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=(moto_port := free_port()), verbose=False)
    moto.start()
    slack, mail = SlackReceiver(), MailInbox()
    cluster = None
    try:
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1").create_bucket(
            Bucket=BUCKET
        )
        databases = []
        for index in range(size):
            server_index = index % 2
            name = f"fleet_{index:03d}"
            with psycopg.connect(**servers[server_index].dsn("postgres"), autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            with psycopg.connect(**servers[server_index].dsn(name), autocommit=True) as conn:
                conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL, note text)")
                # ~125 bytes a row with its key's index: db_mb MB, or about 100 rows
                rows = db_mb * 8000 + index if db_mb else 100 + index
                conn.execute(
                    "INSERT INTO accounts SELECT g, g * 1.5, repeat(md5(g::text), 2) FROM generate_series(1, %s) g",
                    (rows,),
                )
                conn.execute("VACUUM ANALYZE accounts")
            server = "ab"[server_index]
            databases.append({"name": name, "conn_id": f"pgdr_fleet_{server}", "server": f"fleet_{server}"})
        plan = compose_shaped_plan(
            {"minio": {"type": "s3", "bucket": BUCKET, "prefix": "bench", "aws_conn_id": "pgdr_s3"}},
            databases,
            backup={"schedule": None, "retry_delay": "5s"},
        )
        import yaml

        plan_path = work / "plan.yaml"
        plan_path.write_text(yaml.safe_dump(plan, sort_keys=False))
        connections = {
            "AIRFLOW_CONN_PGDR_FLEET_A": servers[0].connection_uri("postgres"),
            "AIRFLOW_CONN_PGDR_FLEET_B": servers[1].connection_uri("postgres"),
            "AIRFLOW_CONN_PGDR_RESTORE": servers[0].restore_connection_uri(),
            "AIRFLOW_CONN_PGDR_S3": aws_connection(moto_port)
            .replace("testing-key", "bench")
            .replace("testing-secret", "bench"),
            "AIRFLOW_CONN_PGDR_SLACK": slack.connection(),
            "AIRFLOW_CONN_PGDR_SMTP": mail.connection(),
        }
        with psycopg.connect(**servers[0].dsn(databases[0]["name"])) as conn:
            db_size_mb = conn.execute("SELECT pg_database_size(current_database()) / 1e6").fetchone()[0]
        cluster = CeleryCluster(work / "airflow", meta, connections, plan_path).start()
        slots = len(cluster.workers) * int(cluster.settings.get("AIRFLOW__CELERY__WORKER_CONCURRENCY", "16"))
        unpause_verification(cluster)
        measured = [one_round(cluster, size, slots) for _ in range(rounds)]
    finally:
        if cluster:
            cluster.stop()
        moto.stop()
        slack.close()
        mail.close()
        for server in [*servers, meta]:
            server.destroy()
    overheads = [m["elapsed_s"] / (m["task_seconds"] / slots) - 1 for m in measured]
    median = sorted(range(len(measured)), key=lambda i: overheads[i])[len(measured) // 2]
    return {
        "overhead": round(overheads[median], 4),
        "overheads": [round(o, 4) for o in overheads],
        "databases": size,
        "servers": 2,
        "workers": 2,
        "worker_slots": slots,
        "db_size_mb": round(float(db_size_mb)),
        **measured[median],
        "definition": "elapsed / (sum of task durations / worker slots) - 1, from the backup run's start to the "
        "last verification's end",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def unpause_verification(cluster, appear_s: float = 30, settle_s: float = 300) -> None:
    """Unpause ``pgdr_verify_restore`` as a deployment has it, and let the daily run the scheduler creates for the
    last interval on unpausing (catchup=False) finish before the rounds: a round measures the fleet's backup and
    the verifications its events start, not a catch-up that a running deployment did long before."""
    cluster.api("PATCH", "/api/v2/dags/pgdr_verify_restore", {"is_paused": False})
    appear, settle = time.monotonic() + appear_s, time.monotonic() + settle_s
    while time.monotonic() < settle:
        runs = verify_runs(cluster)
        if not runs and time.monotonic() > appear:
            return
        if runs and all(r["state"] in ("success", "failed") for r in runs):
            return
        time.sleep(1)
    raise TimeoutError(f"pgdr_verify_restore's catch-up run did not finish within {settle_s:.0f}s of unpausing")


def one_round(cluster, size: int, slots: int) -> dict:
    """One backup run of the fleet and the verification runs it starts; return their timings."""
    before = {r["dag_run_id"] for r in verify_runs(cluster)}
    run_id = cluster.trigger("pgdr_backup")
    backup = cluster.wait_for_run("pgdr_backup", run_id, timeout=1800)
    if backup["state"] != "success":
        raise RuntimeError(f"the fleet backup failed: {backup['task_states']}")
    deadline = time.monotonic() + 3600
    while True:
        runs = [r for r in verify_runs(cluster) if r["dag_run_id"] not in before]
        verified = sum(
            1
            for r in runs
            if r["state"] in ("success", "failed")
            for t in cluster.task_instances(
                "pgdr_verify_restore", r["dag_run_id"], task_id="verify.record_verification"
            )
            if t["state"] == "success"
        )
        if verified >= size and all(r["state"] in ("success", "failed") for r in runs):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{verified} of {size} backups verified after an hour")
        time.sleep(5)
    tis = cluster.task_instances("pgdr_backup", run_id)
    for r in runs:
        tis += cluster.task_instances("pgdr_verify_restore", r["dag_run_id"])
    start = datetime.fromisoformat(backup["start_date"])
    end = max(datetime.fromisoformat(r["end_date"]) for r in runs)

    def waits(since: str, until: str) -> list[float]:  # per task, seconds between two of its timestamps
        return [
            (datetime.fromisoformat(t[until]) - datetime.fromisoformat(t[since])).total_seconds()
            for t in tis
            if t.get(since) and t.get(until)
        ]

    return {
        "elapsed_s": round((end - start).total_seconds(), 1),
        "task_seconds": round(sum(t["duration"] or 0 for t in tis), 1),
        "backup_run_s": round((datetime.fromisoformat(backup["end_date"]) - start).total_seconds(), 1),
        "verify_runs": len(runs),
        "tasks": len(tis),
        "median_task_s": round(statistics.median(t["duration"] for t in tis if t["duration"]), 2),
        # Where a task's time outside its work goes: the scheduler deciding it may run (scheduled), sending it to
        # the broker (queued), a worker starting it (start_date): medians over the round's task instances.
        "median_scheduled_to_queued_s": round(statistics.median(waits("scheduled_when", "queued_when") or [0]), 2),
        "median_queued_to_start_s": round(statistics.median(waits("queued_when", "start_date") or [0]), 2),
        "idle_slot_s": idle_slots(tis, start, end, slots),
    }


def idle_slots(tis: list[dict], start: datetime, end: datetime, slots: int) -> dict[str, float]:
    """Where the worker slots' idle time goes, in slot-seconds over ``start`` .. ``end`` (the overhead's numerator):
    ``waiting_to_start`` while some task is queued or scheduled but not yet running (the broker, the worker's fork,
    the task's start-up), ``nothing_ready`` while no task is (the scheduler noticing a task ended and deciding what
    may run next, and the runs' serial heads and tails)."""

    def at(t: dict, key: str) -> float | None:
        return (datetime.fromisoformat(t[key]) - start).total_seconds() if t.get(key) else None

    events = sorted(
        {0.0, (end - start).total_seconds()}
        | {
            v
            for t in tis
            for k in ("scheduled_when", "queued_when", "start_date", "end_date")
            if (v := at(t, k)) is not None and 0 <= v
        }
    )
    spans = [
        (
            ready if (ready := at(t, "scheduled_when")) is not None else at(t, "queued_when"),
            at(t, "start_date"),
            at(t, "end_date"),
        )
        for t in tis
    ]
    idle = {"waiting_to_start": 0.0, "nothing_ready": 0.0}
    for a, b in itertools.pairwise(events):
        mid = (a + b) / 2
        running = sum(1 for _, s, e in spans if s is not None and e is not None and s <= mid < e)
        ready = sum(1 for r, s, _ in spans if r is not None and r <= mid and (s is None or mid < s))
        free = max(0, slots - running)
        if free:
            idle["waiting_to_start" if ready else "nothing_ready"] += free * (b - a)
    return {k: round(v, 1) for k, v in idle.items()}


def verify_runs(cluster) -> list[dict]:
    return cluster.api("GET", "/api/v2/dags/pgdr_verify_restore/dagRuns?limit=100&order_by=-run_after")["dag_runs"]


if __name__ == "__main__":
    main()
