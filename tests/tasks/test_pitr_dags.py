"""pgdr_basebackup and pgdr_verify_pitr under dag.test(), against the archiving embedded server and S3."""

from __future__ import annotations

import json

import pytest
from conftest import BUCKET, PITR_PREFIX, PITR_SERVER
from support import xcom_of

pytestmark = pytest.mark.integration


def _pitr_plan(plan, storage: dict | None = None, server: dict | None = None, **pitr):
    """The plan of the PITR server: its database 'shop', WAL archive and base backups on S3 (more ``storage`` targets,
    ``server`` and ``pitr`` keys when given)."""
    return plan(
        databases=[{"name": "shop", "conn_id": "pgdr_pitr", "server": PITR_SERVER}],
        storage={
            "s3": {"type": "s3", "bucket": BUCKET, "prefix": PITR_PREFIX, "aws_conn_id": "pgdr_s3"},
            **(storage or {}),
        },
        servers={
            PITR_SERVER: {
                "pitr": {
                    "storage": "s3",
                    "keep_window": "7d",
                    "full_schedule": "@daily",
                    "incremental_schedule": "@hourly",
                    "archive_timeout": "10s",
                    **pitr,
                },
                **(server or {}),
            }
        },
    )


@pytest.fixture
def pitr_plan(plan, env, pitr_server, monkeypatch):
    """A plan with the PITR server: its database 'shop', WAL archive and base backups on S3."""
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_PITR", pitr_server.connection_uri("shop"))
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_RESTORE", pitr_server.restore_connection_uri())
    return _pitr_plan(plan)


def catalog_of(s3_server):
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.storage.backends import S3Store
    from pgdr.storage.layout import PhysicalLayout

    return BaseBackupCatalog(S3Store(s3_server.client, BUCKET), PhysicalLayout(PITR_PREFIX), PITR_SERVER)


def test_base_backups_then_a_verified_point_in_time_recovery(pitr_plan, run_dag, s3_server, slack):
    catalog = catalog_of(s3_server)
    before = {e.backup_id for e in catalog.backups()}
    full = run_dag("pgdr_basebackup", run_conf={"kind": "full"})
    assert full.get_state() == "success", full.states
    incremental = run_dag("pgdr_basebackup", run_conf={"kind": "incremental"})
    assert incremental.get_state() == "success", incremental.states
    new = [e for e in catalog.backups() if e.backup_id not in before]
    assert [e.record.kind for e in new] == ["full", "incremental"]
    assert new[1].record.parent == new[0].backup_id

    verify = run_dag("pgdr_verify_pitr", run_conf={"server": PITR_SERVER})
    assert verify.get_state() == "success", verify.states
    entry = catalog.get(new[1].backup_id)
    assert entry.status == "verified", json.dumps(entry.verification, indent=2, default=str)
    record = entry.verification
    assert record.chain == [new[0].backup_id, new[1].backup_id]
    recovery = record.recovery
    assert recovery["achieved_recovery_point"] <= record.target < recovery["stopped_before_commit_at"]
    assert recovery["wal_bytes_replayed"] > 0 and recovery["replay_seconds"] > 0
    assert record.target_check["heartbeats_before_target"] >= 1
    assert record.databases["shop"]["integrity"]["amcheck_ok"] is True
    assert record.databases["shop"]["checked_as"] == "pgdr_scratch_reader"
    assert record.databases["shop"]["checked_as_superuser"] is False
    assert record.databases["shop"]["validation"]["failed"] == 0
    assert slack.messages == []


def _sql(server, query: str, dbname: str = "shop"):
    import psycopg

    with psycopg.connect(**server.dsn(dbname), autocommit=True) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else None


def _second_boundary() -> None:
    import time

    time.sleep(1.25 - (time.time() % 1))  # just past the next full second


def test_incident_restore_as_of_a_second_undoes_a_bad_delete(pitr_plan, run_dag, pitr_server, s3_server):
    from datetime import UTC, datetime, timedelta

    from pgdr.airflow_glue.connections import server_endpoint
    from pgdr.physical.heartbeat import switch_and_wait_archived

    _sql(pitr_server, 'CREATE SCHEMA IF NOT EXISTS "Billing Ü"')
    _sql(pitr_server, 'DROP TABLE IF EXISTS "Billing Ü"."Invoice Lines"')
    _sql(pitr_server, 'CREATE TABLE "Billing Ü"."Invoice Lines" (id int PRIMARY KEY, label text NOT NULL)')
    assert run_dag("pgdr_basebackup", run_conf={"kind": "full"}).get_state() == "success"
    _sql(
        pitr_server, """INSERT INTO "Billing Ü"."Invoice Lines" SELECT g, 'good ' || g FROM generate_series(1, 50) g"""
    )
    _second_boundary()
    moment = datetime.now(UTC).replace(microsecond=0)  # what the engineer types: the second before the incident
    _second_boundary()
    _sql(pitr_server, """DELETE FROM "Billing Ü"."Invoice Lines" WHERE id <= 40""")  # the bad DELETE
    _sql(pitr_server, """INSERT INTO "Billing Ü"."Invoice Lines" VALUES (99, 'after the moment')""")
    switch_and_wait_archived(server_endpoint(pitr_plan.servers[0], pitr_plan), 60)
    stamp = moment.strftime("%Y-%m-%d %H:%M:%S")

    dry = run_dag("pgdr_restore", run_conf={"database": "shop", "backup": stamp, "dry_run": True})
    assert dry.get_state() == "success", dry.states
    planned = xcom_of(dry, "plan_restore")
    assert planned["pitr"]["target"] == moment.isoformat() and planned["pitr"]["wal_segments"] >= 1
    assert planned["backup_id"] is None and dry.states["check_checksums"] == "skipped"
    assert dry.states["evidence_to_verify"] == dry.states["verify_evidence_copy"] == "skipped"

    whole = run_dag("pgdr_restore", run_conf={"database": "shop", "backup": stamp, "target_name": "shop_as_of"})
    assert whole.get_state() == "success", whole.states
    rows = _sql(pitr_server, 'SELECT id FROM "Billing Ü"."Invoice Lines" ORDER BY id', "shop_as_of")
    assert [r[0] for r in rows] == list(range(1, 51))  # the deleted rows are back, the later insert is not
    assert _sql(pitr_server, "SELECT count(*) FROM sales.customers", "shop_as_of") == _sql(
        pitr_server, "SELECT count(*) FROM sales.customers"
    )
    done = xcom_of(whole, "recover_to_moment")
    assert done["pitr"]["recovery"]["achieved_recovery_point"] <= moment.isoformat()
    assert datetime.fromisoformat(done["recovery_point"]) > moment - timedelta(seconds=2)
    # Restored from the worker's disk while stored: nothing downloaded, the stored copy is a regular backup.
    assert xcom_of(whole, "restore_backup") == done["restored_from_moment"]
    assert done["restored_from_moment"]["download_seconds"] == 0 and done["restored_from_moment"]["restore_seconds"] > 0
    assert "not from the bucket" in xcom_of(whole, "check_checksums")["checked"]
    stored = _shop_catalog(s3_server).get(done["backup_id"])
    assert stored.manifest.row_counts['"Billing Ü"."Invoice Lines"'] == 50
    assert stored.manifest.airflow["run_id"] == whole.run_id
    # ... and, the restore done, its verification is asked for: a pgdr_verify_restore run for exactly that copy.
    assert _triggered("pgdr_verify_restore", f"evidence__{whole.run_id}") == {
        "database": "shop",
        "backup_id": done["backup_id"],
    }

    one = run_dag(
        "pgdr_restore",
        run_conf={
            "database": "shop",
            "backup": stamp,
            "target_name": "shop_lines",
            "tables": ['"Billing Ü"."Invoice Lines"'],
        },
    )
    assert one.get_state() == "success", one.states
    assert _sql(pitr_server, 'SELECT count(*) FROM "Billing Ü"."Invoice Lines"', "shop_lines") == [(50,)]
    assert _sql(pitr_server, "SELECT count(*) FROM sales.customers", "shop_lines") == [(0,)]
    for name in ("shop_as_of", "shop_lines"):
        _sql(pitr_server, f"DROP DATABASE {name} WITH (FORCE)", "postgres")


