"""pgdr_restore with dag.test(): restores that never destroy what is there."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import backup_into_local_store, source_row_counts
from pgdr.records import VerificationRecord
from pgdr.storage.layout import backup_id_time
from support import copy_backup_as

pytestmark = pytest.mark.integration


def _databases(pg_server) -> set[str]:
    with psycopg.connect(**pg_server.dsn("postgres")) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE NOT datistemplate")}


def _sql(pg_server, sql: str, db: str = "postgres"):
    with psycopg.connect(**pg_server.dsn(db), autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else None


@pytest.fixture(scope="module")
def shop_backup(tmp_path_factory, pg_server, airflow_db):
    """A real backup of 'shop', verified, in a store each test copies."""
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.storage.backends import LocalFolderStore
    from pgdr.storage.layout import BackupLayout

    root = tmp_path_factory.mktemp("restore-store")
    backup_id = backup_into_local_store(root, pg_server)
    BackupCatalog(LocalFolderStore(root), BackupLayout(), "shop").record_verification(
        VerificationRecord.from_dict({"backup_id": backup_id, "status": "verified", "restore_seconds": 4.2})
    )
    return root, backup_id


@pytest.fixture
def restore_plan(plan, shop_backup, pg_server):
    """A plan whose store holds the verified shop backup; drops what restores created."""
    before = _databases(pg_server)
    p = plan()
    root = p.databases[0].storage.path
    shutil.copytree(shop_backup[0] / "v1", root / "v1")
    yield p, root, shop_backup[1]
    for name in _databases(pg_server) - before:
        _sql(pg_server, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        _sql(pg_server, f'DROP DATABASE "{name}" WITH (FORCE)')


def _restore(run_dag, **conf):
    return run_dag("pgdr_restore", run_conf={"database": "shop", **conf})


def _seconds(start: str, end: str) -> float:
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 1)


def _check_incident_measures(report: dict, declared: datetime, root, backup_id: str) -> None:
    """The incident's numbers of a replace restore, against the times known outside pgdr's report."""
    incident, phases = report["incident"], report["phase_seconds"]
    assert incident["id"] == "INC-7" and incident["declared_at"] == declared.isoformat() and incident["declared_given"]
    triggered = datetime.fromisoformat(incident["triggered_at"])
    assert timedelta(minutes=10) <= triggered - declared < timedelta(minutes=11)
    assert incident["time_to_act_seconds"] == round((triggered - declared).total_seconds(), 1)
    # Served by the swap: MTTR ends when swap_into_place ended; it is the sum of its parts (each rounded to 0.1 s).
    assert incident["served_by"] == "the swap" and "swap_into_place" in phases
    assert incident["mttr_seconds"] == _seconds(declared.isoformat(), incident["served_at"])
    parts = ("time_to_act_seconds", "time_to_restore_seconds", "time_to_serve_seconds")
    assert abs(incident["mttr_seconds"] - sum(incident[p] for p in parts)) <= 0.2
    assert incident["mttr_seconds"] >= 600 + report["achieved_rto_seconds"] - 1
    # The data lost: from the backup's recovery point to the declared failure.
    recovery_point = datetime.fromisoformat(report["plan"]["recovery_point"])
    assert incident["data_loss_until"] == declared.isoformat()
    assert incident["data_loss_window_seconds"] == round((declared - recovery_point).total_seconds(), 1) == 3000.0
    markdown = next((root / "v1/shop" / backup_id / "restores").glob("*.md")).read_text()
    assert "- Incident INC-7: MTTR " in markdown and "## Incident INC-7" in markdown
    assert f"| declared | {declared.isoformat()} |" in markdown
    assert "the transactions of the data-loss window are in it" in markdown
    # Its record for the drill's MTTR trend, outside the backup's prefix (backup retention never deletes it).
    from pgdr.incident_review import incident_records
    from pgdr.storage.backends import LocalFolderStore
    from pgdr.storage.layout import BackupLayout

    (record,) = incident_records(LocalFolderStore(root), BackupLayout(), declared - timedelta(days=1))
    assert record["id"] == "INC-7" and record["mttr_seconds"] == incident["mttr_seconds"]
    assert record["mode"] == "replace" and record["subject"] == "shop" and record["status"] == "restored"


def _report(root, backup_id) -> dict:
    (path,) = (root / "v1/shop" / backup_id / "restores").glob("*.json")
    return json.loads(path.read_text())


def test_new_database_restore_equals_the_source(restore_plan, run_dag, pg_server, slack):
    _p, root, backup_id = restore_plan
    dag_run = _restore(run_dag, target_name="shop_incident_copy")
    assert dag_run.states["write_report"] == "success", dag_run.states
    assert dag_run.states["swap_into_place"] == "skipped"
    assert source_row_counts(pg_server, "shop_incident_copy") == source_row_counts(pg_server, "shop")
    assert _sql(pg_server, "SELECT count(*) FROM pg_largeobject_metadata", "shop_incident_copy") == [(1,)]

    report = _report(root, backup_id)
    assert report["status"] == "restored" and report["plan"]["backup_id"] == backup_id
    assert report["plan"]["backup_status"] == "verified" and report["plan"]["expected_seconds"] == 4.2
    assert report["final_state"]["live"]["exists"] and report["final_state"]["restored"]["name"] == "shop_incident_copy"
    assert report["rto_met"] is True and report["validation"]["failed"] == 0
    # No incident time given: the incident counts from the trigger; the copy is served when handed over.
    incident = report["incident"]
    assert incident["declared_at"] == incident["triggered_at"] and incident["time_to_act_seconds"] == 0
    assert (
        incident["served_at"] == report["written_at"] and incident["served_by"] == "the hand-over of the checked copy"
    )
    assert incident["mttr_seconds"] == _seconds(incident["triggered_at"], report["written_at"])
    assert incident["data_loss_until_source"] == "the trigger (no failure time was given)"
    markdown = next((root / "v1/shop" / backup_id / "restores").glob("*.md")).read_text()
    assert markdown.startswith("# Restore of `shop`: RESTORED")
    assert "## Post-incident review" in markdown and "- [ ] Root cause" in markdown
    (summary,) = slack.texts()
    assert "Restore of *shop* restored" in summary and "shop_incident_copy" in summary


def test_replace_keeps_the_old_database_and_puts_the_restored_one_in_place(
    plan, shop_backup, run_dag, pg_server, monkeypatch
):
    # A database of its own, so the shared 'shop' stays as the other tests expect it.
    _sql(pg_server, "CREATE DATABASE shop_live TEMPLATE shop")
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_SHOP_LIVE", pg_server.connection_uri("shop_live"))
    before = _databases(pg_server)
    try:
        p = plan(databases=[{"name": "shop", "conn_id": "pgdr_shop_live", "dbname": "shop_live"}])
        shutil.copytree(shop_backup[0] / "v1", p.databases[0].storage.path / "v1")
        # A change made after the backup: it must survive in the kept database.
        _sql(pg_server, "INSERT INTO audit.events (actor, action) VALUES ('after-backup', 'marker')", "shop_live")
        session = psycopg.connect(**pg_server.dsn("shop_live"))  # a client still connected to the live database

        # The incident was declared ten minutes before the restore was triggered, and the backup restored is an
        # hour old (a copy of the fixture's, with that recovery point).
        from pgdr.airflow_glue.connections import open_store
        from pgdr.logical.catalog import BackupCatalog

        now = datetime.now(UTC).replace(microsecond=0)
        declared, hour_old = now - timedelta(minutes=10), now - timedelta(hours=1)
        store, layout = open_store(p.databases[0].storage)
        hour_old_id = hour_old.strftime("%Y%m%dT%H%M%SZ") + "-0a0a0a"
        copy_backup_as(
            store, layout, BackupCatalog(store, layout, "shop").get(shop_backup[1]).manifest, hour_old_id, hour_old
        )
        dag_run = _restore(
            run_dag,
            mode="replace",
            confirm="shop_live",
            backup=hour_old_id,
            incident_declared_at=declared.isoformat(),
            incident_id="INC-7",
        )
        assert dag_run.states["swap_into_place"] == "success", dag_run.states
        assert dag_run.states["write_report"] == "success"
        with pytest.raises(psycopg.OperationalError):  # the swap ended the client's session
            session.execute("SELECT 1")
        session.close()
        kept = [n for n in _databases(pg_server) - before if n.startswith("shop_live_pre_restore_")]
        assert len(kept) == 1
        # The live name holds the restored data: the post-backup row is not there...
        assert _sql(pg_server, "SELECT count(*) FROM audit.events WHERE actor = 'after-backup'", "shop_live") == [(0,)]
        assert source_row_counts(pg_server, "shop_live") == source_row_counts(pg_server, "shop")
        # ...and the previous live database is kept, connections disabled, with that row in it.
        assert _sql(pg_server, f"SELECT datallowconn FROM pg_database WHERE datname = '{kept[0]}'") == [(False,)]
        _sql(pg_server, f'ALTER DATABASE "{kept[0]}" WITH ALLOW_CONNECTIONS true')
        assert _sql(pg_server, "SELECT count(*) FROM audit.events WHERE actor = 'after-backup'", kept[0]) == [(1,)]
        report = _report(p.databases[0].storage.path, hour_old_id)
        assert report["final_state"]["previous_live"]["name"] == kept[0]
        assert any("renamed to shop_live" in step for step in report["swap_steps"])
        assert report["plan"]["recovery_point"] == hour_old.isoformat()
        _check_incident_measures(report, declared, p.databases[0].storage.path, hour_old_id)
    finally:
        for name in _databases(pg_server) - before | {"shop_live"}:
            _sql(pg_server, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
            _sql(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_table_level_restore_brings_back_one_table_and_its_partitions(restore_plan, run_dag, pg_server):
    dag_run = _restore(run_dag, tables=["sales.orders"], target_name="shop_orders_only")
    assert dag_run.states["write_report"] == "success", dag_run.states
    restored = source_row_counts(pg_server, "shop_orders_only")
    source = source_row_counts(pg_server, "shop")
    assert restored["sales.orders"] == source["sales.orders"] == 30000
    assert restored["sales.orders_2026_h2"] == source["sales.orders_2026_h2"]
    assert restored["sales.customers"] == 0 and restored["sales.order_items"] == 0


def _dag_test_polls(monkeypatch) -> list[float]:
    """The seconds dag.test()'s own idle polls slept, recorded while they sleep (see pgdr.local.runner)."""
    import sys
    import time

    from airflow.sdk.definitions import dag as dag_module

    polls, sleep = [], time.sleep

    def recorded(seconds):
        caller = sys._getframe(2).f_code  # 1 is pgdr's brisk poll, 2 its caller
        if caller.co_name == "test" and caller.co_filename == dag_module.__file__:
            polls.append(seconds)
        sleep(seconds)

    monkeypatch.setattr(time, "sleep", recorded)
    return polls


