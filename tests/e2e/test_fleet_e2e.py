"""Scale-out under a real scheduler: twenty databases on one server, one DAG run, the pool limit holds."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from urllib.parse import quote

import psycopg
import pytest
from conftest import E2E_MASTER_KEY, FLEET

pytestmark = pytest.mark.e2e


def _max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    events = sorted(
        [(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals], key=lambda e: (e[0], e[1])
    )
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_fleet_backup_one_run_one_backup_each_and_the_pool_limit_held(standalone, e2e_plan, pg_server):
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.plan import load_plan

    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE flaky TEMPLATE shop")  # the whole plan backs up cleanly
    try:
        run_id = standalone.trigger("pgdr_backup")
        run = standalone.wait_for_run("pgdr_backup", run_id, timeout=600)
    finally:
        with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS flaky WITH (FORCE)")
    assert run["state"] == "success", run["task_states"]

    plan = load_plan(e2e_plan)
    store, layout = open_store(plan.databases[0].storage)
    for name in FLEET:
        mine = [e for e in BackupCatalog(store, layout, name).backups() if e.manifest.airflow.get("run_id") == run_id]
        assert len(mine) == 1, name
        assert mine[0].manifest.row_counts == {"public.accounts": 100 + FLEET.index(name)}
        assert mine[0].manifest.encryption.key_id == "e2e-key-1", name  # encrypted client-side
    # The workers read the master key from their connection; no task log holds it, in any form.
    logs = [p for p in (standalone.home / "logs").rglob("*") if p.is_file()]
    texts = [p.read_bytes() for p in logs]
    assert any(b"is encrypted (AES-256-GCM)" in t for t in texts), "no backup task log found"
    assert not [
        p
        for p, t in zip(logs, texts, strict=True)
        if E2E_MASTER_KEY.encode() in t or base64.b64decode(E2E_MASTER_KEY) in t
    ]

    tis = standalone.api(
        "GET",
        f"/api/v2/dags/pgdr_backup/dagRuns/{quote(run_id, safe='')}/taskInstances?"
        + "task_id=protect_fleet.back_up&limit=100",
    )["task_instances"]
    assert len(tis) == len(FLEET) and {t["pool"] for t in tis} == {"pgdr_fleet"}
    intervals = [(datetime.fromisoformat(t["start_date"]), datetime.fromisoformat(t["end_date"])) for t in tis]
    assert 1 <= _max_overlap(intervals) <= 2  # max_dumps_per_server
    pool = standalone.api("GET", "/api/v2/pools/pgdr_fleet")
    assert pool["slots"] == 2 and json.dumps(pool).count("fleet_00") == 1