def _triggered(dag_id: str, run_id: str) -> dict | None:
    """The conf of the run ``run_id`` of ``dag_id`` that a task triggered (None: no such run)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.query(DagRun).filter_by(dag_id=dag_id, run_id=run_id).one_or_none()
        return None if run is None else dict(run.conf or {})


def _shop_catalog(s3_server):
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.storage.backends import S3Store
    from pgdr.storage.layout import BackupLayout

    return BackupCatalog(S3Store(s3_server.client, BUCKET), BackupLayout(PITR_PREFIX), "shop")


def test_a_retry_after_the_moment_was_stored_restores_it_from_the_bucket_without_recovering_again(
    pitr_plan, run_dag, pitr_server, s3_server, monkeypatch
):
    """The connection to the target drops during the first try's pg_restore, after the dump of the moment was
    stored: the retry restores that stored dump (no second recovery of the server), and the copy is whole."""
    import pgdr.incident
    import psycopg
    from pgdr.airflow_glue.connections import server_endpoint
    from pgdr.physical.heartbeat import switch_and_wait_archived

    if not catalog_of(s3_server).backups():
        assert run_dag("pgdr_basebackup", run_conf={"kind": "full"}).get_state() == "success"
    _sql(pitr_server, "CREATE TABLE IF NOT EXISTS public.resume_probe (label text)")
    _sql(pitr_server, "INSERT INTO public.resume_probe VALUES ('before the incident')")
    switch_and_wait_archived(server_endpoint(pitr_plan.servers[0], pitr_plan), 60)
    real, calls = pgdr.incident.restore_dump, []

    def drops_once(*args, **kwargs):
        calls.append(args[0].dbname)
        if len(calls) == 1:
            raise psycopg.OperationalError("server closed the connection unexpectedly")  # a transient failure
        return real(*args, **kwargs)

    monkeypatch.setattr(pgdr.incident, "restore_dump", drops_once)
    run = run_dag("pgdr_restore", run_conf={"database": "shop", "backup": "latest", "target_name": "shop_resumed"})
    try:
        assert run.get_state() == "success", run.states
        assert run.tries["recover_to_moment"] == 2 and calls == ["shop_resumed", "shop_resumed"]
        done = xcom_of(run, "recover_to_moment")
        assert "restored_from_moment" not in done  # the retry restored the stored copy, from the bucket
        assert done["pitr"]["recovery"]["resumed_from"] == done["backup_id"]
        assert xcom_of(run, "restore_backup")["download_seconds"] > 0
        made = [e for e in _shop_catalog(s3_server).backups() if e.manifest.airflow.get("run_id") == run.run_id]
        assert [e.backup_id for e in made] == [done["backup_id"]]  # one dump of the moment, not one per try
        labels = _sql(pitr_server, "SELECT label FROM public.resume_probe", "shop_resumed")
        assert ("before the incident",) in labels
    finally:
        _sql(pitr_server, "DROP DATABASE IF EXISTS shop_resumed WITH (FORCE)", "postgres")
        _sql(pitr_server, "DROP TABLE IF EXISTS public.resume_probe")


def test_a_worker_disk_too_small_for_the_moment_is_said_in_the_plan_and_refused_before_anything_is_written(
    pitr_plan, run_dag, pitr_server, s3_server, slack, monkeypatch
):
    """The restore plan says how much free disk the recovery of the moment needs; a worker whose work directory
    has less refuses at once (no retry, no cluster, no target database), saying what is free, what is needed and
    what to do, instead of failing hours later with the disk full."""
    import pgdr.physical.recovery as recovery
    from pgdr.incident import render_plan
    from pgdr.workdir import work_dir_root

    if not catalog_of(s3_server).backups():
        assert run_dag("pgdr_basebackup", run_conf={"kind": "full"}).get_state() == "success"
    dry = run_dag("pgdr_restore", run_conf={"database": "shop", "backup": "latest", "dry_run": True})
    assert dry.get_state() == "success", dry.states
    planned = xcom_of(dry, "plan_restore")
    needed = planned["pitr"]["recovery_disk_bytes"]
    size = _sql(pitr_server, "SELECT pg_database_size('shop')")[0][0]
    assert needed > size  # the whole server's files, at least this database's, plus pg_wal's room
    assert f"worker disk     : about {needed / 1e9:.1f} GB free needed" in render_plan(planned)

    asked = []
    monkeypatch.setattr(recovery, "free_bytes", lambda path: asked.append(path) or 300_000_000)
    before = {p.name for p in work_dir_root().glob("pgdr-cluster-*")}
    run = run_dag("pgdr_restore", run_conf={"database": "shop", "backup": "latest", "target_name": "shop_no_room"})
    assert run.states["recover_to_moment"] == "failed" and run.tries["recover_to_moment"] == 1, run.states
    assert asked == [work_dir_root()]
    (alert,) = [m["text"] for m in slack.messages if "recover_to_moment" in m.get("text", "")]
    assert f"{work_dir_root()} has 0.3 GB free, and recovering base backup" in alert
    assert f"needs about {needed / 1e9:.1f} GB" in alert and "PGDR_WORK_DIR" in alert
    assert "Nothing was recovered, and the live server was not touched." in alert
    assert {p.name for p in work_dir_root().glob("pgdr-cluster-*")} == before
    assert _sql(pitr_server, "SELECT count(*) FROM pg_database WHERE datname = 'shop_no_room'", "postgres") == [(0,)]


def test_a_moment_outside_the_window_fails_in_plan_restore_with_the_range(pitr_plan, run_dag, slack, s3_server):
    if not catalog_of(s3_server).backups():  # alone on its xdist worker: the window needs a base backup
        assert run_dag("pgdr_basebackup", run_conf={"kind": "full"}).get_state() == "success"
    failed = run_dag("pgdr_restore", run_conf={"database": "shop", "backup": "2020-01-01 00:00:00"})
    assert failed.states["plan_restore"] == "failed" and failed.states["recover_to_moment"] == "upstream_failed"
    (alert,) = [m["text"] for m in slack.messages if "plan_restore" in m.get("text", "")]
    assert "2020-01-01 00:00:00 UTC cannot be recovered: the recoverable window is" in alert


def test_latest_on_a_pitr_server_is_the_end_of_the_archive_not_the_newest_dump(
    pitr_plan, run_dag, pitr_server, s3_server
):
    """The trap once met: after a dump, 'latest' restored that dump, losing every row committed since.
    On a server with a WAL archive 'latest' recovers to the end of the archive; 'latest-dump' is the dump."""
    from pgdr.airflow_glue.connections import server_endpoint
    from pgdr.physical.heartbeat import switch_and_wait_archived

    if not catalog_of(s3_server).backups():
        assert run_dag("pgdr_basebackup", run_conf={"kind": "full"}).get_state() == "success"
    _sql(pitr_server, "CREATE TABLE IF NOT EXISTS public.after_dump (label text)")
    dump = run_dag("pgdr_backup")
    assert dump.get_state() == "success", dump.states
    _sql(pitr_server, "INSERT INTO public.after_dump VALUES ('committed after the newest dump')")
    switch_and_wait_archived(server_endpoint(pitr_plan.servers[0], pitr_plan), 60)

    dry = run_dag("pgdr_restore", run_conf={"database": "shop", "backup": "latest-dump", "dry_run": True})
    assert dry.get_state() == "success", dry.states
    assert xcom_of(dry, "plan_restore")["pitr"] is None and xcom_of(dry, "plan_restore")["backup_id"]

    restored = run_dag("pgdr_restore", run_conf={"database": "shop", "backup": "latest", "target_name": "shop_latest"})
    try:
        assert restored.get_state() == "success", restored.states
        planned = xcom_of(restored, "plan_restore")
        assert planned["pitr"]["target"] == "latest" and planned["pitr"]["end_of_archive"]
        labels = _sql(pitr_server, "SELECT label FROM public.after_dump", "shop_latest")
        assert ("committed after the newest dump",) in labels
    finally:
        _sql(pitr_server, "DROP DATABASE IF EXISTS shop_latest WITH (FORCE)", "postgres")
        _sql(pitr_server, "DROP TABLE IF EXISTS public.after_dump")


def test_the_drill_measures_the_pitr_rpo_achieved(pitr_plan, run_dag, pitr_server, s3_server, env):
    from pgdr.airflow_glue.connections import server_endpoint
    from pgdr.physical.heartbeat import switch_and_wait_archived, write_heartbeat

    endpoint = server_endpoint(pitr_plan.servers[0], pitr_plan)
    if not catalog_of(s3_server).backups():
        assert run_dag("pgdr_basebackup", run_conf={"kind": "full"}).get_state() == "success"
    write_heartbeat(endpoint, "test: archived before the drill")
    switch_and_wait_archived(endpoint, 60)
    drill = run_dag("pgdr_drill", run_conf={"databases": ["shop"]})
    assert drill.states["rehearse_pitr[0]"] == "success", drill.states
    from pgdr.storage.backends import S3Store

    store = S3Store(s3_server.client, BUCKET)
    keys = [o.key for o in store.list(f"{PITR_PREFIX}/v1/reports/drills/")]
    (json_key,) = [
        k for k in keys if k.endswith("drill.json") and json.loads(store.get_bytes(k))["run_id"] == drill.run_id
    ]
    report = json.loads(store.get_bytes(json_key))
    (pitr,) = report["pitr"]
    assert pitr["server"] == PITR_SERVER and pitr["rpo"]["target_s"] == 300
    assert 0 <= pitr["rpo"]["achieved_s"] < 120 and pitr["rpo"]["met"] is True
    assert pitr["newest_heartbeat"] <= report["started_at"]
    markdown = store.get_bytes(json_key.replace("drill.json", "drill.md")).decode()
    assert "## Point-in-time recovery" in markdown and f"| {PITR_SERVER} |" in markdown
    assert "<h2>Point-in-time recovery</h2>" in store.get_bytes(json_key.replace("drill.json", "drill.html")).decode()


def test_a_damaged_base_backup_fails_verification_with_one_alert(pitr_plan, run_dag, s3_server, slack):
    import dataclasses
    import hashlib

    from pgdr.physical.catalog import BaseBackupFile
    from pgdr.storage.backends import S3Store

    catalog = catalog_of(s3_server)
    assert run_dag("pgdr_basebackup", run_conf={"kind": "full"}).get_state() == "success"
    newest = catalog.backups()[-1]
    store = S3Store(s3_server.client, BUCKET)
    item = newest.record.file("backup_manifest")
    original = store.get_bytes(item.key)
    # Damaged before upload, record consistent with the stored bytes: only the manifest check can tell.
    damaged = original.replace(b'"Size": ', b'"Size": 1', 1)
    store.put_bytes(item.key, damaged)
    files = tuple(
        BaseBackupFile(f.name, f.key, len(damaged), hashlib.sha256(damaged).hexdigest()) if f is item else f
        for f in newest.record.files
    )
    catalog.write_record(dataclasses.replace(newest.record, files=files))
    slack.clear()
    try:
        failed = run_dag("pgdr_verify_pitr", run_conf={"server": PITR_SERVER})
    finally:
        store.put_bytes(item.key, original)
        catalog.write_record(newest.record)
    from pgdr.workdir import work_dir_root

    # A setup that failed removed its own cluster (Airflow runs no teardown for a failed setup): nothing is left.
    assert failed.states["verify.recover_cluster[0]"] == "failed" and not list(work_dir_root().glob("pgdr-cluster-*"))
    assert failed.states["verify.record_verification[0]"] == "failed"
    alerts = [m["text"] for m in slack.messages]
    assert len(alerts) == 1, alerts
    assert "The check against PostgreSQL's manifest rejected base backup" in alerts[0], alerts[0]
    assert "does not match its own checksum" in alerts[0] and "recover_cluster" in alerts[0]
    assert catalog.get(newest.backup_id).status == "failed"


def test_a_pitr_rehearsal_that_cannot_run_fails_the_drill_and_says_why(pitr_plan, run_dag, env, plan, monkeypatch):
    """A server with no base backup yet: its rehearsal fails, and the drill must say FAIL naming it and why,
    not leave the server out of the report and pass (as it once did)."""
    import pgdr.plan as plan_module

    # The same PITR server, but base backups under a prefix of this test's own: none there.
    fresh = plan(
        databases=[{"name": "shop", "conn_id": "pgdr_pitr", "server": PITR_SERVER}],
        storage={"s3": {"type": "s3", "bucket": BUCKET, "prefix": env["prefix"], "aws_conn_id": "pgdr_s3"}},
        servers={
            PITR_SERVER: {
                "pitr": {
                    "storage": "s3",
                    "keep_window": "7d",
                    "full_schedule": "@daily",
                    "incremental_schedule": "@hourly",
                    "archive_timeout": "10s",
                }
            }
        },
    )
    assert (
        plan_module.load_plan().servers[0].pitr.storage.prefix == env["prefix"] == fresh.servers[0].pitr.storage.prefix
    )
    assert run_dag("pgdr_backup").get_state() == "success"
    drill = run_dag("pgdr_drill", run_conf={"databases": ["shop"]})
    assert drill.states["rehearse_pitr[0]"] == "failed", drill.states
    assert drill.states["publish_report"] == "failed" and drill.get_state() == "failed", drill.states
    from pgdr.airflow_glue.connections import open_store

    store, layout = open_store(fresh.default_storage or fresh.databases[0].storage, fresh)
    keys = [o.key for o in store.list(layout.report_key("drills") + "/") if o.key.endswith("drill.json")]
    (report,) = [r for r in (json.loads(store.get_bytes(k)) for k in keys) if r["run_id"] == drill.run_id]
    assert report["status"] == "fail"
    (pitr,) = report["pitr"]
    assert pitr["server"] == PITR_SERVER and pitr["rpo"]["met"] is False
    assert "has no base backup to rehearse a point-in-time recovery from" in pitr["error"]
    assert [r["database"] for r in report["databases"]] == ["shop"]  # the logical rehearsal is reported beside it
    from pgdr.drill import headline, render_html, render_markdown, report_action_items

    assert any(
        line.startswith(f"server {PITR_SERVER} (PITR): FAIL | the rehearsal did not finish: ")
        for line in headline(report)
    )
    assert any("trigger pgdr_basebackup" in item for item in report_action_items(report))
    assert "the rehearsal did not finish" in render_markdown(report) and "has no base backup" in render_html(
        report, b""
    )


@pytest.fixture
def run_barman():
    """Run an archive_command or restore_command line as the server would, with the archive's credentials in the
    environment; skips where barman-cloud is not installed."""
    import os
    import subprocess

    from pgdr.errors import PgdrError
    from pgdr.physical.archive import archiver_bin_dir

    try:
        archiver_bin_dir()
    except PgdrError as err:
        pytest.skip(f"{err} (make archiver installs it)")

    def run(command: str, archive) -> None:
        environment = {**os.environ, **archive.access.environment()}
        result = subprocess.run(command, shell=True, env=environment, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]

    return run


@pytest.mark.parametrize("codec, suffix", [("lz4", ".lz4"), ("zstd", ".zst"), ("gzip", ".gz")])
def test_the_archiver_compresses_as_the_plan_says_and_pgdr_and_the_restore_command_read_it_back(
    plan, s3_storage, tmp_path, run_barman, codec, suffix
):
    """pitr.wal_compression picks barman-cloud-wal-archive's codec; a segment stored so is listed by pgdr (health, the
    window, recovery all start there), decompressed by it for pg_waldump, and restored by the restore_command, each
    byte for byte (an archive of .lz4 or .zst segments was once invisible to pgdr: a gap where there was none)."""
    import os
    import shlex

    p = plan(
        storage=s3_storage,
        servers={"pgdr_shop": {"conn_id": "pgdr_shop", "pitr": {"storage": "s3", "wal_compression": codec}}},
    )
    from pgdr.airflow_glue.connections import open_archive

    store, _layout, archive = open_archive(p.servers[0], p)
    assert f" --{codec} " in archive.archive_command()
    name = "000000010000000000000007"
    segment = tmp_path / name
    segment.write_bytes(bytes(8 << 20) + os.urandom(8 << 20))  # a 16 MB segment: half compressible, half not
    run_barman(archive.archive_command().replace("%p", shlex.quote(str(segment))), archive)
    (listed,) = archive.segments(store)
    assert listed.name == name and listed.key.endswith(name + suffix) and listed.size < 9 << 20
    assert archive.fetch_segment(store, listed, tmp_path / "fetched").read_bytes() == segment.read_bytes()
    restored, spool = tmp_path / "restored" / name, tmp_path / "spool"
    restored.parent.mkdir()
    spool.mkdir()
    run_barman(archive.restore_command(spool).replace("%f", name).replace("%p", shlex.quote(str(restored))), archive)
    assert restored.read_bytes() == segment.read_bytes()


def test_an_archive_whose_codec_changed_is_one_continuous_archive(plan, s3_storage, tmp_path, run_barman):
    """The default codec became zstd (measured: bench/wal_codecs.py); a server archiving with gzip until pgdr's
    upgrade, then with zstd, leaves .gz segments followed by .zst ones in one archive: no gap to pgdr, and the
    restore_command reads both (recovery replays across the change)."""
    import dataclasses
    import os
    import shlex

    p = plan(storage=s3_storage, servers={"pgdr_shop": {"conn_id": "pgdr_shop", "pitr": {"storage": "s3"}}})
    from pgdr.airflow_glue.connections import open_archive

    store, _layout, archive = open_archive(p.servers[0], p)
    assert archive.compression == "zstd" and " --zstd " in archive.archive_command()
    before_upgrade = dataclasses.replace(archive, compression="gzip")

    written = {}
    for name, archiver in (("000000010000000000000011", before_upgrade), ("000000010000000000000012", archive)):
        segment = tmp_path / name
        segment.write_bytes(os.urandom(1 << 20) + bytes(15 << 20))
        written[name] = segment.read_bytes()
        run_barman(archiver.archive_command().replace("%p", shlex.quote(str(segment))), archiver)
    listed = archive.segments(store)
    assert [(s.name, s.suffix) for s in listed] == [
        ("000000010000000000000011", ".gz"),
        ("000000010000000000000012", ".zst"),
    ]
    assert archive.check_continuous(listed, "000000010000000000000011").name == "000000010000000000000012"
    spool = tmp_path / "spool"
    spool.mkdir()
    for name, content in written.items():
        restored = tmp_path / "restored" / name
        restored.parent.mkdir(exist_ok=True)
        run_barman(
            archive.restore_command(spool).replace("%f", name).replace("%p", shlex.quote(str(restored))), archive
        )
        assert restored.read_bytes() == content


def test_the_restore_command_fetches_ahead_into_the_recoverys_spool_and_takes_from_it_without_barman(
    plan, s3_storage, tmp_path, run_barman
):
    """A recovery's restore_command: the first fetch brings the next segments of the archive into the recovery's spool
    (barman-cloud-wal-restore --parallel); the shell moves a spooled one into place without starting barman (here:
    no barman at all); a spooled file cut short is fetched again; one that cannot be moved stops the recovery (exit
    255, PostgreSQL's FATAL) instead of ending it early as though the archive ended there."""
    import os
    import shlex
    import subprocess

    from pgdr.physical.archive import DELIVERED, WAL_PREFETCH

    p = plan(storage=s3_storage, servers={"pgdr_shop": {"conn_id": "pgdr_shop", "pitr": {"storage": "s3"}}})
    from pgdr.airflow_glue.connections import open_archive

    _store, _layout, archive = open_archive(p.servers[0], p)
    written = {}
    for number in range(0x21, 0x25):
        name = f"0000000100000000000000{number:02X}"
        segment = tmp_path / name
        segment.write_bytes(os.urandom(1 << 20) + bytes(15 << 20))
        written[name] = segment.read_bytes()
        run_barman(archive.archive_command().replace("%p", shlex.quote(str(segment))), archive)
    names = sorted(written)
    spool, restored = tmp_path / "spool dir", tmp_path / "pg_wal"
    spool.mkdir()
    restored.mkdir()

    def command(name: str, bin_dir=None, spool=spool, wal=restored) -> str:
        line = archive.restore_command(spool, bin_dir)
        return line.replace("%f", name).replace("%p", shlex.quote(str(wal / "RECOVERYXLOG")))

    run_barman(command(names[0]), archive)
    assert (restored / "RECOVERYXLOG").read_bytes() == written[names[0]]
    spooled = sorted(f.name for f in spool.iterdir() if not f.name.startswith(DELIVERED))
    assert spooled == names[1 : 1 + WAL_PREFETCH]  # the next ones, whole

    no_barman = tmp_path / "no-barman"  # a restore_command that would fail if it started barman-cloud-wal-restore
    run_barman(command(names[1], no_barman), archive)
    assert (restored / "RECOVERYXLOG").read_bytes() == written[names[1]]
    assert names[1] not in {f.name for f in spool.iterdir()}
    # PostgreSQL renames what it was given to the segment's name, and asks for the last one again once redo is done
    # (to re-read the last record): a copy of the one delivered last, without barman, whole.
    (restored / "RECOVERYXLOG").rename(restored / names[1])
    run_barman(command(names[1], no_barman), archive)
    assert (restored / "RECOVERYXLOG").read_bytes() == written[names[1]]
    assert (restored / names[1]).read_bytes() == written[names[1]]  # what pg_wal keeps is untouched
    assert [f.name for f in spool.iterdir() if f.name.startswith(DELIVERED)] == [DELIVERED + names[1]]

    (spool / names[2]).write_bytes(written[names[2]][: 5 << 20])  # a prefetch cut short: fetched again, whole
    run_barman(command(names[2]), archive)
    assert (restored / "RECOVERYXLOG").read_bytes() == written[names[2]]

    unmovable = command(names[3], no_barman).replace(str(restored), str(tmp_path / "no such dir"))
    environment = {**os.environ, **archive.access.environment()}
    result = subprocess.run(unmovable, shell=True, env=environment, capture_output=True, text=True)
    assert result.returncode == 255, (result.returncode, result.stderr)

    # Many recoveries at once on one worker, each with its own spool: every segment arrives whole, in order, every
    # time (six rounds of four recoveries side by side, each asking for the archive's segments one after another).
    from concurrent.futures import ThreadPoolExecutor

    def recovery(n: int) -> list[str]:
        own_spool, own_wal = tmp_path / f"spool-{n}", tmp_path / f"wal-{n}"
        own_spool.mkdir()
        own_wal.mkdir()
        wrong = []
        for name in names:
            line = command(name, spool=own_spool, wal=own_wal)
            done = subprocess.run(line, shell=True, env=environment, capture_output=True, text=True)
            if done.returncode != 0 or (own_wal / "RECOVERYXLOG").read_bytes() != written[name]:
                wrong.append(f"recovery {n}, {name}: exit {done.returncode} {done.stderr[-500:]}")
        return wrong

    with ThreadPoolExecutor(max_workers=4) as pool:
        problems = [p for found in pool.map(recovery, range(24)) for p in found]
    assert not problems, problems


def test_the_restore_command_answers_not_archived_from_the_list_the_replay_began_with_and_asks_barman_otherwise(
    plan, s3_storage, tmp_path, run_barman
):
    """A recovering server asks for files the archive does not hold: the next timeline's history file at the start and
    at promotion, the segment after the end of the archive. barman-cloud-wal-restore takes ~0.4 s to say so; the
    restore_command answers from the archive's names listed as the replay began (the recovery's spool), at once.
    A listed file is always fetched, whatever its compression or a .partial suffix; a file listed but missing from
    the archive is barman's to answer; without the list, or with one that cannot be read, barman answers every
    request, never a wrong "not archived" (which would end a recovery early)."""
    import os
    import shlex
    import subprocess

    from pgdr.physical.archive import ARCHIVED_NAMES
    from pgdr.physical.cluster import ScratchCluster

    p = plan(storage=s3_storage, servers={"pgdr_shop": {"conn_id": "pgdr_shop", "pitr": {"storage": "s3"}}})
    from pgdr.airflow_glue.connections import open_archive

    store, _layout, archive = open_archive(p.servers[0], p)
    name = "000000010000000000000041"
    segment = tmp_path / name
    segment.write_bytes(os.urandom(1 << 20) + bytes(15 << 20))
    run_barman(archive.archive_command().replace("%p", shlex.quote(str(segment))), archive)
    prefix = archive.layout.wal_segments_prefix(archive.server)
    for key in (  # what else barman-cloud's layout may hold: a history file, a partial segment, a backup label, junk
        "00000002.history.gz",
        "0000000100000000/000000010000000000000042.partial.zst",
        "0000000100000000/000000010000000000000041.00000028.backup.gz",
        "0000000100000000/not-a-wal-file",
    ):
        store.put_bytes(prefix + key, b"x")
    archived = archive.archived_names(store)
    assert archived == ["000000010000000000000041", "000000010000000000000042", "00000002.history"]

    cluster = ScratchCluster(tmp_path / "cluster", 180000)
    cluster.new_spool(archived)
    assert (cluster.spool_dir / ARCHIVED_NAMES).read_text().splitlines() == archived
    wal = tmp_path / "pg_wal"
    wal.mkdir()
    environment = {**os.environ, **archive.access.environment()}
    no_barman = tmp_path / "no-barman"  # a restore_command that fails with 127 if it starts barman-cloud-wal-restore

    def ask(wanted: str, bin_dir=None) -> int:
        line = archive.restore_command(cluster.spool_dir, bin_dir).replace("%f", wanted)
        line = line.replace("%p", shlex.quote(str(wal / "RECOVERYXLOG")))
        return subprocess.run(line, shell=True, env=environment, capture_output=True).returncode

    for absent in ("00000003.history", "000000010000000000000043", "000000020000000000000041"):
        assert ask(absent, no_barman) == 1, absent  # not archived, said without barman
    assert ask(name, no_barman) == 127  # listed: barman's, even without a spooled copy
    assert ask(name) == 0 and (wal / "RECOVERYXLOG").read_bytes() == segment.read_bytes()
    (wal / "RECOVERYXLOG").unlink()
    assert ask(name, no_barman) == 0 and (wal / "RECOVERYXLOG").read_bytes() == segment.read_bytes()  # asked again
    assert ask("00000002.history") != 0  # listed, but what was stored is no gzip: barman's answer, not the list's

    (cluster.spool_dir / ARCHIVED_NAMES).chmod(0)  # a list that cannot be read (as root, readable all the same)
    if os.geteuid() != 0:
        assert ask("000000010000000000000043", no_barman) == 127
    (cluster.spool_dir / ARCHIVED_NAMES).unlink()
    assert ask("000000010000000000000043", no_barman) == 127  # no list: barman answers


def test_the_archive_command_ships_ready_segments_ahead_marks_them_and_trusts_only_its_own_marks(
    plan, s3_storage, tmp_path, run_barman
):
    """PostgreSQL asks archive_command for one segment at a time; pgdr's ships the ready ones after it too, side by
    side, and marks each it shipped. A later call for a marked segment ends at once (nothing uploaded again); a mark
    whose segment changed, or written for another archive, is not trusted; a failed call is the requested segment's
    failure. Then sixty segments, called for as PostgreSQL does (in order, .ready renamed .done on success): every one
    is in the archive once, whole, and no mark is left."""
    import dataclasses
    import os
    import subprocess

    from pgdr.physical.archive import ARCHIVE_AHEAD, ARCHIVED_AHEAD

    p = plan(storage=s3_storage, servers={"pgdr_shop": {"conn_id": "pgdr_shop", "pitr": {"storage": "s3"}}})
    from pgdr.airflow_glue.connections import open_archive

    store, _layout, archive = open_archive(p.servers[0], p)
    environment = {**os.environ, **archive.access.environment()}
    data = tmp_path / "data"
    status_dir, marks = data / "pg_wal" / "archive_status", data / ARCHIVED_AHEAD
    status_dir.mkdir(parents=True)
    written: dict[str, bytes] = {}

    def ready(number: int) -> str:
        name = f"0000000100000000000000{number:02X}"
        written[name] = os.urandom(1 << 20) + bytes(15 << 20)
        (data / "pg_wal" / name).write_bytes(written[name])
        (status_dir / f"{name}.ready").touch()
        return name

    def archive_call(name: str, archiver=archive, cwd=data, bin_dir=None) -> subprocess.CompletedProcess:
        """What PostgreSQL's archiver does: the command in the data directory, .ready to .done on success."""
        path = f"pg_wal/{name}" if cwd == data else str(data / "pg_wal" / name)
        command = archiver.archive_command(bin_dir).replace("%p", path).replace("%f", name)
        done = subprocess.run(command, shell=True, cwd=cwd, env=environment, capture_output=True, text=True)
        if done.returncode == 0 and archiver == archive and cwd == data:
            (status_dir / f"{name}.ready").rename(status_dir / f"{name}.done")
        return done

    def stored(archiver=archive) -> set[str]:
        return {s.name for s in archiver.segments(store)}

    names = [ready(n) for n in range(0x31, 0x37)]
    assert archive_call(names[0]).returncode == 0
    assert stored() == set(names[:ARCHIVE_AHEAD])  # the requested one and the next three, side by side
    assert sorted(m.name for m in marks.iterdir()) == names[1:ARCHIVE_AHEAD]

    key = next(s.key for s in archive.segments(store) if s.name == names[1])
    store.delete([key])  # were the segment archived again, it would be back
    assert archive_call(names[1]).returncode == 0
    assert names[1] not in stored() and not (marks / names[1]).exists()

    changed = bytearray(written[names[2]])  # the segment differs from what was shipped ahead: shipped again
    changed[:4] = b"\xff\xff\xff\xff"
    (data / "pg_wal" / names[2]).write_bytes(bytes(changed))
    key = next(s.key for s in archive.segments(store) if s.name == names[2])
    store.delete([key])
    assert archive_call(names[2]).returncode == 0
    got = archive.fetch_segment(store, next(s for s in archive.segments(store) if s.name == names[2]), tmp_path / "f")
    assert got.read_bytes() == bytes(changed)
    (data / "pg_wal" / names[2]).write_bytes(written[names[2]])

    other = dataclasses.replace(archive, server="pgdr_shop_rebuilt")  # a mark written for another archive
    assert (marks / names[3]).exists()
    assert archive_call(names[3], other).returncode == 0
    assert stored(other) == set(names[3:]) and not (marks / names[3]).exists()  # shipped, not taken as done
    elsewhere = dataclasses.replace(archive, server="pgdr_shop_elsewhere")
    assert archive_call(names[3], elsewhere, cwd=tmp_path).returncode == 0  # not in a data directory: one segment
    assert stored(elsewhere) == {names[3]} and not (tmp_path / "pg_wal").exists()

    failed = archive_call(names[3], bin_dir=tmp_path / "no-barman")
    assert failed.returncode != 0  # the requested segment's failure is the call's
    assert (status_dir / f"{names[3]}.ready").exists()

    for name in names[3:]:
        assert archive_call(name).returncode == 0
    assert not any(marks.iterdir())

    # Sixty more, as PostgreSQL calls for them: each in the archive once and whole, no mark left behind.
    more = [ready(n) for n in range(0x40, 0x7C)]
    for name in more:
        done = archive_call(name)
        assert done.returncode == 0, done.stderr[-2000:]
    listed = [s for s in archive.segments(store) if s.name in set(more)]
    assert sorted(s.name for s in listed) == more
    for segment in listed[::7]:
        assert archive.fetch_segment(store, segment, tmp_path / "check").read_bytes() == written[segment.name]
    assert not any(marks.iterdir())


def test_pgdr_copy_copies_the_servers_wal_and_base_backups_checked_there_and_health_watches_the_copy(
    pitr_plan, plan, run_dag, s3_server, monkeypatch, slack
):
    """pgdr_copy's copy_server task: a base backup and the WAL from its start reach the copy (streamed through the
    worker: another connection), each file read back there; bytes that read back wrong are removed and the task fails
    naming them; the next run copies them. pgdr_health's server check reports the copy's lag."""
    import io
    from datetime import UTC, datetime

    from pgdr.airflow_glue.connections import resources, server_endpoint
    from pgdr.physical.copies import server_copy_lags
    from pgdr.physical.heartbeat import switch_and_wait_archived, write_heartbeat
    from pgdr.storage.backends import S3Store
    from support import aws_connection

    dr_bucket = "pgdr-dr-copy"
    try:
        s3_server.client.create_bucket(Bucket=dr_bucket)
    except s3_server.client.exceptions.BucketAlreadyOwnedByYou:
        pass
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3_DR", aws_connection(s3_server.port))
    prefix = f"{PITR_PREFIX}-dag-copy"
    p = _pitr_plan(
        plan, {"dr": {"type": "s3", "bucket": dr_bucket, "prefix": prefix, "aws_conn_id": "pgdr_s3_dr"}}, copies=["dr"]
    )
    full = run_dag("pgdr_basebackup", run_conf={"kind": "full"})
    assert full.get_state() == "success", full.states

    honest = S3Store.put_stream
    damaged = []

    def faulty(self, key, stream):
        if self.bucket == dr_bucket and "/wals/" in key and not damaged:
            damaged.append(key)
            stream = io.BytesIO(stream.read()[:-1])  # the last byte lost on the way
        honest(self, key, stream)

    monkeypatch.setattr(S3Store, "put_stream", faulty)
    failed = run_dag("pgdr_copy")
    assert failed.states["copy_server[0]"] == "failed", failed.states
    res = resources(p)
    server = p.server(PITR_SERVER)
    copy_store, _layout, copy_archive = res.archive(server, p.storages["dr"])
    assert damaged and not copy_store.exists(damaged[0])  # removed: never a wrong segment in the copy
    (message,) = [m["text"] for m in slack.messages if "copy_server" in m["text"]]
    assert damaged[0].rsplit("/", 1)[-1] in message and "reads back as" in message, message

    monkeypatch.setattr(S3Store, "put_stream", honest)
    slack.clear()
    beat = write_heartbeat(server_endpoint(server, p), "test: archived, then copied")
    switch_and_wait_archived(server_endpoint(server, p), 60)
    copied = run_dag("pgdr_copy")
    assert copied.states["copy_server[0]"] == "success", copied.states
    (lag,) = server_copy_lags(server, res, datetime.now(UTC))
    assert lag.missing_backups == () and lag.gap is None, lag
    assert copy_store.exists(damaged[0])
    newest = catalog_of(s3_server).backups()[-1]
    copied_names = {s.name for s in copy_archive.segments(copy_store)}
    assert newest.record.start_wal in copied_names

    health = run_dag("pgdr_health")
    (check,) = [r for r in xcom_of(health, "check_server") if r["check"] == "copy_lag.dr"]
    assert check["database"] == PITR_SERVER and check["ok"], check

    # The drill's lost-target scenario rehearses the server's recovery from the copy: its RPO is the copy's.
    drill = run_dag("pgdr_drill", run_conf={"databases": ["shop"], "scenario": "primary-target-lost"})
    assert drill.states["rehearse_pitr[0]"] == "success", drill.states
    rehearsal = xcom_of(drill, "rehearse_pitr")
    assert rehearsal["server"] == PITR_SERVER and datetime.fromisoformat(rehearsal["newest_heartbeat"]) >= beat, (
        rehearsal
    )
    assert rehearsal["rpo"]["achieved_s"] > 0, rehearsal  # the drill's own heartbeat is not in the copy yet


def test_a_moment_before_idle_segments_is_still_inside_the_window(pitr_plan, run_dag, pitr_server, tmp_path):
    """Defect found in CI: the window ended at the last commit in the three newest archived segments, so a quiet
    server (its checkpoints still fill segments that archive_timeout switches, none with a commit) made every moment
    after its newest base backup 'outside the window'. The window now reaches back to the newest commit."""
    from datetime import UTC, datetime

    from pgdr.airflow_glue.connections import AirflowResources
    from pgdr.physical.heartbeat import switch_and_wait_archived, write_heartbeat
    from pgdr.physical.recovery import plan_point_in_time
    from pgdr.postgres.client import PgEndpoint, connect

    full = run_dag("pgdr_basebackup", run_conf={"kind": "full"})
    assert full.get_state() == "success", full.states
    endpoint = PgEndpoint("127.0.0.1", pitr_server.port, "postgres", "postgres", pitr_server.password)
    write_heartbeat(endpoint, "test: before the target")
    _second_boundary()
    target = datetime.now(UTC).replace(microsecond=0)
    _second_boundary()
    after = write_heartbeat(endpoint, "test: after the target")
    switch_and_wait_archived(endpoint, 60)
    for _ in range(4):  # four segments without a commit: a WAL message (no transaction), then a switch
        with connect(endpoint) as conn:
            conn.execute("SELECT pg_logical_emit_message(false, 'pgdr-test', 'idle')")
        switch_and_wait_archived(endpoint, 60)

    planned = plan_point_in_time(pitr_plan.servers[0], AirflowResources(pitr_plan), target, tmp_path)
    assert planned["recovery_point_expected"] == target.isoformat()
    assert datetime.fromisoformat(planned["window"]["newest"]) >= after.replace(microsecond=0), planned["window"]


def _checkpoints(server) -> tuple[int, int]:
    """The checkpoints requested of ``server`` and the restartpoints requested of it (as a standby) so far."""
    return tuple(_sql(server, "SELECT num_requested, restartpoints_req FROM pg_stat_checkpointer", "postgres")[0])


def _replica_caught_up(primary, replica, timeout: float = 30) -> None:
    import time

    ((lsn,),) = _sql(primary, "SELECT pg_current_wal_insert_lsn()::text", "postgres")
    deadline = time.monotonic() + timeout
    while not _sql(replica, f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn", "postgres")[0][0]:
        assert time.monotonic() < deadline, "the replica did not catch up"
        time.sleep(0.1)


@pytest.fixture
def standby_plan(plan, env, pitr_server, pitr_replica, monkeypatch):
    """The PITR plan with the server's base backups read on its streaming replica (source_conn_id)."""
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_PITR", pitr_server.connection_uri("shop"))
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_RESTORE", pitr_server.restore_connection_uri())
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_PITR_STANDBY", pitr_replica.connection_uri("postgres"))
    return lambda **server: _pitr_plan(plan, server={"source_conn_id": "pgdr_pitr_standby", **server})


def test_base_backups_read_on_the_standby_recover_from_the_primarys_archive(
    standby_plan, run_dag, pitr_server, pitr_replica, s3_server, slack
):
    """A full and an incremental base backup taken on the replica: the primary takes no checkpoint for them (the
    replica makes restartpoints), the records say where they were read, and pgdr_verify_pitr recovers the chain with
    the WAL the primary archived, to a target proved by heartbeats."""
    standby_plan()
    catalog = catalog_of(s3_server)
    before = {e.backup_id for e in catalog.backups()}
    _replica_caught_up(pitr_server, pitr_replica)
    primary_before, standby_before = _checkpoints(pitr_server), _checkpoints(pitr_replica)
    full = run_dag("pgdr_basebackup", run_conf={"kind": "full"})
    assert full.get_state() == "success", full.states
    assert _checkpoints(pitr_server)[0] == primary_before[0]  # pg_basebackup -c fast asked the primary for nothing
    assert _checkpoints(pitr_replica)[1] == standby_before[1] + 1  # but the replica for a restartpoint
    _sql(pitr_server, "CREATE TABLE IF NOT EXISTS public.standby_base (n int)")
    _sql(pitr_server, "INSERT INTO public.standby_base SELECT generate_series(1, 1000)")
    incremental = run_dag("pgdr_basebackup", run_conf={"kind": "incremental"})
    assert incremental.get_state() == "success", incremental.states
    # The incremental one needs a restartpoint after the full one's end: after a quiet spell (no timed checkpoint on
    # the primary since), pgdr asks the primary for one CHECKPOINT, then the replica makes its restartpoint
    assert _checkpoints(pitr_server)[0] <= primary_before[0] + 1
    assert _checkpoints(pitr_replica)[1] == standby_before[1] + 2
    new = [e for e in catalog.backups() if e.backup_id not in before]
    assert [e.record.kind for e in new] == ["full", "incremental"] and new[1].record.parent == new[0].backup_id
    for entry in new:
        assert entry.record.source["source"] == "standby", entry.record.source
        assert entry.record.source["source_conn_id"] == "pgdr_pitr_standby"
        assert (
            entry.record.system_identifier
            == _sql(pitr_server, "SELECT system_identifier::text FROM pg_control_system()", "postgres")[0][0]
        )
    assert xcom_of(incremental, "take_base_backup")["source"] == "standby"

    verify = run_dag("pgdr_verify_pitr", run_conf={"server": PITR_SERVER})
    assert verify.get_state() == "success", verify.states
    record = catalog.get(new[1].backup_id).verification
    assert record.chain == [new[0].backup_id, new[1].backup_id]
    assert record.target_check["heartbeats_before_target"] >= 1
    assert record.databases["shop"]["integrity"]["amcheck_ok"] is True
    # no alert (a "recovered" one may follow an earlier test's failed verification on this server)
    assert not [t for t in slack.texts() if not t.startswith(":large_green_circle:")], slack.texts()
    _sql(pitr_server, "DROP TABLE public.standby_base")


def test_a_lagging_standby_is_not_used_for_base_backups(
    standby_plan, run_dag, pitr_server, pitr_replica, s3_server, slack
):
    """Replay paused on the replica while the primary writes: with max_standby_lag 1s the base backup is read on the
    primary with a Slack warning naming the lag; with on_standby_lag: fail it fails, and nothing is stored."""
    import time

    catalog = catalog_of(s3_server)
    _sql(pitr_server, "CREATE TABLE IF NOT EXISTS public.standby_lagging (n int)")
    _replica_caught_up(pitr_server, pitr_replica)  # a transaction replayed: its lag is then the time since
    _sql(pitr_replica, "SELECT pg_wal_replay_pause()", "postgres")
    try:
        _sql(pitr_server, "INSERT INTO public.standby_lagging VALUES (1)")
        time.sleep(1.5)
        standby_plan(max_standby_lag="1s")
        slack.clear()
        fallback = run_dag("pgdr_basebackup", run_conf={"kind": "full"})
        assert fallback.get_state() == "success", fallback.states
        (warning,) = slack.texts()
        assert warning.startswith(
            f":warning: [pgdr] The base backup of server '{PITR_SERVER}' was taken from the primary, not its standby "
            "(source_conn_id pgdr_pitr_standby):"
        ), warning
        assert "behind the primary (max_standby_lag 1.0s)" in warning
        newest = catalog.backups()[-1]
        assert newest.record.source is None and "source" not in json.loads(
            catalog.store.get_bytes(catalog.layout.record_key(PITR_SERVER, newest.backup_id))
        )

        slack.clear()
        run_dag("pgdr_health")  # the server's standby, checked as a database's
        assert any(
            f"{PITR_SERVER}: standby_lag: database 'postgres' at 127.0.0.1:{pitr_replica.port} as user 'postgres' "
            "(Airflow connection 'pgdr_pitr_standby') lags "
            in t
            and "base backups are taken from the primary meanwhile" in t
            for t in slack.texts()
        ), slack.texts()

        standby_plan(max_standby_lag="1s", on_standby_lag="fail")
        slack.clear()
        failed = run_dag("pgdr_basebackup", run_conf={"kind": "full"})
    finally:
        _sql(pitr_replica, "SELECT pg_wal_replay_resume()", "postgres")
        _sql(pitr_server, "DROP TABLE IF EXISTS public.standby_lagging")
    assert failed.states["take_base_backup[0]"] == "failed", failed.states
    assert catalog.backups()[-1].backup_id == newest.backup_id  # nothing stored
    assert any(
        f"The base backup of server '{PITR_SERVER}' is taken from its standby (source_conn_id pgdr_pitr_standby), but"
        in t
        and "on_standby_lag: fail, so nothing was read from the primary" in t
        for t in slack.texts()
    ), slack.texts()


def test_a_standby_of_another_cluster_is_refused_before_anything_is_read():
    from dataclasses import replace

    from pgdr.errors import PermanentFailure
    from pgdr.physical.archive import ArchiverState
    from pgdr.physical.basebackup import ServerFacts, check_standby_of
    from pgdr.postgres.client import PgEndpoint

    state = ArchiverState(0, None, None, 0, None, None)
    primary = ServerFacts("7400000000000000001", 180000, 1, 16 << 20, "on", "on", state)
    standby = PgEndpoint("10.0.0.9", 5432, "backup", "postgres", None, conn_id="pgdr_pitr_standby")
    check_standby_of(standby, primary, primary, "main")  # the same cluster: nothing to say
    with pytest.raises(PermanentFailure) as err:
        check_standby_of(standby, replace(primary, system_identifier="7"), primary, "main")
    assert str(err.value).startswith(
        "The standby of server 'main', database 'postgres' at 10.0.0.9:5432 as user 'backup' (Airflow connection "
        "'pgdr_pitr_standby'), is not a replica of it: its system identifier is 7, the primary's "
        "7400000000000000001. No base backup was taken"
    ), err.value
    check_standby_of(standby, replace(primary, timeline=2), primary, "main")  # stale for a while after a failover
    with pytest.raises(PermanentFailure, match="the primary runs with full_page_writes = off: a page copied on a"):
        check_standby_of(standby, primary, replace(primary, full_page_writes="off"), "main")


def test_an_incremental_on_a_standby_whose_primary_role_may_not_checkpoint_says_what_to_grant(
    pitr_server, pitr_replica
):
    """The primary's newest checkpoint is older than the parent's end and the server's role lacks pg_checkpoint: the
    task is told what to grant, and retries (a DumpFailed), instead of pg_basebackup's refusal."""
    from pgdr.errors import DumpFailed, PermanentFailure
    from pgdr.physical.basebackup import restartpoint_after
    from pgdr.postgres.client import PgEndpoint

    _sql(pitr_server, "DROP ROLE IF EXISTS pgdr_no_checkpoint")
    _sql(pitr_server, "CREATE ROLE pgdr_no_checkpoint LOGIN PASSWORD 'no-checkpoint-pw'")
    try:
        primary = PgEndpoint("127.0.0.1", pitr_server.port, "pgdr_no_checkpoint", "postgres", "no-checkpoint-pw")
        standby = PgEndpoint("127.0.0.1", pitr_replica.port, "postgres", "postgres", pitr_replica.password)
        with pytest.raises(DumpFailed) as err:
            restartpoint_after(primary, standby, "FF/0", "main")  # an end no checkpoint has reached
        assert not isinstance(err.value, PermanentFailure)
        assert "the primary has written no checkpoint since the parent base backup ended (at FF/0)" in str(err.value)
        assert "Grant it pg_checkpoint (GRANT pg_checkpoint TO pgdr_no_checkpoint)" in str(err.value)
        assert "no-checkpoint-pw" not in str(err.value)
    finally:
        _sql(pitr_server, "DROP ROLE pgdr_no_checkpoint")


def test_the_end_of_a_standbys_base_backup_is_awaited_in_the_primarys_archive_even_without_pg_switch_wal(
    pitr_server,
):
    """A role that may not switch WAL: pgdr waits for the primary's archive_timeout (10 s here) to close and archive
    the segment, and names a segment that never comes within the wait."""
    from pgdr.physical.archive import ArchiverFailing
    from pgdr.physical.basebackup import wait_archived_by_primary
    from pgdr.postgres.client import PgEndpoint

    _sql(pitr_server, "DROP ROLE IF EXISTS pgdr_no_switch")
    _sql(pitr_server, "CREATE ROLE pgdr_no_switch LOGIN PASSWORD 'no-switch-pw'")
    try:
        primary = PgEndpoint("127.0.0.1", pitr_server.port, "pgdr_no_switch", "postgres", "no-switch-pw")
        ((segment,),) = _sql(pitr_server, "SELECT pg_walfile_name(pg_current_wal_insert_lsn())", "postgres")
        _sql(
            pitr_server,
            "CREATE TABLE IF NOT EXISTS public.switch_wait (n int); INSERT INTO public.switch_wait VALUES (1)",
        )
        wait_archived_by_primary(primary, segment, 60)
        ((archived,),) = _sql(pitr_server, "SELECT last_archived_wal FROM pg_stat_archiver", "postgres")
        assert archived[:24] >= segment
        with pytest.raises(ArchiverFailing, match="did not archive WAL segment 0000000100000FFF000000FF, the end of"):
            wait_archived_by_primary(primary, "0000000100000FFF000000FF", 1)
    finally:
        _sql(pitr_server, "DROP ROLE pgdr_no_switch")
        _sql(pitr_server, "DROP TABLE IF EXISTS public.switch_wait")
