"""The server is gone: ``python -m pgdr recover-server`` brings a whole server back onto this host from its base
backups and WAL archive, with no Airflow services, to a second between two heartbeats or to the end of the archive.

The lost server is a real embedded PostgreSQL 18 archiving with barman-cloud to the S3 server, with three
databases (one with a hostile name) and two application roles; its data directory is deleted before recovery.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import BUCKET
from support import aws_connection, write_plan

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SERVER = "lost"
HOSTILE_DB = 'Ledger "DB" ü'


def _sql(dsn: dict, statement: str, params=None):
    with psycopg.connect(**dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else None


def _second_boundary() -> None:
    time.sleep(1.25 - (time.time() % 1))


@pytest.fixture(scope="module")
def lost_server(session_dir, s3_server, tmp_path_factory):
    """A server with three databases and two roles, a full base backup, writes at known times, then lost."""
    from pgdr.local.embedded import create_sample_database
    from pgdr.physical.basebackup import take_base_backup
    from pgdr.physical.heartbeat import switch_and_wait_archived, write_heartbeat
    from pgdr.postgres.client import PgEndpoint
    from pgdr.storage.backends import S3Store
    from support import archiving_server

    prefix = f"lost-{uuid.uuid4().hex[:8]}"
    server = archiving_server(session_dir / f"postgres-{prefix}", s3_server.port, BUCKET, prefix, SERVER)
    archive = server.archive
    create_sample_database(server, "shop")
    admin = server.dsn()
    _sql(admin, f'CREATE DATABASE "{HOSTILE_DB.replace(chr(34), chr(34) * 2)}"')
    _sql(admin, "CREATE DATABASE app")
    _sql(admin, "CREATE ROLE app_owner LOGIN PASSWORD 'owner-secret'")
    _sql(admin, """CREATE ROLE "Report Reader" LOGIN PASSWORD 'reader-secret'""")
    app = server.dsn("app")
    _sql(app, "CREATE TABLE public.events (id bigserial PRIMARY KEY, label text NOT NULL)")
    _sql(app, "ALTER TABLE public.events OWNER TO app_owner")
    _sql(app, """GRANT SELECT ON public.events TO "Report Reader\"""")
    ledger = server.dsn(HOSTILE_DB)
    _sql(ledger, """CREATE TABLE "Entries ü" (id int PRIMARY KEY, label text)""")
    _sql(ledger, """INSERT INTO "Entries ü" SELECT g, 'entry ' || g FROM generate_series(1, 100) g""")

    endpoint = PgEndpoint("127.0.0.1", server.port, "postgres", "postgres", server.password)
    store = S3Store(s3_server.client, BUCKET)
    work = tmp_path_factory.mktemp("lost-base-backup")
    full = take_base_backup(SERVER, endpoint, store, archive.layout, work, archive.url)
    _sql(app, "INSERT INTO public.events (label) VALUES ('after the base backup')")
    before = write_heartbeat(endpoint, "test: before the target")
    _sql(app, "INSERT INTO public.events (label) VALUES ('before the target')")
    _second_boundary()
    target = datetime.now(UTC).replace(microsecond=0)
    _second_boundary()
    _sql(app, "INSERT INTO public.events (label) VALUES ('after the target')")
    after = write_heartbeat(endpoint, "test: after the target")
    _sql(ledger, """DELETE FROM "Entries ü" WHERE id > 10""")  # the incident: after the target
    switch_and_wait_archived(endpoint, 90)
    server.destroy()  # the host is gone: its data directory with it
    yield {
        "server": server,
        "prefix": prefix,
        "target": target,
        "heartbeats": (before, after),
        "full": full,
        "s3_port": s3_server.port,
        "s3_client": s3_server.client,
    }


def _write_connections(path: Path, lost_server, slack, **more: str) -> None:
    """The connections file of ``recover-server``: the lost server's, S3's, the restore role's, Slack's, ``more``."""
    server = lost_server["server"]
    connections = {
        # The lost server's connection: its login is the recovered cluster's; its host is never contacted.
        "pgdr_lost": server.connection_uri("app"),
        "pgdr_s3": aws_connection(lost_server["s3_port"]),
        "pgdr_restore": server.connection_uri("postgres"),
        "pgdr_slack": slack.connection(),
        **more,
    }
    path.write_text(json.dumps({name: json.loads(value) for name, value in connections.items()}))


