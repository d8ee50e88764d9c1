"""pgdr on a real distributed Airflow: CeleryExecutor, Redis, PostgreSQL metadata, two workers.

The tests share one deployment and run in file order: the fleet (backup, then verify-restore of
every backup), deadline alerts, a worker killed during ``pg_restore``, then Redis stopped and the
scheduler restarted during fleet backups.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from support import aws_connection, wait_for

from on_celery.conftest import FLEET_A, FLEET_B, ODD_DBNAMES, RTO_SECONDS, fleet_rows  # noqa: I001

pytestmark = pytest.mark.celery

FLEET = FLEET_A + FLEET_B


@pytest.fixture
def catalogs(celery_plan, s3_server, monkeypatch):
    """Return a function giving the backup catalog of a database in the deployment's store."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.plan import load_plan

    monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3", aws_connection(s3_server.port))
    plan = load_plan(celery_plan)
    store, layout = open_store(plan.databases[0].storage, plan)
    return lambda name: BackupCatalog(store, layout, name)


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def _interval(ti: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"])


def _backups_of_run(catalogs, names: list[str], run_id: str) -> dict[str, list]:
    return {n: [e for e in catalogs(n).backups() if e.manifest.airflow.get("run_id") == run_id] for n in names}


def _verify_runs(cluster) -> list[dict]:
    return cluster.api("GET", "/api/v2/dags/pgdr_verify_restore/dagRuns?limit=100&order_by=-run_after")["dag_runs"]


def _wait_until_verify_runs_end(cluster, timeout: float) -> None:
    wait_for(
        lambda: all(r["state"] in ("success", "failed") for r in _verify_runs(cluster)), timeout=timeout, interval=3
    )


# The sum of its own waits (backup run 900 s, verifications 1,500 s, runs ending 300 s), so that they, which
# say what was still missing, trip first: beside the other xdist worker's tests it takes about 1,250 s here.
@pytest.mark.timeout(900 + 1500 + 300)
def test_fleet_of_fifty_backed_up_and_verified_once_each_on_both_workers(
    celery_cluster, catalogs, pg_server, pg_server_b
):
    run_id = celery_cluster.trigger("pgdr_backup")
    celery_cluster.api("PATCH", "/api/v2/dags/pgdr_verify_restore", {"is_paused": False})  # asset-triggered
    run = celery_cluster.wait_for_run("pgdr_backup", run_id, timeout=900)
    assert run["state"] == "success", run["task_states"]

    backups = _backups_of_run(catalogs, FLEET, run_id)
    for name in FLEET:
        assert len(backups[name]) == 1, name
        assert backups[name][0].manifest.row_counts == {'public."Konten"': fleet_rows(name)}, name

    # One dump at a time more than max_dumps_per_server never ran against one server.
    backup_tis = celery_cluster.task_instances("pgdr_backup", run_id)
    for server in ("fleet_a", "fleet_b"):
        dumps = [t for t in backup_tis if t["task_id"] == f"protect_{server}.back_up"]
        assert len(dumps) == 25 and {t["pool"] for t in dumps} == {f"pgdr_{server}"}
        assert 1 <= max_overlap([_interval(t) for t in dumps]) <= 2, server

    # Every backup of the run is verified, exactly once, by asset-triggered runs.
    def all_verified():
        entries = {n: catalogs(n).backups()[-1] for n in FLEET}
        return all(e.status != "unverified" for e in entries.values()) and entries

    entries = wait_for(all_verified, timeout=1500, interval=5)
    _wait_until_verify_runs_end(celery_cluster, timeout=300)
    for name, entry in entries.items():
        assert entry.status == "verified", (name, entry.verification)
        assert entry.verification.integrity["rows_checked"] == fleet_rows(name), name
        assert entry.verification.integrity["amcheck_ok"] is True, name
    verify_tis = [
        t
        for r in _verify_runs(celery_cluster)
        if r["run_type"] == "asset_triggered"
        for t in celery_cluster.task_instances(
            "pgdr_verify_restore", r["dag_run_id"], task_id="verify.record_verification"
        )
    ]
    recorded = [t["rendered_map_index"].split()[0] for t in verify_tis if t["state"] == "success"]
    assert sorted(n for n in recorded if n in FLEET) == sorted(FLEET)  # each verified once, none twice

    ran = [t for t in backup_tis + verify_tis if t["state"] in ("success", "failed")]
    hosts = {t["hostname"] for t in ran}
    assert hosts == set(celery_cluster.workers), hosts  # both workers did work, nothing ran elsewhere
    # Scratch databases: none left on either server.
    for server in (pg_server, pg_server_b):
        with psycopg.connect(**server.dsn("postgres")) as conn:
            left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'pgdr\\_%'").fetchall()
        assert left == []
    # The odd names went through the plan, pg_dump and pg_restore quoted.
    for name in ODD_DBNAMES:
        assert entries[name].status == "verified"


def test_deadline_alerts_come_from_the_triggerer_one_email_and_one_slack_message(
    celery_cluster, newest_backup, celery_mail, celery_slack, celery_plan
):
    from pgdr.plan import load_plan

    backup_id = newest_backup("shop")
    run_id = celery_cluster.trigger("pgdr_verify_restore", {"database": "shop", "backup_id": backup_id})
    run = celery_cluster.wait_for_run("pgdr_verify_restore", run_id, timeout=300)
    assert run["state"] == "success", run["task_states"]

    emails = wait_for(lambda: [m for m in celery_mail.messages if run_id in celery_mail.body(m)], timeout=60)
    assert len(emails) == 1
    databases = len(load_plan(celery_plan).databases)  # the fleet of 50, shop, ledger, dbhost's app
    assert emails[0]["Subject"] == f"[pgdr] SLA missed: pgdr_verify_restore {databases} databases (RTO {RTO_SECONDS}s)"
    assert f"{celery_cluster.base_url}/dags/pgdr_verify_restore/runs/" in celery_mail.body(emails[0])
    texts = [t for t in celery_slack.texts() if run_id in t]
    missed = wait_for(lambda: [t for t in celery_slack.texts() if run_id in t and "SLA missed" in t], timeout=60)
    assert len(missed) == 1 and missed[0].startswith(":rotating_light: [pgdr] SLA missed: pgdr_verify_restore")
    assert len([t for t in texts if "SLA at risk" in t]) == 1
    # The callbacks ran in the triggerer (it logs each one's result), not in a worker.
    triggerer_log = (celery_cluster.root / "triggerer.log").read_text(errors="replace")
    assert "'body': 'SLA-miss e-mail sent to oncall@example.com'" in triggerer_log
    assert "'body': 'slack miss sent'" in triggerer_log
    assert not any("deadline_missed" in celery_cluster.task_log(w) for w in celery_cluster.workers)


def test_great_expectations_is_imported_once_per_worker_not_once_per_task(celery_cluster, newest_backup):
    """The workers import it before they fork (pgdr.airflow_glue.celery_config): every validate_data task that ran
    in this deployment found it in memory, none imported it again."""
    backup_id = newest_backup("shop")
    run_id = celery_cluster.trigger("pgdr_verify_restore", {"database": "shop", "backup_id": backup_id})
    run = celery_cluster.wait_for_run("pgdr_verify_restore", run_id, timeout=300)
    assert run["state"] == "success", run["task_states"]
    logs = "".join(celery_cluster.task_log(w) for w in celery_cluster.workers)
    assert "Great Expectations already in memory (imported by the worker before it forked this task)" in logs
    assert "Great Expectations imported in" not in logs


def _pg_restore_on_a_worker(cluster) -> str | None:
    for worker in cluster.workers:
        if "pg_restore" in cluster.processes_of(worker).values():
            return worker
    return None


def _scratch_databases(server, database: str) -> list[str]:
    with psycopg.connect(**server.dsn("postgres")) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"pgdr\\_verify\\_{database}\\_%",)
        )
        return [r[0] for r in rows]