def test_restore_as_of_a_time_picks_the_newest_backup_at_or_before_it(restore_plan, run_dag, monkeypatch):
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    p, root, backup_id = restore_plan
    store, layout = open_store(p.databases[0].storage)
    real = BackupCatalog(store, layout, "shop").get(backup_id).manifest
    for old_id in ("20260101T000000Z-aaaaaa", "20260301T000000Z-bbbbbb"):
        copy_backup_as(store, layout, real, old_id, backup_id_time(old_id), copy_data=False)

    polls = _dag_test_polls(monkeypatch)
    dag_run = _restore(run_dag, backup="2026-02-15T12:00:00Z", dry_run=True)
    assert dag_run.states["check_checksums"] == "skipped" and dag_run.states["write_report"] == "success"
    # The chain of skipped tasks is resolved a level per pass of dag.test()'s loop, each pass a brisk poll, not 1 s.
    from pgdr.local.runner import BRISK_POLL_S

    assert len(polls) >= 3 and set(polls) == {BRISK_POLL_S}, polls
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        value = (
            session.query(XComModel.value)
            .filter_by(dag_id="pgdr_restore", run_id=dag_run.run_id, task_id="plan_restore", key="return_value")
            .scalar()
        )
    planned = json.loads(value) if isinstance(value, str) else value
    assert planned["backup_id"] == "20260101T000000Z-aaaaaa"