def _write_lost_plan(path: Path, prefix: str, storage: dict | None = None, evidence: str | None = None, **pitr) -> Path:
    """The plan of the lost server: its databases app and ledger, its archive on S3 (more ``storage`` targets and
    ``pitr`` keys when given; an evidence log under the prefix ``evidence`` when given)."""
    if evidence:
        target = {"type": "s3", "bucket": BUCKET, "prefix": evidence, "aws_conn_id": "pgdr_s3"}
        storage = {**(storage or {}), "evidence": target}
    sections = {"evidence": {"storage": "evidence", "key_conn_id": "pgdr_evidence_key"}} if evidence else {}
    return write_plan(
        path,
        [
            {"name": "app", "conn_id": "pgdr_lost", "server": SERVER},
            {"name": "ledger", "conn_id": "pgdr_lost", "dbname": HOSTILE_DB, "server": SERVER},
        ],
        {"s3": {"type": "s3", "bucket": BUCKET, "prefix": prefix, "aws_conn_id": "pgdr_s3"}, **(storage or {})},
        servers={
            SERVER: {
                "conn_id": "pgdr_lost",
                "pitr": {
                    "storage": "s3",
                    "keep_window": "7d",
                    "full_schedule": "@daily",
                    "archive_timeout": "10s",
                    **pitr,
                },
            }
        },
        **sections,
    )