@pytest.fixture
def newest_backup(celery_plan, catalogs, pg_server, session_dir):
    """Return a function giving the newest backup id of a database (taken there and then if it has none)."""

    def newest(name: str) -> str:
        entries = catalogs(name).backups()
        if entries:
            return entries[-1].backup_id
        from pgdr.airflow_glue.connections import open_store
        from pgdr.logical.backup import take_backup
        from pgdr.plan import load_plan
        from pgdr.postgres.client import PgEndpoint

        plan = load_plan(celery_plan)
        db = plan.database(name)
        store, layout = open_store(db.storage, plan)
        endpoint = PgEndpoint("127.0.0.1", pg_server.port, "postgres", db.dbname or name, pg_server.password)
        return take_backup(db, endpoint, store, layout, session_dir / f"{name}-work").manifest.backup_id

    return newest


def _no_verification_running(cluster) -> bool:
    return all(r["state"] in ("success", "failed") for r in _verify_runs(cluster))


def test_worker_killed_during_pg_restore_the_retry_verifies_on_the_other_worker(
    celery_cluster, catalogs, pg_server, newest_backup
):
    backup_id = newest_backup("ledger")
    wait_for(lambda: _no_verification_running(celery_cluster), timeout=600, interval=2)
    run_id = celery_cluster.trigger("pgdr_verify_restore", {"database": "ledger", "backup_id": backup_id})
    victim = wait_for(lambda: _pg_restore_on_a_worker(celery_cluster), timeout=300, interval=0.1)
    survivor = next(w for w in celery_cluster.workers if w != victim)
    scratch = _scratch_databases(pg_server, "ledger")
    assert len(scratch) == 1
    celery_cluster.kill_worker(victim)
    try:
        assert celery_cluster.processes_of(victim) == {}  # nothing of that "machine" runs on
        run = celery_cluster.wait_for_run("pgdr_verify_restore", run_id, timeout=600)
        assert run["state"] == "success", run["task_states"]
        tries = celery_cluster.api(
            "GET",
            f"/api/v2/dags/pgdr_verify_restore/dagRuns/{quote(run_id, safe='')}/taskInstances/"
            + "verify.restore_and_check/0/tries",
        )["task_instances"]
        by_try = {t["try_number"]: t for t in tries}
        assert (
            by_try[1]["hostname"] == victim and by_try[1]["state"] == "failed"
        )  # heartbeat lost: failed by the scheduler
        last = by_try[max(by_try)]
        assert last["hostname"] == survivor and last["state"] == "success"
        entry = catalogs("ledger").get(backup_id)
        assert entry.status == "verified" and entry.verification.airflow["run_id"] == run_id
        assert entry.verification.integrity["rows_checked"] == 3000000
        # The killed attempt's scratch database was the run's: the retry re-created it empty, the teardown dropped it.
        assert _scratch_databases(pg_server, "ledger") == []
    finally:
        celery_cluster.start_worker(victim)


