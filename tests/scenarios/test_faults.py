"""The fault matrix: real parts failing at the worst moment, each ending with a clear error, one
alert, retries only where a retry can pass, the source untouched, nothing left behind (no scratch
database, no work files) and nothing marked verified that was not.

Faults covered elsewhere: S3 unreachable mid-upload, a wrong password and an unreachable source
(``tasks/test_backup.py``); bit-flipped, truncated and missing objects, and manifests that lie about
checksums or row counts (``tasks/test_verify.py``); a restore target that already exists
(``tasks/test_restore.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from conftest import backup_into_local_store, source_row_counts
from pgdr.records import VerificationRecord

pytestmark = pytest.mark.integration


def _work_dir() -> Path:
    return Path(os.environ["PGDR_WORK_DIR"])


def _leftover_work() -> list[str]:
    """Work directories and passfiles that pgdr left under ``$PGDR_WORK_DIR``."""
    root = _work_dir()
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.startswith(("pgdr-", ".pgpass")) and p.name != "pgdr-alert-journal"  # the journal's spool is kept
    )


def _scratch_databases(server) -> list[str]:
    with psycopg.connect(**server.dsn("postgres")) as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'pgdr\\_%'")]


class WhenSeen(threading.Thread):
    """Watch ``pg_stat_activity`` of ``server`` and run ``action`` once a session matches ``where``."""

    def __init__(self, server, where: str, action, timeout: float = 120):
        super().__init__(daemon=True)
        self.server, self.where, self.action, self.timeout = server, where, action, timeout
        self.fired = threading.Event()
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        with psycopg.connect(**self.server.dsn("postgres"), autocommit=True) as conn:
            while not self.stop.is_set() and time.monotonic() < deadline:
                if conn.execute(
                    f"SELECT 1 FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND {self.where}"
                ).fetchone():
                    conn.close()
                    self.action()
                    self.fired.set()
                    return
                time.sleep(0.02)

    def finish(self) -> None:
        self.stop.set()
        self.join(30)


def _crash(server) -> None:
    """Stop ``server`` as a crash would: no checkpoint, every session cut. SIGQUIT (what ``pg_ctl -m immediate``
    sends) goes to the postmaster at once: starting pg_ctl first took long enough under a loaded CI machine for a
    0.4 s dump to finish before the crash (seen once: the backup succeeded, only pg_dumpall was cut)."""
    pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"the postmaster {pid} of {server.data_dir} did not exit within 30 s of SIGQUIT")


@pytest.fixture(scope="module")
def victim(session_dir, pg_server):
    """A server of its own, which these tests crash; restarted after each test."""
    from pgdr.local.embedded import EmbeddedServer, create_sample_database

    server = EmbeddedServer(session_dir / "postgres-victim", restore_password=pg_server.restore_password).start()
    create_sample_database(server, "shop", scale=3)
    yield server
    server.destroy()


@pytest.fixture
def restart(victim):
    yield victim
    if not victim.is_running():
        victim.start()


def test_source_server_stopped_mid_dump(plan, run_dag, restart, monkeypatch, slack):
    victim = restart
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_VICTIM", victim.connection_uri("shop"))
    p = plan(databases=[{"name": "shop", "conn_id": "pgdr_victim"}])
    crash = WhenSeen(victim, "datname = 'shop' AND query ILIKE 'COPY %'", lambda: _crash(victim))
    try:
        dag_run = run_dag("pgdr_backup")
    finally:
        crash.finish()
    assert crash.fired.is_set(), "the server was never caught dumping"
    assert dag_run.states["protect_pgdr_victim.back_up[0]"] == "failed"
    assert dag_run.tries["protect_pgdr_victim.back_up"] == 2  # the server may come back: retried once
    store_root = p.databases[0].storage.path
    assert not list(store_root.glob("v1/shop/*/manifest.json")) and not list(store_root.glob("v1/shop/**/*.dat*"))
    (alert,) = slack.texts()
    assert "back_up" in alert and "shop" in alert and "no more retries" in alert
    assert "cannot connect to database 'shop'" in alert.lower(), alert
    assert victim.password not in alert
    assert _leftover_work() == []
    victim.start()
    assert source_row_counts(victim, "shop")["sales.orders"] == 90000  # the source is intact after recovery


def test_restore_server_stopped_mid_restore_then_the_next_run_cleans_up(
    plan, run_dag, pg_server, restart, monkeypatch, slack, tmp_path
):
    victim = restart
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_VICTIM", victim.connection_uri("postgres"))
    p = plan(databases=[{"name": "shop", "conn_id": "pgdr_shop", "verify_conn_id": "pgdr_victim"}])
    root = p.databases[0].storage.path
    backup_id = backup_into_local_store(root, pg_server)
    conf = {"database": "shop", "backup_id": backup_id}

    crash = WhenSeen(
        victim, "datname LIKE 'pgdr\\_verify\\_shop\\_%' AND application_name = 'pgdr'", lambda: _crash(victim)
    )
    try:
        first = run_dag("pgdr_verify_restore", run_conf=conf)
    finally:
        crash.finish()
    assert crash.fired.is_set()
    assert first.states["verify.restore_and_check[0]"] == "failed"
    assert first.states["verify.validate_and_apply_privileges[0]"] == "upstream_failed"
    record = json.loads((root / "v1/shop" / backup_id / "verification.json").read_text())
    assert record["status"] == "failed" and record["failed_phase"] == "restore_backup"  # never "verified"
    assert any("restore_and_check" in t for t in slack.texts())
    assert _leftover_work() == []

    victim.start()
    assert _scratch_databases(victim)  # the crashed run's scratch database survived the crash
    slack.clear()
    second = run_dag("pgdr_verify_restore", run_conf=conf)
    assert second.states["verify.record_verification[0]"] == "success", second.states
    assert _scratch_databases(victim) == []  # the leftover was dropped, and this run's own too
    assert json.loads((root / "v1/shop" / backup_id / "verification.json").read_text())["status"] == "verified"
    assert [t.split(":", 2)[1] for t in slack.texts()] == ["large_green_circle"]  # only: recovered


_RUN_VERIFY = """
import sys
from pgdr.local.runner import load_dag
load_dag("pgdr_verify_restore").test(run_conf={"database": "shop", "backup_id": sys.argv[1]})
"""


def test_worker_killed_mid_restore_then_the_next_run_cleans_up(plan, run_dag, pg_server, slack):
    """SIGKILL of the worker (the task's whole process group) while pg_restore runs: the scratch
    database and the task's work directory, with its passfile, stay behind; the next run removes
    both, and only those."""
    p = plan()
    root = p.databases[0].storage.path
    backup_id = backup_into_local_store(root, pg_server)
    worker = subprocess.Popen(
        [sys.executable, "-c", _RUN_VERIFY, backup_id],
        env=dict(os.environ),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill = WhenSeen(
        pg_server,
        "datname LIKE 'pgdr\\_verify\\_shop\\_%' AND application_name = 'pgdr'",
        lambda: os.killpg(worker.pid, signal.SIGKILL),
    )
    try:
        worker.wait(timeout=180)
    finally:
        kill.finish()
    assert kill.fired.is_set() and worker.returncode == -signal.SIGKILL
    time.sleep(1)  # pg_restore, killed with the group, lets go of its sessions
    leftovers = _scratch_databases(pg_server)
    assert leftovers, "the killed run left no scratch database: the kill came too late to test anything"
    assert any(".pgpass" in name for name in _leftover_work()), _leftover_work()
    assert not (root / "v1/shop" / backup_id / "verification.json").exists()  # nothing was recorded
    _fail_orphaned_runs("pgdr_verify_restore")  # what the scheduler's heartbeat check does to a dead worker's run

    dag_run = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "backup_id": backup_id})
    assert dag_run.states["verify.record_verification[0]"] == "success", dag_run.states
    assert _scratch_databases(pg_server) == []
    assert _leftover_work() == []
    assert json.loads((root / "v1/shop" / backup_id / "verification.json").read_text())["status"] == "verified"


def _fail_orphaned_runs(dag_id: str) -> None:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState

    with create_session() as session:
        for dag_run in session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.state == DagRunState.RUNNING):
            dag_run.state = DagRunState.FAILED


def test_missing_manifest_means_no_backup(plan, run_dag, pg_server, slack):
    p = plan()
    root = p.databases[0].storage.path
    backup_id = backup_into_local_store(root, pg_server)
    (root / "v1/shop" / backup_id / "manifest.json").unlink()
    dag_run = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "backup_id": backup_id})
    assert dag_run.states["find_backups"] == "failed" and dag_run.tries["find_backups"] == 1
    (alert,) = slack.texts()
    assert f"No complete backup '{backup_id}'" in alert and "a backup without a manifest does not exist" in alert
    assert _scratch_databases(pg_server) == []


@pytest.fixture
def tiny_disk(monkeypatch, tmp_path):
    """A 1 MB file system as the work directory (tmpfs, mounted as root); skips where none can be made."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("disk-full tests mount a 1 MB tmpfs and need root: run the suite as root (CI does)")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "pgdr-tiny", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): run as root on a machine that allows mounts")
    monkeypatch.setenv("PGDR_WORK_DIR", str(mount_point))
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_no_space_left_where_pgdr_dumps(plan, run_dag, tiny_disk, slack):
    p = plan()
    dag_run = run_dag("pgdr_backup")
    assert dag_run.states["protect_pgdr_shop.back_up[0]"] == "failed"
    (alert,) = slack.texts()
    assert "No space left on device" in alert and str(tiny_disk) in alert and "PGDR_WORK_DIR" in alert, alert
    assert not list(p.databases[0].storage.path.glob("v1/shop/*/manifest.json"))
    assert list(tiny_disk.iterdir()) == []