@pytest.fixture
def recover(lost_server, tmp_path, slack, s3_server):
    """Run ``python -m pgdr recover-server`` with a plan and connections file, no Airflow around it (``run.plan`` and
    ``run.connections`` are their paths: a test may rewrite them)."""
    from pgdr.storage.encryption import new_master_key
    from pgdr.workdir import work_dir_root

    connections = tmp_path / "connections.json"
    evidence_key = json.dumps({"conn_type": "generic", "login": "ev-1", "password": new_master_key()})
    _write_connections(connections, lost_server, slack, pgdr_evidence_key=evidence_key)
    evidence = f"{lost_server['prefix']}-evidence-{uuid.uuid4().hex[:8]}"  # each test's own chain of receipts
    plan = _write_lost_plan(tmp_path / "plan.yaml", lost_server["prefix"], evidence=evidence)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PGDR"))}
    env["PYTHONPATH"] = str(ROOT / "plugins")
    env["PGDR_LOG_DIR"] = str(tmp_path / "logs")  # not the temporary directory: each run writes a log file
    base = work_dir_root() / f"pgdr-recover-test-{uuid.uuid4().hex[:8]}"
    base.mkdir(parents=True)
    base.chmod(0o755)
    started = []
    slack.clear()

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        user = ["--os-user", "nobody"] if os.geteuid() == 0 else []
        command = [sys.executable, "-m", "pgdr", "recover-server", "--plan", str(plan), "--connections"]
        command += [str(connections), "--server", SERVER, *user, *args]
        result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
        result.output = result.stdout + result.stderr
        return result

    def pg_ctl(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
        from pgdr.postgres.binaries import server_bin_dir_for

        user = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
        started.append(data_dir)
        return subprocess.run(
            [str(server_bin_dir_for(180000) / "pg_ctl"), "-D", str(data_dir), *args],
            capture_output=True,
            text=True,
            **user,
        )

    def receipts() -> list[dict]:
        """The bodies of the receipts the runs wrote to this test's evidence log, in chain order."""
        keys = s3_server.client.list_objects_v2(Bucket=BUCKET, Prefix=f"{evidence}/evidence-v1/chain/")
        return [
            json.loads(s3_server.client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read())
            for o in sorted(keys.get("Contents", []), key=lambda o: o["Key"])
        ]

    run.base, run.pg_ctl, run.plan, run.connections, run.receipts = base, pg_ctl, plan, connections, receipts
    yield run
    for data_dir in {*started, *base.glob("*")}:
        if (Path(data_dir) / "postmaster.pid").exists():
            pg_ctl(Path(data_dir), "-m", "immediate", "stop")
    shutil.rmtree(base, ignore_errors=True)


def _dsn(port: int, user: str, password: str, dbname: str) -> dict:
    return {"host": "127.0.0.1", "port": port, "user": user, "password": password, "dbname": dbname}


def test_the_whole_server_comes_back_to_a_second_with_every_database_and_role(lost_server, recover, slack):
    from pgdr.postgres.binaries import free_port

    server, target = lost_server["server"], lost_server["target"]
    data_dir, port = recover.base / "data", free_port()
    stamp = target.strftime("%Y-%m-%dT%H:%M:%SZ")

    dry = recover("--to", stamp, "--data-dir", str(data_dir), "--dry-run")
    assert dry.returncode == 0, dry.output
    assert lost_server["full"].backup_id in dry.output and "never contacted" in dry.output
    assert "proof           : quick: pg_amcheck of every table and B-tree index page" in dry.output, dry.output
    assert not data_dir.exists()

    done = recover("--to", stamp, "--data-dir", str(data_dir), "--port", str(port))
    assert done.returncode == 0, done.output
    admin = _dsn(port, "postgres", server.password, "postgres")
    assert _sql(admin, "SELECT pg_is_in_recovery()") == [(False,)]  # promoted, serving on its own port
    assert _sql(admin, "SHOW archive_mode") == [("off",)]  # never into the old server's archive
    assert _sql(admin, "SELECT current_setting('restore_command')") == [("",)]  # recovery settings reset
    names = {r[0] for r in _sql(admin, "SELECT datname FROM pg_database")}
    assert {"shop", "app", HOSTILE_DB} <= names
    # Every row at or before the target, none after: rows and heartbeats.
    owner = _dsn(port, "app_owner", "owner-secret", "app")
    assert [r[0] for r in _sql(owner, "SELECT label FROM public.events ORDER BY id")] == [
        "after the base backup",
        "before the target",
    ]
    beats = [r[0] for r in _sql(admin, "SELECT at FROM pgdr.heartbeat ORDER BY at")]
    before, after = lost_server["heartbeats"]
    assert before in beats and after not in beats
    assert _sql(_dsn(port, "postgres", server.password, HOSTILE_DB), 'SELECT count(*) FROM "Entries ü"') == [(100,)]
    # The application's logins work as before: the owner writes, the reader reads and may not write.
    _sql(owner, "INSERT INTO public.events (label) VALUES ('written after the recovery')")
    reader = _dsn(port, "Report Reader", "reader-secret", "app")
    assert _sql(reader, "SELECT count(*) FROM public.events") == [(3,)]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        _sql(reader, "DELETE FROM public.events")
    # The checks left nothing behind: no checking role, no amcheck where the server had none.
    assert _sql(admin, "SELECT 1 FROM pg_roles WHERE rolname = 'pgdr_scratch_reader'") == []
    assert _sql(owner, "SELECT 1 FROM pg_extension WHERE extname = 'amcheck'") == []
    # The report: stored, with the proof and the data-loss window.
    assert "RECOVERED AND PROMOTED" in done.output
    assert "Heartbeats at or before the target" in done.output and "data-loss window" in done.output
    assert "`app`" in done.output and "`ledger`" in done.output
    assert "- Proof: quick: " in done.output  # the plan says nothing: every page checked, rows not looked up
    # The incident's record for the drill's MTTR trend, where the drill reads every target's (it was never written:
    # the server's layout had no place for it)
    from pgdr.incident_review import incident_records
    from pgdr.storage.backends import S3Store
    from pgdr.storage.layout import BackupLayout

    store = S3Store(lost_server["s3_client"], BUCKET)
    (incident,) = [
        r
        for r in incident_records(store, BackupLayout(lost_server["prefix"]), target - timedelta(days=1))
        if r["kind"] == "server recovery"
    ]
    assert incident["subject"] == SERVER and incident["status"] == "restored" and incident["mttr_seconds"] > 0
    # The team hears of it as from the DAG: one Slack message with the recovery point and the report.
    (posted,) = [m["text"] for m in slack.messages]
    assert posted.startswith(":white_check_mark: [pgdr] Server lost") and "data-loss window" in posted, posted
    assert "posted to Slack" in done.output

    # A running server on that directory is refused; so is a non-empty directory without --delta.
    running = recover("--to", "latest", "--data-dir", str(data_dir))
    assert running.returncode == 1 and "is running on" in running.output, running.output
    recover.pg_ctl(data_dir, "-m", "fast", "-w", "stop")
    refused = recover("--to", "latest", "--data-dir", str(data_dir))
    assert refused.returncode == 1 and "is not empty" in refused.output and "--delta" in refused.output
    assert "Nothing was changed" in refused.output
    assert len(slack.messages) == 1  # a refusal changed nothing: the on-call reads it, no alert
    # The evidence log has the recovery (timeline, MTTR, data-loss window) and each refused attempt.
    finished, *refusals = recover.receipts()
    assert (finished["event"], finished["subject"], finished["result"]) == (
        "restore_finished",
        {"server": SERVER},
        "ok",
    )
    assert finished["actor"].startswith("the command line (python -m pgdr recover-server) as ")
    details = finished["details"]
    assert details["mode"] == "server" and details["recovery_point"] <= stamp.replace("Z", "+00:00")
    assert details["incident"]["mttr_seconds"] == details["achieved_rto_seconds"] > 0
    assert details["incident"]["data_loss_window_seconds"] is not None and details["rto_target_seconds"] > 0
    assert [(r["event"], r["result"]) for r in refusals] == [("restore_failed", "failed")] * 2
    assert "is running on" in refusals[0]["details"]["error"] and "is not empty" in refusals[1]["details"]["error"]


def test_pause_then_delta_finishes_a_damaged_directory_to_the_end_of_the_archive(lost_server, recover):
    from pgdr.postgres.binaries import free_port

    server = lost_server["server"]
    data_dir, port = recover.base / "data", free_port()
    # A recovery that stopped half-way: some files there, one damaged, one that does not belong.
    data_dir.mkdir()
    no_pause = recover("--to", "latest", "--data-dir", str(data_dir), "--pause")
    assert no_pause.returncode == 1 and "--pause needs a moment" in no_pause.output, no_pause.output
    stamp = lost_server["target"].strftime("%Y-%m-%dT%H:%M:%SZ")
    first = recover("--to", stamp, "--data-dir", str(data_dir), "--port", str(port), "--pause")
    assert first.returncode == 0, first.output
    assert "PAUSED AT THE TARGET" in first.output and "pg_ctl -D" in first.output
    paused = _dsn(port, "postgres", server.password, "app")
    assert _sql(paused, "SELECT pg_is_in_recovery()") == [(True,)]  # paused, readable, in its own configuration
    assert [r[0] for r in _sql(paused, "SELECT label FROM public.events ORDER BY id")][-1] == "before the target"
    recover.pg_ctl(data_dir, "-m", "immediate", "-w", "stop")
    shutil.rmtree(data_dir / "base" / sorted(os.listdir(data_dir / "base"))[-1])
    (data_dir / "global" / "pg_control").write_bytes(b"\0" * 8192)
    (data_dir / "stray file").write_text("not from the backup")

    done = recover("--to", "latest", "--data-dir", str(data_dir), "--port", str(port), "--delta", "--proof", "thorough")
    assert done.returncode == 0, done.output
    assert "- Proof: thorough: " in done.output and "--heapallindexed" in done.output
    assert "no suite in the plan" not in done.output  # pgdr's baseline expectations ran
    assert "files kept" in done.output and "replaced" in done.output
    assert not (data_dir / "stray file").exists()
    admin = _dsn(port, "postgres", server.password, "app")
    assert _sql(admin, "SELECT pg_is_in_recovery()") == [(False,)]
    # The end of the archive: everything, the incident's rows included.
    labels = [r[0] for r in _sql(admin, "SELECT label FROM public.events ORDER BY id")]
    assert labels == ["after the base backup", "before the target", "after the target"]
    after = lost_server["heartbeats"][1]
    assert after in [r[0] for r in _sql({**admin, "dbname": "postgres"}, "SELECT at FROM pgdr.heartbeat")]


def test_a_wrong_target_is_refused_before_anything_is_written(lost_server, recover):
    data_dir = recover.base / "data"
    bad = recover("--to", "yesterday", "--data-dir", str(data_dir))
    assert bad.returncode == 2 and "--to must be 'latest' or a UTC time" in bad.output
    early = recover("--to", "2020-01-01T00:00:00Z", "--data-dir", str(data_dir))
    assert early.returncode == 1 and "cannot be recovered: the recoverable window is" in early.output
    assert not data_dir.exists()


def test_a_rebuilt_server_archiving_into_the_same_prefix_is_alerted_and_never_mixed(
    lost_server, s3_server, session_dir, tmp_path
):
    """The lost server's replacement, initdb'd anew (a new system identifier), archives under the same name."""
    from types import SimpleNamespace

    from pgdr.errors import StorageUnavailable
    from pgdr.health import cluster_identity_check
    from pgdr.physical.basebackup import ForeignCluster, take_base_backup
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.postgres.client import PgEndpoint
    from pgdr.storage.backends import S3Store
    from support import archiving_server

    directory = session_dir / f"postgres-{lost_server['prefix']}-rebuilt"
    rebuilt = archiving_server(directory, s3_server.port, BUCKET, lost_server["prefix"], SERVER)
    archive = rebuilt.archive
    try:
        store = S3Store(s3_server.client, BUCKET)
        catalog = BaseBackupCatalog(store, archive.layout, SERVER)
        before = [e.backup_id for e in catalog.backups()]
        endpoint = PgEndpoint("127.0.0.1", rebuilt.port, "postgres", "postgres", rebuilt.password)
        with pytest.raises(ForeignCluster) as refused:
            take_base_backup(
                SERVER, endpoint, store, archive.layout, tmp_path, archive.url, newest=catalog.backups()[-1]
            )
        assert "another cluster (system identifier" in str(refused.value) and "own name" in str(refused.value)
        assert [e.backup_id for e in catalog.backups()] == before  # nothing mixed into the chain

        check = cluster_identity_check(SimpleNamespace(name=SERVER), _sysid(endpoint), catalog.backups(), archive.url)
        assert not check.ok and lost_server["full"].system_identifier in check.detail and archive.url in check.detail
        unreadable = cluster_identity_check(SimpleNamespace(name=SERVER), "1", StorageUnavailable("bucket gone"), "")
        assert not unreadable.ok and unreadable.detail == "cannot read the base backups: bucket gone"
        assert lost_server["full"].system_identifier != _sysid(endpoint)
    finally:
        rebuilt.destroy()


def _sysid(endpoint) -> str:
    from pgdr.postgres.client import connect

    with connect(endpoint) as conn:
        return conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()[0]


def test_mode_server_from_the_form_recovers_onto_the_restore_target(
    lost_server, plan, env, run_dag, slack, monkeypatch, recover
):
    """The form's mode server: the same recovery, run by the task the plan routes to the new host's queue."""
    from pgdr.postgres.binaries import free_port

    server = lost_server["server"]
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_LOST", server.connection_uri("app"))
    data_dir, port = recover.base / "from-the-form", free_port()
    restore = {"queue": "pgdr-new-host", "data_dir": str(data_dir), "port": port}
    if os.geteuid() == 0:
        restore["os_user"] = "nobody"
    from pgdr.airflow_glue.evidence import open_evidence
    from pgdr.storage.encryption import new_master_key

    key = {"conn_type": "generic", "login": "ev-1", "password": new_master_key()}
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_EVIDENCE_KEY", json.dumps(key))
    evidence = {"type": "s3", "bucket": BUCKET, "prefix": f"{env['prefix']}-form-evidence", "aws_conn_id": "pgdr_s3"}
    p = plan(
        databases=[{"name": "app", "conn_id": "pgdr_lost", "server": SERVER}],
        storage={
            "s3": {"type": "s3", "bucket": BUCKET, "prefix": lost_server["prefix"], "aws_conn_id": "pgdr_s3"},
            "evidence": evidence,
        },
        servers={
            SERVER: {
                "pitr": {"storage": "s3", "keep_window": "7d", "full_schedule": "@daily", "archive_timeout": "10s"},
                "restore": restore,
            }
        },
        evidence={"storage": "evidence", "key_conn_id": "pgdr_evidence_key"},
    )
    stamp = lost_server["target"].strftime("%Y-%m-%d %H:%M:%S")
    wrong = run_dag("pgdr_restore", run_conf={"database": "app", "mode": "server", "confirm": "app", "backup": stamp})
    assert wrong.states["plan_restore"] == "failed" and not data_dir.exists()
    assert any("type the server name 'lost'" in m.get("text", "") for m in slack.messages), slack.messages
    slack.clear()

    dry = run_dag(
        "pgdr_restore",
        run_conf={"database": "app", "mode": "server", "confirm": SERVER, "backup": stamp, "dry_run": True},
    )
    assert dry.get_state() == "success", dry.states
    assert dry.states[f"recover_server_{SERVER}"] == "skipped" and not data_dir.exists()

    declared = lost_server["target"] + timedelta(minutes=1)
    done = run_dag(
        "pgdr_restore",
        run_conf={
            "database": "app",
            "mode": "server",
            "confirm": SERVER,
            "backup": stamp,
            "incident_declared_at": declared.isoformat(),
            "incident_id": "INC-11",
        },
    )
    assert done.get_state() == "success", done.states
    assert done.states[f"recover_server_{SERVER}"] == "success"
    assert done.states["recover_to_moment"] == "skipped" and done.states["restore_backup"] == "skipped"
    owner = _dsn(port, "app_owner", "owner-secret", "app")
    try:
        assert _sql(owner, "SELECT pg_is_in_recovery()") == [(False,)]
        assert [r[0] for r in _sql(owner, "SELECT label FROM public.events ORDER BY id")] == [
            "after the base backup",
            "before the target",
        ]
    finally:
        recover.pg_ctl(data_dir, "-m", "fast", "-w", "stop")
    (summary,) = [m["text"] for m in slack.messages if "[pgdr] Server lost" in m.get("text", "")]
    assert "recovered and promoted" in summary and "data-loss window" in summary and "recoveries/" in summary
    assert "(incident INC-11)" in summary
    # Its receipt, written by the recovery task: the incident measured, the task's run named.
    (receipt,) = [r.body for r in open_evidence(p).receipts() if r.body["subject"] == {"server": SERVER}]
    assert receipt["event"] == "restore_finished" and receipt["details"]["incident"]["id"] == "INC-11"
    assert receipt["details"]["incident"]["declared_at"] == declared.isoformat()
    assert receipt["details"]["airflow"]["task_id"] == f"recover_server_{SERVER}"


DR_BUCKET = "pgdr-dr-copy"


def test_with_its_archive_lost_the_server_comes_back_from_a_copy_whose_missing_segment_health_names(
    lost_server, recover, slack, monkeypatch
):
    """#29: pgdr_copy's server task copies the WAL archive and the base backup to two copies (one streamed through
    the worker, one inside S3), each read back there; health names a segment missing in a copy and the window it
    breaks, and the next copy fills it; with the primary's endpoint gone, recover-server says where the copies are
    and ``--from`` recovers the server from one, every row as from the archive."""
    from pgdr.airflow_glue.connections import resources
    from pgdr.health import check_server_copies
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.physical.copies import copy_server
    from pgdr.plan import load_plan
    from pgdr.postgres.binaries import free_port

    port, prefix = lost_server["s3_port"], lost_server["prefix"]
    copies = {
        # another connection: streamed through the worker, as to another region or account
        "dr": {"type": "s3", "bucket": DR_BUCKET, "prefix": f"{prefix}-dr", "aws_conn_id": "pgdr_s3_dr"},
        # the archive's own connection: copied inside S3 (CopyObject)
        "dr_same": {"type": "s3", "bucket": DR_BUCKET, "prefix": f"{prefix}-same", "aws_conn_id": "pgdr_s3"},
    }
    plan_path = _write_lost_plan(recover.plan, prefix, copies, copies=["dr", "dr_same"], copy_rpo="1h")
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3", aws_connection(port))
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3_DR", aws_connection(port))
    res = resources(load_plan(plan_path))
    server = res.plan.server(SERVER)
    source_store, layout, archive = res.archive(server)
    client = source_store.client
    try:
        client.create_bucket(Bucket=DR_BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    full = lost_server["full"]

    summary = copy_server(server, res, datetime.now(UTC))
    for name in ("dr", "dr_same"):
        done = summary["targets"][name]
        assert done["base_backups"] == [full.backup_id] and done["wal_files"] >= 2 and done["error"] is None, summary
        store, copy_layout, copy_archive = res.archive(server, server.pitr.storage_named(name))
        (entry,) = BaseBackupCatalog(store, copy_layout, SERVER).backups()
        assert [(f.name, f.size, f.sha256) for f in entry.record.files] == [
            (f.name, f.size, f.sha256) for f in full.files
        ]
        for f in entry.record.files:  # the copy's own keys, its own bytes
            assert f.key.startswith(f"{prefix}-")
            stored = store.get_bytes(f.key)
            assert (len(stored), hashlib.sha256(stored).hexdigest()) == (f.size, f.sha256)
        wanted = [s.name for s in archive.segments(source_store) if s.name >= full.start_wal]
        assert [s.name for s in copy_archive.segments(store)] == wanted
    checks = {c.check: c for c in check_server_copies(server, res, datetime.now(UTC))}
    assert checks["copy_lag.dr"].ok and checks["copy_lag.dr_same"].ok, checks
    assert checks["copy_lag.dr"].value == 0.0

    # A segment lost in one copy: health names it and the window it breaks; the next copy puts it back.
    store, copy_layout, copy_archive = res.archive(server, server.pitr.storage_named("dr"))
    segments = copy_archive.segments(store)
    lost = segments[1] if len(segments) > 2 else segments[0]
    store.delete([lost.key])
    checks = {c.check: c for c in check_server_copies(server, res, datetime.now(UTC))}
    assert not checks["copy_lag.dr"].ok and lost.name in checks["copy_lag.dr"].detail, checks["copy_lag.dr"]
    assert "recovery" in checks["copy_lag.dr"].detail and checks["copy_lag.dr_same"].ok
    again = copy_server(server, res, datetime.now(UTC))
    assert again["targets"]["dr"]["wal_files"] == 1 and again["targets"]["dr_same"]["wal_files"] == 0, again
    assert all(c.ok for c in check_server_copies(server, res, datetime.now(UTC)))

    # The primary's endpoint is gone: recover-server says where the copies are; --from recovers from one.
    _write_connections(recover.connections, lost_server, slack, pgdr_s3_dr=aws_connection(port))
    gone = json.loads(recover.connections.read_text())
    gone["pgdr_s3"] = json.loads(aws_connection(free_port()))
    recover.connections.write_text(json.dumps(gone))
    data_dir, new_port = recover.base / "data", free_port()
    stamp = lost_server["target"].strftime("%Y-%m-%dT%H:%M:%SZ")
    refused = recover("--to", stamp, "--data-dir", str(data_dir))
    assert refused.returncode == 1 and "--from dr" in refused.output and "'dr_same'" in refused.output, refused.output
    wrong = recover("--to", stamp, "--data-dir", str(data_dir), "--from", "nowhere")
    assert wrong.returncode == 2 and "dr (a copy)" in wrong.output and "Nothing was changed" in wrong.output

    done = recover("--to", stamp, "--data-dir", str(data_dir), "--port", str(new_port), "--from", "dr")
    assert done.returncode == 0, done.output
    assert "read from       : copy 'dr'" in done.output
    server_pg = lost_server["server"]
    owner = _dsn(new_port, "app_owner", "owner-secret", "app")
    assert [r[0] for r in _sql(owner, "SELECT label FROM public.events ORDER BY id")] == [
        "after the base backup",
        "before the target",
    ]
    ledger = _dsn(new_port, "postgres", server_pg.password, HOSTILE_DB)
    assert _sql(ledger, 'SELECT count(*) FROM "Entries ü"') == [(100,)]
    assert f"s3://{DR_BUCKET}/{prefix}-dr/" in done.output  # the report is stored in the copy it read