def test_a_killed_run_leaves_a_scratch_database_that_the_next_run_drops(
    celery_cluster, catalogs, pg_server, newest_backup
):
    """A worker lost and the run given up by the on-call (marked failed): the next run cleans up."""
    backup_id = newest_backup("ledger")
    wait_for(lambda: _no_verification_running(celery_cluster), timeout=600, interval=2)
    first = celery_cluster.trigger("pgdr_verify_restore", {"database": "ledger", "backup_id": backup_id})
    victim = wait_for(lambda: _pg_restore_on_a_worker(celery_cluster), timeout=300, interval=0.1)
    left = _scratch_databases(pg_server, "ledger")
    celery_cluster.kill_worker(victim)
    try:
        celery_cluster.api(
            "PATCH", f"/api/v2/dags/pgdr_verify_restore/dagRuns/{quote(first, safe='')}", {"state": "failed"}
        )
        time.sleep(10)
        # Airflow may still run the given-up run's teardown (drop_scratch); if it did not, the
        # scratch database is a leftover, and the next run must drop it.
        leftover = _scratch_databases(pg_server, "ledger") == left
        second = celery_cluster.trigger("pgdr_verify_restore", {"database": "ledger", "backup_id": backup_id})
        run = celery_cluster.wait_for_run("pgdr_verify_restore", second, timeout=600)
        assert run["state"] == "success", run["task_states"]
        assert _scratch_databases(pg_server, "ledger") == []
        if leftover:
            logs = "".join(celery_cluster.task_log(w) for w in celery_cluster.workers)
            assert "Dropped scratch database" in logs and left[0] in logs
        else:
            teardown = celery_cluster.task_instances("pgdr_verify_restore", first, task_id="verify.drop_scratch")
            assert [t["state"] for t in teardown] == ["success"]
    finally:
        celery_cluster.start_worker(victim)