def test_no_space_left_where_pgdr_downloads(plan, run_dag, pg_server, tiny_disk, slack):
    p = plan()
    root = p.databases[0].storage.path
    backup_id = backup_into_local_store(root, pg_server)
    dag_run = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "backup_id": backup_id})
    assert dag_run.states["verify.restore_and_check[0]"] == "failed"
    assert dag_run.states["verify.drop_scratch[0]"] == "success"
    alerts = [t for t in slack.texts() if "restore_and_check" in t]
    assert len(alerts) == 1 and "No space left on device" in alerts[0] and "PGDR_WORK_DIR" in alerts[0], slack.texts()
    assert json.loads((root / "v1/shop" / backup_id / "verification.json").read_text())["status"] == "failed"
    assert _scratch_databases(pg_server) == []
    assert list(tiny_disk.iterdir()) == []


def test_s3_unreachable_mid_download_during_a_restore(plan, run_dag, pg_server, s3_storage, fault_proxy, slack):
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    p = plan(storage=s3_storage)
    assert run_dag("pgdr_backup").states["protect_pgdr_shop.back_up[0]"] == "success"
    store, layout = open_store(p.databases[0].storage)
    entry = BackupCatalog(store, layout, "shop").latest()
    BackupCatalog(store, layout, "shop").record_verification(
        VerificationRecord.from_dict({"backup_id": entry.backup_id, "status": "verified"})
    )
    before = _databases(pg_server)
    slack.clear()
    # check_checksums reads every stored byte once; the endpoint vanishes half way through the
    # second read, restore_backup's download.
    fault_proxy.cut_after_download(int(entry.manifest.stored_size * 1.5))
    dag_run = run_dag("pgdr_restore", run_conf={"database": "shop", "mode": "replace", "confirm": "shop"})
    assert fault_proxy.is_down
    assert dag_run.states["check_checksums"] == "success"
    assert dag_run.states["restore_backup"] == "failed" and dag_run.tries["restore_backup"] >= 2
    assert dag_run.states["swap_into_place"] == "upstream_failed"
    assert _databases(pg_server) == before  # the half-restored target was dropped; the live one kept
    texts = slack.texts()
    assert len(texts) == 1 and "S3 endpoint could not be reached" in texts[0] and "restore_backup" in texts[0], texts
    assert _leftover_work() == []
    fault_proxy.heal()


