"""Backups from a hot standby (#31 item 3): a real streaming replica of the embedded server (pg_basebackup -R)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import psycopg
import pytest
from conftest import planned_database

pytestmark = pytest.mark.integration


def _one(server, sql: str, params=(), database: str = "shop"):
    with psycopg.connect(**server.dsn(database), autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchone() if cursor.description else None


def _wait_replayed(pg_server, pg_replica, timeout: float = 30) -> None:
    """Wait until the replica has replayed everything the primary has written so far."""
    (lsn,) = _one(pg_server, "SELECT pg_current_wal_insert_lsn()::text")
    deadline = time.monotonic() + timeout
    while not _one(pg_replica, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))[0]:
        assert time.monotonic() < deadline, "the replica did not catch up"
        time.sleep(0.1)


@contextmanager
def _replay_paused(pg_replica):
    _one(pg_replica, "SELECT pg_wal_replay_pause()")
    deadline = time.monotonic() + 30
    while _one(pg_replica, "SELECT pg_get_wal_replay_pause_state()")[0] != "paused":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        yield
    finally:
        _one(pg_replica, "SELECT pg_wal_replay_resume()")


@pytest.fixture
def beats(pg_server, pg_replica):
    """A heartbeat table in the primary's shop (dropped after): ``beat()`` commits a row and returns the primary's
    time just before (the commit's time is after it, and before the next beat's)."""
    _one(pg_server, "CREATE TABLE public.standby_beats (n int)")

    def beat(n: int):
        with psycopg.connect(**pg_server.dsn("shop")) as conn:
            (at,) = conn.execute("SELECT clock_timestamp()").fetchone()
            conn.execute("INSERT INTO public.standby_beats VALUES (%s)", (n,))
        return at

    yield beat
    _one(pg_server, "DROP TABLE public.standby_beats")
    _wait_replayed(pg_server, pg_replica)


def test_a_backup_from_a_replica_holds_what_it_replayed_dated_by_its_last_transaction_and_verifies(
    plan, run_dag, pg_server, pg_replica, env, monkeypatch, beats
):
    """The standby's replay is paused after beat 1; beat 2 is on the primary only. The backup is taken there: it
    holds beat 1, not beat 2, its recovery point is the replica's last replayed commit (between the two beats), not
    the standby's clock; then it verifies (restored, counted, amcheck'd, validated) like any backup."""
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    monkeypatch.setenv("AIRFLOW_CONN_PGDR_SHOP_STANDBY", pg_replica.connection_uri("shop"))
    p = plan(databases=[{"name": "shop", "conn_id": "pgdr_shop", "source_conn_id": "pgdr_shop_standby"}])
    before = beats(1)
    _wait_replayed(pg_server, pg_replica)
    with _replay_paused(pg_replica):
        (replayed,) = _one(pg_replica, "SELECT pg_last_xact_replay_timestamp()")
        after = beats(2)
        dag_run = run_dag("pgdr_backup")
    assert dag_run.states["protect_pgdr_shop.back_up[0]"] == "success", dag_run.states
    store, layout = open_store(p.databases[0].storage)
    catalog = BackupCatalog(store, layout, "shop")
    manifest = catalog.latest().manifest
    assert manifest.row_counts["public.standby_beats"] == 1  # beat 2 was never replayed there
    assert manifest.recovery_point == replayed and before <= replayed < after
    with create_session() as session:
        (summary,) = [e.extra for e in session.query(AssetEvent).all() if e.source_run_id == dag_run.run_id]
    assert summary["source"] == "standby" and summary["source_conn_id"] == "pgdr_shop_standby"
    assert summary["backup_id"] == manifest.backup_id and 0 < summary["standby_lag_s"] < 300

    verified = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "backup_id": manifest.backup_id})
    assert verified.states["verify.record_verification[0]"] == "success", verified.states
    assert catalog.get(manifest.backup_id).status == "verified"


def test_a_replica_that_has_replayed_everything_dates_its_backup_by_the_primarys_clock(
    pg_server, pg_replica, tmp_path, beats
):
    """Caught up, the standby's data is the primary's as of the moment just before the snapshot (an idle primary
    must not make a fresh backup look as old as its last transaction)."""
    from conftest import local_backup_setup
    from pgdr.logical.backup import take_backup
    from pgdr.postgres.client import PgEndpoint
    from pgdr.storage.layout import BackupLayout

    last = beats(1)
    _wait_replayed(pg_server, pg_replica)
    time.sleep(1.1)
    db, primary, store = local_backup_setup(tmp_path, pg_server, store_root=tmp_path / "store")
    standby = PgEndpoint("127.0.0.1", pg_replica.port, "postgres", "shop", pg_replica.password)
    (tmp_path / "work").mkdir()
    (started,) = _one(pg_server, "SELECT now()")
    manifest = take_backup(db, standby, store, BackupLayout(), tmp_path / "work", primary=primary).manifest
    assert manifest.recovery_point >= started > last
    assert manifest.row_counts["public.standby_beats"] == 1


def test_a_standby_lagging_past_the_plan_is_not_used(
    plan, run_dag, pg_server, pg_replica, env, monkeypatch, beats, slack
):
    """on_standby_lag: primary (default) backs up from the primary and warns in Slack, naming the lag; fail fails."""
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_SHOP_STANDBY", pg_replica.connection_uri("shop"))
    database = {"name": "shop", "conn_id": "pgdr_shop", "source_conn_id": "pgdr_shop_standby", "max_standby_lag": "1s"}
    plan(databases=[database])
    beats(1)
    _wait_replayed(pg_server, pg_replica)
    with _replay_paused(pg_replica):
        beats(2)
        time.sleep(1.5)
        dag_run = run_dag("pgdr_backup")
        assert dag_run.states["protect_pgdr_shop.back_up[0]"] == "success", dag_run.states
        (warning,) = [t for t in slack.texts() if "not its standby" in t]
        assert warning.startswith(
            ":warning: [pgdr] The backup of database 'shop' was taken from the primary, not its standby "
            "(source_conn_id pgdr_shop_standby):"
        )
        assert "behind the primary (max_standby_lag 1.0s)" in warning

        plan(databases=[{**database, "on_standby_lag": "fail"}])
        failed = run_dag("pgdr_backup")
    assert failed.states["protect_pgdr_shop.back_up[0]"] == "failed", failed.states
    assert any("The plan says on_standby_lag: fail, so nothing was read from the primary" in t for t in slack.texts())


def test_a_source_that_is_not_a_standby_or_cannot_be_reached_is_not_used(pg_server, tmp_path):
    from dataclasses import replace

    from pgdr.logical.standby import StandbyNotUsable, choose_source
    from pgdr.postgres.binaries import free_port
    from pgdr.postgres.client import PgEndpoint

    db = replace(planned_database(tmp_path), source_conn_id="pgdr_shop_standby")
    primary = PgEndpoint("127.0.0.1", pg_server.port, "postgres", "shop", pg_server.password)
    promoted = choose_source(db, primary, primary)
    assert promoted.endpoint is primary and promoted.role == "primary"
    assert "is not a standby (pg_is_in_recovery() is false): it was promoted" in promoted.note
    gone = PgEndpoint("127.0.0.1", free_port(), "postgres", "shop", "x")
    unreachable = choose_source(db, primary, gone)
    assert unreachable.endpoint is primary and "could not be asked for its lag" in unreachable.note
    with pytest.raises(StandbyNotUsable, match="on_standby_lag: fail"):
        choose_source(replace(db, on_standby_lag="fail"), primary, gone)
    assert choose_source(db, primary, None) == type(promoted)(primary)  # no standby named: the primary, no note


def test_the_standby_keys_are_checked_in_the_plan(tmp_path):
    from pgdr.plan import PlanError

    db = planned_database(tmp_path, source_conn_id="pgdr_shop_standby")
    assert db.source_conn_id == "pgdr_shop_standby"
    assert db.max_standby_lag.total_seconds() == 300 and db.on_standby_lag == "primary"
    assert planned_database(tmp_path, max_standby_lag="30s", on_standby_lag="fail").on_standby_lag == "fail"
    with pytest.raises(PlanError, match=r"on_standby_lag: expected primary .* or fail .*, got 'never'"):
        planned_database(tmp_path, on_standby_lag="never")
    with pytest.raises(PlanError, match=r"source_conn_id: expected an Airflow connection id"):
        planned_database(tmp_path, source_conn_id="no spaces please")


def test_health_reports_the_standbys_lag_and_alerts_past_the_plan(
    plan, run_dag, pg_server, pg_replica, env, monkeypatch, beats, slack
):
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_SHOP_STANDBY", pg_replica.connection_uri("shop"))
    plan(
        databases=[
            {"name": "shop", "conn_id": "pgdr_shop", "source_conn_id": "pgdr_shop_standby", "max_standby_lag": "1s"}
        ]
    )
    beats(1)
    _wait_replayed(pg_server, pg_replica)
    run_dag("pgdr_health")
    assert not [t for t in slack.texts() if "standby_lag" in t]  # caught up: fine, not news
    with _replay_paused(pg_replica):
        beats(2)
        time.sleep(1.5)
        slack.clear()
        run_dag("pgdr_health")
    (alert,) = slack.texts()
    assert alert.startswith(":red_circle: [pgdr] health check failing:")
    assert (
        f"shop: standby_lag: database 'shop' at 127.0.0.1:{pg_replica.port} as user 'postgres' (Airflow connection "
        "'pgdr_shop_standby') lags " in alert
    )
    assert "behind the primary (max_standby_lag 1.0s): backups are taken from the primary meanwhile" in alert
    _wait_replayed(pg_server, pg_replica)
    slack.clear()
    run_dag("pgdr_health")
    (recovery,) = slack.texts()
    assert (
        recovery.startswith(":large_green_circle: [pgdr] health check recovered:") and "shop: standby_lag:" in recovery
    )