def _succeeded(cluster, run_id: str) -> int:
    return sum(
        t["state"] == "success"
        for t in cluster.task_instances("pgdr_backup", run_id)
        if t["task_id"].endswith("back_up")
    )


def test_redis_stopped_and_scheduler_restarted_during_a_fleet_backup_nothing_lost_nothing_twice(
    celery_cluster, catalogs
):
    celery_cluster.api("PATCH", "/api/v2/dags/pgdr_verify_restore", {"is_paused": True})
    names = ["shop", "ledger", *FLEET]
    run_id = celery_cluster.trigger("pgdr_backup")
    wait_for(lambda: _succeeded(celery_cluster, run_id) >= 5, timeout=300, interval=1)
    celery_cluster.stop_redis()
    time.sleep(15)
    celery_cluster.start_redis()
    wait_for(lambda: _succeeded(celery_cluster, run_id) >= 25, timeout=600, interval=1)
    celery_cluster.restart("scheduler")
    run = celery_cluster.wait_for_run("pgdr_backup", run_id, timeout=900)
    assert run["state"] == "success", run["task_states"]

    for name in names:
        catalog = catalogs(name)
        complete, partial = catalog.scan()
        mine = [e for e in complete if e.manifest.airflow.get("run_id") == run_id]
        assert len(mine) == 1, (name, [e.backup_id for e in mine])
        assert partial == [], name  # no half-written backup left behind by a lost message or a restart
        assert len({e.backup_id for e in complete}) == len(complete)


def test_mode_server_from_the_form_runs_on_the_new_hosts_worker_and_brings_the_server_back(celery_cluster, dbhost):
    """#28: the form's mode ``server`` sends the recovery to the queue the plan names for the server
    (``servers.dbhost.restore.queue``). A third worker, started "on the new host" and serving only that queue,
    recovers the whole server there to a second between two heartbeats and promotes it, the application's login
    working; every other task of the run stays on the fleet's workers."""
    import os
    import subprocess

    from pgdr.postgres.binaries import server_bin_dir_for

    from on_celery.conftest import DBHOST, NEW_HOST_QUEUE, NEW_HOST_WORKER

    restore = dbhost["restore"]
    celery_cluster.start_worker(NEW_HOST_WORKER, queues=NEW_HOST_QUEUE)
    target = dbhost["target"].strftime("%Y-%m-%d %H:%M:%S")
    conf = {"database": "dbhost_app", "mode": "server", "confirm": DBHOST, "backup": target}
    run_id = celery_cluster.trigger("pgdr_restore", conf)
    try:
        run = celery_cluster.wait_for_run("pgdr_restore", run_id, timeout=600)
        assert run["state"] == "success", (run["task_states"], celery_cluster.log_tail(NEW_HOST_WORKER))
        tis = celery_cluster.task_instances("pgdr_restore", run_id)
        (recovery,) = [t for t in tis if t["task_id"] == f"recover_server_{DBHOST}"]
        assert recovery["state"] == "success" and recovery["queue"] == NEW_HOST_QUEUE, recovery
        assert recovery["hostname"] == NEW_HOST_WORKER, recovery
        others = {t["hostname"] for t in tis if t["state"] == "success" and t is not recovery}
        assert others and others <= set(celery_cluster.workers), others

        # The application's own login, on the new host's port: its table, every row up to the target, none after.
        dsn = {"host": "127.0.0.1", "port": restore["port"], "dbname": "app"}
        with psycopg.connect(**dsn, user="app_owner", password="owner-secret") as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
            labels = [r[0] for r in conn.execute("SELECT label FROM events ORDER BY id")]
            conn.execute("INSERT INTO events (label) VALUES ('written after the recovery')")  # it is the owner
        assert labels == ["before the base backup", "after the base backup"]
    finally:
        if (Path(restore["data_dir"]) / "postmaster.pid").exists():
            user = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
            pg_ctl = str(server_bin_dir_for(180000) / "pg_ctl")
            subprocess.run([pg_ctl, "-D", restore["data_dir"], "-m", "fast", "-w", "stop"], capture_output=True, **user)