def _databases(server) -> set[str]:
    with psycopg.connect(**server.dsn("postgres")) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database")}


def test_two_restores_of_one_database_never_swap_over_each_other(pg_server):
    """Two replace-mode restores planned against the same live database: the second finds it
    replaced by the first and stops with nothing changed; one that swaps while another holds the
    swap lock stops too. Every copy stays."""
    from pgdr.incident import SwapFailed, database_oid, swap_into_place
    from pgdr.postgres.client import PgEndpoint

    names = ["race live", "race_a", "race_b", "race live_pre_a", "race live_pre_b"]

    def sql(statement: str, db: str = "postgres"):
        with psycopg.connect(**pg_server.dsn(db), autocommit=True) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else None

    for name in ("race live", "race_a", "race_b"):
        sql(f'CREATE DATABASE "{name}"')
        sql(f"CREATE TABLE which AS SELECT '{name}' AS copy", name)
    server = PgEndpoint("127.0.0.1", pg_server.port, "postgres", "postgres", pg_server.password)
    try:
        planned = database_oid(server, "race live")
        swap_into_place(server, "race live", "race_a", "race live_pre_a", expected_live_oid=planned)
        with pytest.raises(
            SwapFailed, match="was replaced since this restore was planned.*still available as 'race_b'"
        ):
            swap_into_place(server, "race live", "race_b", "race live_pre_b", expected_live_oid=planned)
        assert sql("SELECT copy FROM which", "race live") == [("race_a",)]
        assert sql("SELECT copy FROM which", "race_b") == [("race_b",)]
        assert _databases(pg_server) >= {"race live", "race_b", "race live_pre_a"}

        with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(hashtextextended('pgdr swap race live', 0))")
            with pytest.raises(SwapFailed, match="is swapping databases .* right now; nothing was changed"):
                swap_into_place(
                    server,
                    "race live",
                    "race_b",
                    "race live_pre_b",
                    expected_live_oid=database_oid(server, "race live"),
                )
        assert sql("SELECT copy FROM which", "race live") == [("race_a",)]
    finally:
        for name in names:
            sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true') if name in _databases(pg_server) else None
            sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_retention_deleting_a_backup_while_it_is_verified(plan, run_dag, pg_server, slack):
    """Retention (or anyone) deletes the backup while verify-restore reads it: nothing is marked,
    the run fails saying what happened, and nothing of the run is left in the store or the server."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    p = plan()
    root = p.databases[0].storage.path
    backup_id = backup_into_local_store(root, pg_server)
    store, layout = open_store(p.databases[0].storage)
    prune = WhenSeen(
        pg_server,
        "datname LIKE 'pgdr\\_verify\\_shop\\_%' AND application_name = 'pgdr'",
        lambda: BackupCatalog(store, layout, "shop").delete_backup(backup_id),
    )
    try:
        dag_run = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "backup_id": backup_id})
    finally:
        prune.finish()
    assert prune.fired.is_set()
    assert dag_run.states["verify.record_verification[0]"] == "failed"
    assert not (root / "v1/shop" / backup_id).exists()  # no verification.json, no validation report
    assert any("was deleted from" in t and "while it was being verified" in t for t in slack.texts()), slack.texts()
    assert _scratch_databases(pg_server) == []
    assert _leftover_work() == []


def test_the_password_is_in_no_argv_log_report_store_or_xcom(
    plan, run_dag, pg_server, capfd, caplog, slack, monkeypatch
):
    """A backup, a verify-restore and an incident restore, encrypted client-side, while every client
    tool's command line is watched: neither the connection's password nor the master key (as base64
    or as bytes) is in any of them, nor in anything else pgdr wrote, logged or passed on."""
    import base64

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from pgdr.storage.encryption import new_master_key

    secret = pg_server.password.encode()
    master_key = new_master_key()
    monkeypatch.setenv(
        "AIRFLOW_CONN_PGDR_KEY", json.dumps({"conn_type": "generic", "login": "k1", "password": master_key})
    )
    secrets_text = [pg_server.password, master_key]
    secrets_bytes = [secret, master_key.encode(), base64.b64decode(master_key)]
    p = plan(defaults={"encryption": {"key_conn_id": "pgdr_key"}})
    argv: list[bytes] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    cmd = (proc / "cmdline").read_bytes()
                except OSError:
                    continue
                if any(tool in cmd for tool in (b"pg_dump", b"pg_restore", b"pg_amcheck")):
                    argv.append(cmd)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        runs = [run_dag("pgdr_backup")]
        from pgdr.airflow_glue.connections import open_store
        from pgdr.logical.catalog import BackupCatalog

        store, layout = open_store(p.databases[0].storage)
        backup_id = BackupCatalog(store, layout, "shop").latest().backup_id
        runs.append(run_dag("pgdr_verify_restore", run_conf={"database": "shop", "backup_id": backup_id}))
        runs.append(run_dag("pgdr_restore", run_conf={"database": "shop", "target_name": "shop_secret_check"}))
    finally:
        stop.set()
        watcher.join(10)
        with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS shop_secret_check WITH (FORCE)")
    assert all(str(r.state) == "success" for r in runs), [r.states for r in runs]
    assert {tool for tool in (b"pg_dump", b"pg_restore", b"pg_amcheck") if any(tool in c for c in argv)} == {
        b"pg_dump",
        b"pg_restore",
        b"pg_amcheck",
    }, "the watcher saw no client tool run"
    assert not [c for c in argv if any(s in c for s in secrets_bytes)]
    stored = [f for f in p.databases[0].storage.path.rglob("*") if f.is_file()]
    assert stored and not [f for f in stored if any(s in f.read_bytes() for s in secrets_bytes)]
    assert BackupCatalog(store, layout, "shop").get(backup_id).manifest.encryption.key_id == "k1"
    captured = capfd.readouterr()
    for text in (captured.out, captured.err, caplog.text, *slack.texts()):
        assert not [s for s in secrets_text if s in text]
    with create_session() as session:
        values = [row.value for row in session.query(XComModel).filter(XComModel.run_id.in_([r.run_id for r in runs]))]
    assert values and not [v for v in values if any(s in json.dumps(v, default=str) for s in secrets_text)]
    assert _leftover_work() == []