# -- bad input: each fails in plan_restore, before anything is touched ---------------------------------


@pytest.mark.parametrize(
    "conf, message",
    [
        ({"backup": "20200101T000000Z-abcdef"}, "No complete backup '20200101T000000Z-abcdef' of database 'shop'"),
        (
            {"backup": "2001-01-01T00:00:00Z"},
            "No backup of database 'shop' has a recovery point at or before 2001-01-01T00:00:00+00:00",
        ),
        ({"backup": "yesterday"}, "'backup' must be latest-verified, latest, latest-dump, a backup id"),
        ({"mode": "replace"}, "To confirm, type the database name 'shop' in the 'confirm' field."),
        ({"mode": "replace", "confirm": "shopp"}, "(you typed 'shopp')"),
        ({"target_name": "shop"}, "target_name 'shop' is the live database's own name"),
        ({"target_name": "audit_copy"}, "The target database 'audit_copy' already exists"),
        ({"tables": ["sales.nope"]}, "Not a table of backup"),
        (
            {"mode": "replace", "confirm": "shop", "tables": ["sales.orders"]},
            "A table-level restore goes into a new database",
        ),
        ({"backup": "../../x"}, "'backup' must be latest-verified, latest, latest-dump, a backup id"),
        ({"backup": "20261122T093000Z-3fa2c1\x00"}, "got '20261122T093000Z-3fa2c1\\\\x00'"),
        ({"backup": "2999-01-01T00:00:00Z"}, "'backup' 2999-01-01T00:00:00+00:00 is in the future"),
        ({"tables": ["sales.customer_revenue"]}, "Views, materialized views and sequences are not tables"),
        ({"tables": ["SALES.ORDERS2"]}, "Not a table of backup"),
        ({"tables": ['"Sales".Orders']}, 'for "Sales".orders did you mean sales.orders?'),
        ({"tables": ['sales."orders']}, "has a double quote that is never closed"),
        ({"tables": ["orders"]}, "tables entry 'orders' names no schema"),
        ({"target_name": "x" * 64}, "is 64 bytes long; PostgreSQL names hold at most 63 bytes"),
        ({"target_name": "ü" * 32}, "is 64 bytes long"),
        ({"target_name": "pg_copy"}, "starts with pg_, which PostgreSQL reserves"),
        ({"mode": "replace", "confirm": "shop "}, "(you typed 'shop ', with spaces around the name: type it exactly)"),
        ({"incident_declared_at": "yesterday 9ish"}, "incident_declared_at must be a UTC time"),
        ({"incident_declared_at": "2999-01-01T00:00:00Z"}, "is after this restore was triggered"),
    ],
    ids=[
        "missing-backup-id",
        "before-oldest",
        "bad-selector",
        "replace-unconfirmed",
        "replace-wrong-confirmation",
        "target-is-live",
        "existing-target",
        "unknown-table",
        "replace-tables",
        "backup-path",
        "backup-nul",
        "future-time",
        "view",
        "missing-table",
        "quoted-case",
        "unclosed-quote",
        "no-schema",
        "target-too-long",
        "target-too-long-unicode",
        "target-pg-prefix",
        "confirm-trailing-space",
        "incident-not-a-time",
        "incident-declared-after-trigger",
    ],
)
def test_bad_input_fails_first_with_nothing_touched(restore_plan, run_dag, pg_server, slack, conf, message):
    if conf.get("target_name") == "audit_copy":
        _sql(pg_server, "CREATE DATABASE audit_copy")  # dropped by restore_plan: it was not there before
    before_dbs, before_rows = _databases(pg_server), source_row_counts(pg_server, "shop")
    dag_run = _restore(run_dag, **conf)
    assert dag_run.states["plan_restore"] == "failed"
    assert dag_run.tries["plan_restore"] == 1
    assert dag_run.states["check_checksums"] == "upstream_failed"
    assert _databases(pg_server) == before_dbs
    assert source_row_counts(pg_server, "shop") == before_rows
    (alert,) = slack.texts()
    assert message in alert and "plan_restore" in alert


def test_unknown_database_is_refused_by_the_form(restore_plan, run_dag):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match="is not one of"):
        run_dag("pgdr_restore", run_conf={"database": "nope"})


def test_corrupt_backup_fails_at_checksum_and_leaves_the_live_database_alone(restore_plan, run_dag, pg_server, slack):
    _p, root, backup_id = restore_plan
    manifest = json.loads((root / "v1/shop" / backup_id / "manifest.json").read_text())
    victim = root / max(manifest["files"], key=lambda f: f["stored_size"])["key"]
    victim.write_bytes(victim.read_bytes()[:-1] + b"!")
    before_dbs, before_rows = _databases(pg_server), source_row_counts(pg_server, "shop")

    dag_run = _restore(run_dag, mode="replace", confirm="shop")
    assert dag_run.states["check_checksums"] == "failed" and dag_run.tries["check_checksums"] == 1
    assert dag_run.states["restore_backup"] == "upstream_failed"
    assert dag_run.states["write_report"] == "failed"
    assert _databases(pg_server) == before_dbs
    assert source_row_counts(pg_server, "shop") == before_rows
    assert "is corrupt and was refused" in slack.texts()[0]
    report = _report(root, backup_id)
    assert report["status"] == "failed" and report["failed_phase"] == "check_checksums"


def test_a_failed_pg_restore_is_reported_even_when_dropping_the_half_restored_target_fails(
    restore_plan, run_dag, pg_server, slack, monkeypatch
):
    """Cleaning up after a failure must never replace that failure: the on-call needs pg_restore's error (what
    broke), with the target left to drop by hand named, not the cleanup's."""
    import pgdr.incident

    def pg_restore_fails(*_args, **_kwargs):
        raise RuntimeError("pg_restore: error: could not execute query: ERROR:  out of shared memory")

    def drop_fails(*_args, **_kwargs):
        raise psycopg.OperationalError("connection to server failed: Connection refused")

    monkeypatch.setattr(pgdr.incident, "restore_dump", pg_restore_fails)
    monkeypatch.setattr(pgdr.incident, "drop_own_target", drop_fails)
    with pytest.MonkeyPatch.context() as logged:
        warnings = []
        logged.setattr(pgdr.incident.log, "warning", lambda msg, *args: warnings.append(msg % args))
        dag_run = _restore(run_dag, target_name="shop_half_restored")
    assert dag_run.states["restore_backup"] == "failed", dag_run.states
    alert = next(t for t in slack.texts() if "restore_backup" in t)
    assert "out of shared memory" in alert and "Connection refused" not in alert
    assert any("Could not drop this run's target shop_half_restored" in w for w in warnings), warnings
