"""pgdr_backup end to end with dag.test(): real PostgreSQL, real S3 over HTTP, real pg_dump."""

from __future__ import annotations

import gzip
import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from conftest import BUCKET, local_backup_setup, planned_database, source_row_counts
from pgdr.records import VerificationRecord
from support import copy_backup_as

pytestmark = pytest.mark.integration

MANIFEST_KEYS = {
    "backup_id",
    "database",
    "dbname",
    "recovery_point",
    "started_at",
    "finished_at",
    "server_version",
    "client_version",
    "format",
    "compression",
    "compression_level",
    "dump_jobs",
    "files",
    "row_counts",
    "large_objects",
    "storage",
    "airflow",
    "manifest_format",
    "size",
    "stored_size",
    "compressed_by",
    "database_bytes",
}


def _check_manifest(manifest: dict, read_object, pg_server, run_id: str) -> None:
    """Assert everything a restore will rely on: fields, checksums, sizes and exact row counts."""
    assert MANIFEST_KEYS <= manifest.keys()
    assert manifest["database"] == "shop" and manifest["format"] == "directory"
    # pg_dump compressed the files itself (the plan's default), and they are stored as it wrote them.
    assert manifest["compression"] == "gzip:1" and manifest["compressed_by"] == "pg_dump"
    assert manifest["database_bytes"] > manifest["stored_size"] > 0
    assert manifest["server_version"].startswith("18") and "18." in manifest["client_version"]
    assert manifest["airflow"]["run_id"] == run_id and manifest["airflow"]["dag_id"] == "pgdr_backup"
    started = datetime.fromisoformat(manifest["started_at"])
    point = datetime.fromisoformat(manifest["recovery_point"])
    assert started <= point <= datetime.fromisoformat(manifest["finished_at"])
    names = {f["name"] for f in manifest["files"]}
    assert "toc.dat" in names and len(names) > 5
    for entry in manifest["files"]:
        stored = read_object(entry["key"])
        assert hashlib.sha256(stored).hexdigest() == entry["sha256"], entry["name"]
        assert len(stored) == entry["stored_size"] == entry["size"]
        if entry["name"][0].isdigit() and entry["name"].endswith(".dat.gz"):  # table data, as pg_restore reads it
            assert gzip.decompress(stored).rstrip(b"\n").endswith(b"\\.")  # the COPY data's end marker
    assert sum(f["name"].endswith(".dat.gz") for f in manifest["files"]) > 5
    assert manifest["row_counts"] == source_row_counts(pg_server, "shop")
    assert manifest["row_counts"]["sales.orders"] == 30000
    assert manifest["large_objects"] == 1
    # The password never reaches the manifest.
    assert pg_server.password not in json.dumps(manifest)


def test_backup_to_local_folder(plan, run_dag, pg_server, env):
    p = plan()
    dag_run = run_dag("pgdr_backup")
    assert dag_run.states == {
        "protect_pgdr_shop.back_up[0]": "success",
        "protect_pgdr_shop.prune_expired[0]": "success",
    }

    root = p.databases[0].storage.path
    manifests = list(root.glob("v1/shop/*/manifest.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    _check_manifest(manifest, lambda key: (root / key).read_bytes(), pg_server, dag_run.run_id)
    # Nothing but the backup itself is left behind: no partial files, no work files.
    leftovers = [p for p in root.rglob("*") if p.name.endswith(".partial")]
    assert leftovers == []


def test_backup_to_s3_emits_asset_event(plan, run_dag, pg_server, s3_server, s3_storage, env):
    plan(storage=s3_storage)
    dag_run = run_dag("pgdr_backup")
    assert dag_run.states["protect_pgdr_shop.back_up[0]"] == "success"

    listing = s3_server.client.list_objects_v2(Bucket=BUCKET, Prefix=f"{env['prefix']}/v1/shop/")
    keys = [o["Key"] for o in listing.get("Contents", [])]
    manifest_keys = [k for k in keys if k.endswith("/manifest.json")]
    assert len(manifest_keys) == 1
    manifest = json.loads(s3_server.client.get_object(Bucket=BUCKET, Key=manifest_keys[0])["Body"].read())
    _check_manifest(
        manifest,
        lambda key: s3_server.client.get_object(Bucket=BUCKET, Key=key)["Body"].read(),
        pg_server,
        dag_run.run_id,
    )
    assert manifest["storage"].startswith(f"s3://{BUCKET}/{env['prefix']}/v1/shop/")

    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        events = [e.extra for e in session.query(AssetEvent).all() if e.source_run_id == dag_run.run_id]
    assert len(events) == 1
    assert events[0]["backup_id"] == manifest["backup_id"]
    assert events[0]["location"] == manifest["storage"]
    assert events[0]["database"] == "shop"


def test_backfill_run_skips_instead_of_labelling_a_fresh_dump_with_an_old_date(plan, run_dag):
    p = plan()
    dag_run = run_dag("pgdr_backup", logical_date=datetime.now(UTC) - timedelta(days=3))
    assert dag_run.states["protect_pgdr_shop.back_up[0]"] == "skipped"
    assert not list(p.databases[0].storage.path.glob("v1/shop/*/manifest.json"))


def test_retry_of_a_completed_run_reuses_its_backup(plan, pg_server, env):
    """A task retried after its manifest was written must not take a second backup."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.backup import take_backup
    from pgdr.postgres.client import PgEndpoint

    p = plan()
    db = p.databases[0]
    store, layout = open_store(db.storage)
    endpoint = PgEndpoint("127.0.0.1", pg_server.port, "postgres", "shop", pg_server.password)
    first = take_backup(db, endpoint, store, layout, env["tmp"] / "w1", {"run_id": "scheduled__x"})
    again = take_backup(db, endpoint, store, layout, env["tmp"] / "w2", {"run_id": "scheduled__x"})
    assert again.reused and again.manifest.backup_id == first.manifest.backup_id
    assert len(list(db.storage.path.glob("v1/shop/*/manifest.json"))) == 1


def test_retention_keeps_newest_and_newest_verified_and_removes_stale_partials(plan, run_dag, env):
    """Retention on a real store: old backups go, the newest verified stays, partial uploads go."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    p = plan(defaults={"notify": {"slack_conn_id": "pgdr_slack"}, "retention": {"keep_last": 1, "keep_days": 0}})
    db = p.databases[0]
    store, layout = open_store(db.storage)
    catalog = BackupCatalog(store, layout, "shop")
    # Two old backups taken by earlier runs (copies of a real one, with older ids).
    run_dag("pgdr_backup")
    real = catalog.latest()
    old_ids = ["20250101T000000Z-aaaaaa", "20250201T000000Z-bbbbbb"]
    for old_id in old_ids:
        copy_backup_as(
            store, layout, real.manifest, old_id, datetime.strptime(old_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        )
    catalog.record_verification(VerificationRecord.from_dict({"backup_id": old_ids[0], "status": "verified"}))
    catalog.record_verification(VerificationRecord.from_dict({"backup_id": real.backup_id, "status": "failed"}))
    # A partial upload from a killed run long ago, and one that may still be in flight.
    store.put_bytes(layout.data_key("shop", "20250301T000000Z-cccccc", "toc.dat"), b"partial")
    in_flight = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-dddddd"
    store.put_bytes(layout.data_key("shop", in_flight, "toc.dat"), b"in flight")

    dag_run = run_dag("pgdr_backup")
    assert dag_run.states["protect_pgdr_shop.prune_expired[0]"] == "success"
    remaining = sorted(e.backup_id for e in catalog.backups())
    newest = catalog.latest().backup_id
    # Kept: the newest backup (keep_last 1) and the newest *verified* one, however old.
    assert remaining == sorted([old_ids[0], newest])
    assert not list(db.storage.path.glob("v1/shop/20250301T000000Z-cccccc/**/*"))
    assert (db.storage.path / layout.data_key("shop", in_flight, "toc.dat")).exists()


# -- faults -------------------------------------------------------------------------------------


def test_s3_unreachable_mid_upload_fails_after_retries_with_no_visible_backup(
    plan, run_dag, s3_server, s3_storage, fault_proxy, slack, env
):
    plan(storage=s3_storage)
    fault_proxy.cut_after(200_000)  # the endpoint vanishes part way through the data files
    dag_run = run_dag("pgdr_backup")
    assert fault_proxy.is_down
    assert dag_run.states["protect_pgdr_shop.back_up[0]"] == "failed"
    assert dag_run.tries["protect_pgdr_shop.back_up"] == 2  # the first try and its one retry
    assert dag_run.states["protect_pgdr_shop.prune_expired[0]"] == "upstream_failed"
    listing = s3_server.client.list_objects_v2(Bucket=BUCKET, Prefix=f"{env['prefix']}/")
    keys = [o["Key"] for o in listing.get("Contents", [])]
    assert not [k for k in keys if k.endswith("manifest.json")], keys

    fault_proxy.heal()
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.plan import load_plan

    store, layout = open_store(load_plan().databases[0].storage)
    assert BackupCatalog(store, layout, "shop").backups() == []
    # One alert, after the last try, naming the database and the storage problem.
    assert len(slack.messages) == 1
    text = slack.texts()[0]
    assert "pgdr_backup" in text and "shop" in text and "back_up" in text
    assert "S3 endpoint could not be reached" in text
    assert "no more retries" in text


def test_source_database_unreachable(plan, run_dag, monkeypatch, slack):
    from pgdr.postgres.binaries import free_port

    monkeypatch.setenv(
        "AIRFLOW_CONN_PGDR_SHOP",
        json.dumps(
            {
                "conn_type": "postgres",
                "host": "127.0.0.1",
                "port": free_port(),
                "login": "postgres",
                "password": "irrelevant-secret",
                "schema": "shop",
            }
        ),
    )
    p = plan()
    dag_run = run_dag("pgdr_backup")
    assert dag_run.states["protect_pgdr_shop.back_up[0]"] == "failed"
    assert dag_run.tries["protect_pgdr_shop.back_up"] == 2  # transient: retried
    text = slack.texts()[-1]
    assert "Cannot connect to database 'shop' at 127.0.0.1:" in text
    assert "Check that the server is up" in text
    assert "irrelevant-secret" not in text
    assert not p.databases[0].storage.path.exists() or not list(p.databases[0].storage.path.rglob("manifest.json"))


def test_wrong_password_fails_at_once_and_never_shows_the_password(
    plan, run_dag, pg_server, monkeypatch, slack, capfd, caplog
):
    wrong = "Wr0ng-Pa55word-do-not-log"
    conn = json.loads(pg_server.connection_uri("shop"))
    conn["password"] = wrong
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_SHOP", json.dumps(conn))
    plan()
    dag_run = run_dag("pgdr_backup")
    assert dag_run.states["protect_pgdr_shop.back_up[0]"] == "failed"
    assert dag_run.tries["protect_pgdr_shop.back_up"] == 1  # permanent: no retry
    text = slack.texts()[-1]
    assert "refused the credentials" in text and "pgdr_shop" in text
    captured = capfd.readouterr()
    for output in (text, captured.out, captured.err, caplog.text):
        assert wrong not in output


def test_plan_naming_an_unknown_connection(plan, run_dag, slack):
    plan(databases=[{"name": "shop", "conn_id": "pgdr_nowhere"}])
    dag_run = run_dag("pgdr_backup")
    assert dag_run.states["protect_pgdr_nowhere.back_up[0]"] == "failed"
    assert dag_run.tries["protect_pgdr_nowhere.back_up"] == 1
    text = slack.texts()[-1]
    assert "The Airflow connection 'pgdr_nowhere'" in text and "is not defined" in text
    assert "AIRFLOW_CONN_PGDR_NOWHERE" in text


def test_compression_this_pg_dump_lacks_fails_at_once_and_says_what_to_set(plan, run_dag, slack):
    """The embedded client has gzip only: asking for zstd must fail before any upload, without a retry
    and without waiting for the row counts, and the alert must say which setting fixes it."""
    p = plan(databases=[{"name": "shop", "conn_id": "pgdr_shop", "compression": "zstd:3"}])
    dag_run = run_dag("pgdr_backup")
    assert dag_run.states["protect_pgdr_shop.back_up[0]"] == "failed"
    assert dag_run.tries["protect_pgdr_shop.back_up"] == 1  # permanent: no retry
    text = slack.texts()[-1]
    assert "pg_dump of database 'shop' failed" in text and "has no zstd compression" in text
    assert "compression: gzip:1" in text and "PGDR_PG_BIN" in text
    root = p.databases[0].storage.path
    assert not root.exists() or not list(root.rglob("*.dat*"))


def test_row_counts_of_nested_partitions_are_summed_and_exact(pg_server):
    """Partitioned tables are counted from their leaves (one scan of the data, not two); the numbers
    must equal what a query on each table returns, at every level and for a table with no partitions."""
    import psycopg
    from pgdr.postgres.client import count_rows

    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS counts WITH (FORCE)")
        admin.execute("CREATE DATABASE counts")
    with psycopg.connect(**pg_server.dsn("counts"), autocommit=True) as conn:
        conn.execute("""
            CREATE TABLE m (id int, region text) PARTITION BY LIST (region);
            CREATE TABLE m_eu PARTITION OF m FOR VALUES IN ('eu') PARTITION BY RANGE (id);
            CREATE TABLE m_eu_low PARTITION OF m_eu FOR VALUES FROM (0) TO (500);
            CREATE TABLE m_eu_high PARTITION OF m_eu FOR VALUES FROM (500) TO (1000);
            CREATE TABLE m_other PARTITION OF m DEFAULT;
            CREATE TABLE nothing_yet (id int) PARTITION BY RANGE (id);
            INSERT INTO m SELECT g, CASE WHEN g % 3 = 0 THEN 'us' ELSE 'eu' END FROM generate_series(0, 999) g;
        """)
        counts, _ = count_rows(conn)
        direct = {key: conn.execute(f"SELECT count(*) FROM {key.split('.')[1]}").fetchone()[0] for key in counts}
        own = conn.execute("SELECT count(*) FROM ONLY m_other").fetchone()[0]
    assert counts == direct
    assert counts["public.m"] == 1000 and counts["public.m_other"] == own == 334 and counts["public.nothing_yet"] == 0
    assert counts["public.m_eu"] == counts["public.m_eu_low"] + counts["public.m_eu_high"] == 666


# -- a restore beside the upload (a point-in-time restore's dump) --------------------------------------------------


def test_beside_upload_reads_the_whole_dump_while_it_is_stored_twenty_times_four_at_once(pg_server, tmp_path):
    """Each dump is read in full by the reader beside its upload (as pg_restore does) while it is hashed and stored:
    every byte it read is what the manifest records, and nothing of the dump is removed under it."""
    from concurrent.futures import ThreadPoolExecutor

    from pgdr.logical.backup import take_backup
    from pgdr.storage.layout import BackupLayout

    db, endpoint, store = local_backup_setup(tmp_path, pg_server, store_root=tmp_path / "store", dump_jobs=2)

    def read_all(dump, row_counts):
        assert row_counts  # the exact counts come with the dump
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dump.iterdir()) if p.is_file()}

    def one(i: int):
        work = tmp_path / f"work-{i}"
        work.mkdir()
        result = take_backup(db, endpoint, store, BackupLayout(f"run-{i}"), work, beside_upload=read_all)
        return result.beside, {f.name: f.sha256 for f in result.manifest.files}

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(20)))
    for seen, stored in results:
        assert seen == stored and "toc.dat" in seen


def test_a_failure_beside_the_upload_is_raised_after_the_backup_is_stored(pg_server, tmp_path):
    from pgdr.logical.backup import take_backup
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.storage.layout import BackupLayout

    db, endpoint, store = local_backup_setup(tmp_path, pg_server, store_root=tmp_path / "store", dump_jobs=2)
    (tmp_path / "work").mkdir()

    def fails(dump, row_counts):
        raise RuntimeError("the target went away")

    with pytest.raises(RuntimeError, match="the target went away"):
        take_backup(db, endpoint, store, BackupLayout("failing"), tmp_path / "work", beside_upload=fails)
    (stored,) = BackupCatalog(store, BackupLayout("failing"), "shop").backups()  # a retry can restore it
    assert stored.manifest.row_counts == source_row_counts(pg_server, "shop")


def test_a_table_locked_by_a_migration_makes_the_backup_give_up_soon_naming_the_holder(pg_server, tmp_path):
    """The classic outage: a dump waiting behind (or holding up) an ALTER TABLE queues every query on that table.
    With lock_wait_timeout the backup gives up within it, stores nothing, names the session in the way, and
    succeeds once the lock is gone."""
    import time

    import psycopg
    from pgdr.logical.backup import LockWaitTimedOut, take_backup
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.storage.layout import BackupLayout

    db, endpoint, store = local_backup_setup(tmp_path, pg_server, store_root=tmp_path / "store", lock_wait_timeout="1s")
    (tmp_path / "work").mkdir()
    with psycopg.connect(**pg_server.dsn("shop"), application_name="billing-migration") as migration:
        migration.execute("LOCK TABLE sales.customers IN ACCESS EXCLUSIVE MODE")  # held until the block ends
        pid = migration.info.backend_pid
        started = time.monotonic()
        with pytest.raises(LockWaitTimedOut) as gave_up:
            take_backup(db, endpoint, store, BackupLayout(), tmp_path / "work")
        waited = time.monotonic() - started
    message = str(gave_up.value)
    assert "gave up after waiting 1.0s for a table's lock (pg_dump: error:" in message, message
    assert f"pid {pid} (postgres, billing-migration) holding an exclusive lock on sales.customers for" in message
    assert "'LOCK TABLE sales.customers IN ACCESS EXCLUSIVE MODE'" in message
    assert "lock_wait_timeout in the DR plan" in message and "the task retries" in message
    assert waited < 60, waited  # not a timing goal: it did not wait for the lock's holder
    assert BackupCatalog(store, BackupLayout(), "shop").backups() == []  # nothing stored
    (tmp_path / "work2").mkdir()
    assert take_backup(db, endpoint, store, BackupLayout(), tmp_path / "work2").manifest.row_counts


def test_the_lock_wait_timeout_is_checked_in_the_plan(tmp_path):
    from pgdr.plan import PlanError

    assert planned_database(tmp_path).lock_wait_timeout.total_seconds() == 30
    assert planned_database(tmp_path, lock_wait_timeout="2m").lock_wait_timeout.total_seconds() == 120
    with pytest.raises(PlanError, match="lock_wait_timeout: expected between 1s and 1h"):
        planned_database(tmp_path, lock_wait_timeout="2h")


@pytest.mark.parametrize("yield_after", [None, "1s"], ids=["warns", "gives-way"])
def test_a_backup_holding_up_a_migration_warns_once_or_gives_way(pg_server, tmp_path, monkeypatch, yield_after):
    """The backup's snapshot holds ACCESS SHARE on a table it counts while the count runs long; a migration's
    ALTER TABLE queues behind it. Without yield_after: one warning naming the statement, and the backup completes.
    With yield_after: the backup gives way (its count cancelled, its locks released: the ALTER goes through while
    the backup fails, to be retried), nothing stored."""
    import threading

    from pgdr.logical.backup import take_backup
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.logical.lockwatch import DumpYielded
    from pgdr.storage.layout import BackupLayout

    options = {"lock_wait_timeout": "1s", **({"yield_after": yield_after} if yield_after else {})}
    db, endpoint, store = local_backup_setup(tmp_path, pg_server, store_root=tmp_path / "store", **options)
    (tmp_path / "work").mkdir()
    _long_census(monkeypatch)
    warnings, migration = [], {}
    mover = threading.Thread(target=_migration_behind_the_snapshot, args=(pg_server, migration))
    mover.start()
    try:
        if yield_after:
            with pytest.raises(DumpYielded) as gave_way:
                take_backup(db, endpoint, store, BackupLayout(), tmp_path / "work", on_blocking=warnings.append)
            message = str(gave_way.value)
            assert "gave way: it held up pid" in message and "ALTER TABLE sales.customers ADD COLUMN probe" in message
            assert "(postgres, billing-migration)" in message and "yield_after (1.0s" in message
            assert BackupCatalog(store, BackupLayout(), "shop").backups() == []
        else:
            result = take_backup(db, endpoint, store, BackupLayout(), tmp_path / "work", on_blocking=warnings.append)
            assert result.manifest.row_counts
    finally:
        mover.join(60)
    assert "waited" in migration  # the migration went through (its own lock_timeout did not trip)
    if yield_after:
        assert migration["waited"] < 3.5, migration  # released when the backup gave way, not when its count ended
    else:
        (warning,) = warnings
        assert "is holding up pid" in warning and "'ALTER TABLE sales.customers ADD COLUMN probe int'" in warning
        assert "Set yield_after in the DR plan" in warning


def test_yield_after_is_checked_in_the_plan(tmp_path):
    from pgdr.plan import PlanError

    assert planned_database(tmp_path).yield_after is None  # off: warn, never give way
    assert planned_database(tmp_path, yield_after="20s").yield_after.total_seconds() == 20
    with pytest.raises(PlanError, match=r"\(shop\)\.yield_after: expected a duration such as 90s"):
        planned_database(tmp_path, yield_after="soon")


def _long_census(monkeypatch) -> None:
    """Make the census end with a long statement in the backup's snapshot that holds a table's lock: the count of a
    large table the dump could not answer for (a method this Python cannot decompress)."""
    import pgdr.logical.backup

    real = pgdr.logical.backup.row_census

    def long_count(conn, left=()):
        conn.execute("SELECT count(*) FROM ONLY sales.customers")
        conn.execute("SELECT pg_sleep(4)")
        return real(conn, left)

    monkeypatch.setattr(pgdr.logical.backup, "row_census", long_count)


def _migration_behind_the_snapshot(pg_server, migration: dict) -> None:
    """Once pg_dump is done and the snapshot is in its long count, run a migration's ALTER TABLE (queued behind the
    snapshot's locks), then roll it back; record in ``migration["waited"]`` how long it waited."""
    import time

    import psycopg

    with psycopg.connect(**pg_server.dsn("shop"), application_name="billing-migration", autocommit=True) as conn:
        deadline = time.monotonic() + 30
        # pg_dump done (a queued ALTER makes a parallel pg_dump fail at once instead: another test's case), the
        # snapshot in its long count.
        while conn.execute(
            "SELECT count(*) FILTER (WHERE application_name LIKE 'pgdr-dump-%') > 0 OR count(*) FILTER (WHERE "
            "application_name = 'pgdr-snapshot' AND query LIKE '%pg_sleep%') = 0 FROM pg_stat_activity"
        ).fetchone()[0]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        conn.execute("BEGIN")
        conn.execute("SET LOCAL lock_timeout = '20s'")
        conn.execute("ALTER TABLE sales.customers ADD COLUMN probe int")
        migration["waited"] = time.monotonic() - started
        conn.execute("ROLLBACK")


def test_the_warning_of_a_backup_holding_up_a_migration_reaches_slack(plan, run_dag, pg_server, monkeypatch, slack):
    """From the task: the watcher's thread sends the warning through the task's Slack connection; the backup goes on."""
    import threading

    plan(databases=[{"name": "shop", "conn_id": "pgdr_shop", "lock_wait_timeout": "1s"}])
    _long_census(monkeypatch)
    migration: dict = {}
    mover = threading.Thread(target=_migration_behind_the_snapshot, args=(pg_server, migration))
    mover.start()
    try:
        dag_run = run_dag("pgdr_backup")
    finally:
        mover.join(60)
    assert dag_run.states["protect_pgdr_shop.back_up[0]"] == "success", dag_run.states
    (warning,) = [t for t in slack.texts() if "is holding up" in t]
    assert warning.startswith(":warning: [pgdr] The backup of database 'shop' is holding up pid")
    assert "(postgres, billing-migration)" in warning and "ALTER TABLE sales.customers ADD COLUMN probe int" in warning
    assert "waited" in migration


# -- exact row counts from the dump itself ---------------------------------------------------------------------------


def test_row_counts_come_from_the_dump_not_a_second_scan_and_are_exact_for_awkward_rows(
    pg_server, tmp_path, monkeypatch
):
    """Every ordinary table is counted from pg_dump's files (none scanned again on the source), exactly, whatever
    its rows hold: newlines, a lone backslash-dot, tabs, carriage returns, NULLs, unicode; empty tables; partitions
    summed; names with spaces and quotes (found by oid, never parsed from pg_restore's listing)."""
    import pgdr.logical.backup
    import psycopg
    from pgdr.logical.backup import take_backup
    from pgdr.storage.layout import BackupLayout

    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS copytext WITH (FORCE)")
        admin.execute("CREATE DATABASE copytext")
    with psycopg.connect(**pg_server.dsn("copytext"), autocommit=True) as conn:
        conn.execute(r'''
            CREATE SCHEMA "My Schema";
            CREATE TABLE "My Schema"."Spaced ""Name""" (id int, note text);
            INSERT INTO "My Schema"."Spaced ""Name""" VALUES
                (1, E'two\nlines'), (2, E'\\.'), (3, E'tab\there'), (4, E'cr\r'), (5, NULL), (6, 'Grüße ✓'),
                (7, E'\\.\n\\.'), (8, '');
            INSERT INTO "My Schema"."Spaced ""Name"""
                SELECT g, repeat(md5(g::text), 40) FROM generate_series(9, 60000) g;
            CREATE TABLE empty_one (id int);
            CREATE TABLE parted (id int) PARTITION BY RANGE (id);
            CREATE TABLE parted_low PARTITION OF parted FOR VALUES FROM (0) TO (100);
            CREATE TABLE parted_high PARTITION OF parted FOR VALUES FROM (100) TO (1000);
            INSERT INTO parted SELECT generate_series(0, 999);
        ''')
    real, censuses = pgdr.logical.backup.row_census, []

    def recording(conn, left=()):
        censuses.append(real(conn, left))
        return censuses[-1]

    monkeypatch.setattr(pgdr.logical.backup, "row_census", recording)
    db, endpoint, store = local_backup_setup(tmp_path, pg_server, "copytext", store_root=tmp_path / "store")
    (tmp_path / "work").mkdir()
    manifest = take_backup(db, endpoint, store, BackupLayout(), tmp_path / "work").manifest
    assert manifest.row_counts == source_row_counts(pg_server, "copytext")
    assert manifest.row_counts['"My Schema"."Spaced ""Name"""'] == 60000
    assert manifest.row_counts["public.empty_one"] == 0 and manifest.row_counts["public.parted"] == 1000
    (census,) = censuses
    assert len(census.left) == 4 and census.counted == {}  # every ordinary table and leaf from the dump: no scan
    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as admin:
        admin.execute("DROP DATABASE copytext WITH (FORCE)")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_copy_data_rows_are_counted_across_any_chunking(chunk):
    from pgdr.logical.dumpcount import rows_in_copy_data

    def chunks(data: bytes):
        return (data[i : i + chunk] for i in range(0, len(data), chunk))

    rows = b"1\ttwo\\nlines\n2\t\\\\.\n3\t\\N\n"
    assert rows_in_copy_data(chunks(rows + b"\\.\n\n\n")) == 3
    assert rows_in_copy_data(chunks(b"\\.\n\n\n")) == 0  # an empty table
    assert rows_in_copy_data(chunks(rows + b"\\.\n")) == 3  # however many blank lines follow the end
    assert rows_in_copy_data(chunks(rows)) is None  # cut short: a damaged dump (the backup fails)
    assert rows_in_copy_data(chunks(b"")) is None


def test_a_gzip_file_of_several_members_is_read_whole(tmp_path):
    import gzip

    from pgdr.logical.dumpcount import _chunks, rows_in_copy_data

    path = tmp_path / "4242.dat.gz"
    path.write_bytes(gzip.compress(b"a\nb\n") + gzip.compress(b"c\n\\.\n\n\n"))
    assert rows_in_copy_data(_chunks(path)) == 3


def test_only_the_files_this_can_decompress_answer_for_their_tables(tmp_path, monkeypatch):
    """lz4 (no module here) and a table without a data file are left to the query in the snapshot."""
    import pgdr.logical.dumpcount
    from pgdr.logical.dumpcount import readable_table_data

    for name in ("toc.dat", "1.dat.gz", "2.dat.lz4", "3.dat", "4.dat.zst", "60.dat.gz"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(
        pgdr.logical.dumpcount, "table_data_entries", lambda _: {1: 101, 2: 102, 3: 103, 4: 104, 5: 105}
    )
    assert readable_table_data(tmp_path) == {
        101: tmp_path / "1.dat.gz",
        103: tmp_path / "3.dat",
        104: tmp_path / "4.dat.zst",
    }


def test_a_damaged_data_file_fails_the_backup_and_stores_nothing(pg_server, tmp_path, monkeypatch):
    """A file cut short after pg_dump wrote it (a full disk) is not counted by query and stored: the backup fails,
    naming the table, and retries."""
    import gzip

    import pgdr.logical.backup
    from pgdr.errors import DumpFailed
    from pgdr.logical.backup import take_backup
    from pgdr.storage.layout import BackupLayout

    real = pgdr.logical.backup.readable_table_data

    def cut_one(dump_dir):
        files = real(dump_dir)
        victim = max(files.values(), key=lambda p: p.stat().st_size)
        victim.write_bytes(gzip.compress(gzip.decompress(victim.read_bytes())[:-8]))
        return files

    monkeypatch.setattr(pgdr.logical.backup, "readable_table_data", cut_one)
    store_root = tmp_path / "store"
    db, endpoint, store = local_backup_setup(tmp_path, pg_server, store_root=store_root)
    (tmp_path / "work").mkdir()
    with pytest.raises(DumpFailed, match=r"database 'shop' is damaged: the data file of 1 table\(s\) \(sales\.\w+\)"):
        take_backup(db, endpoint, store, BackupLayout(), tmp_path / "work")
    assert not [p for p in store_root.rglob("*") if p.is_file()]


def test_a_backup_role_subject_to_row_level_security_fails_at_once_saying_to_give_it_bypassrls(pg_server, tmp_path):
    """pg_dump refuses to dump the part of a table a policy shows its role: pgdr says which role and table, and what
    to grant, without a retry; nothing is stored. With BYPASSRLS the same role backs up every row."""
    import psycopg
    from pgdr.errors import PermanentFailure
    from pgdr.logical.backup import RowSecurityInTheWay, take_backup
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.postgres.client import PgEndpoint
    from pgdr.storage.layout import BackupLayout
    from psycopg import sql

    role, password = "Backup Reader", "reader-secret-not-logged"
    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS rls_src WITH (FORCE)")
        conn.execute('DROP ROLE IF EXISTS "Backup Reader"')
        conn.execute("CREATE DATABASE rls_src")
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE pg_read_all_data").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    try:
        with psycopg.connect(**pg_server.dsn("rls_src"), autocommit=True) as conn:
            conn.execute("CREATE TABLE tenants_data (tenant text, n int)")
            conn.execute("INSERT INTO tenants_data SELECT 't' || g % 3, g FROM generate_series(1, 30) g")
            conn.execute("ALTER TABLE tenants_data ENABLE ROW LEVEL SECURITY")
            conn.execute("CREATE POLICY own ON tenants_data USING (tenant = current_user)")
        db, _, store = local_backup_setup(tmp_path, pg_server, "rls_src", store_root=tmp_path / "store")
        endpoint = PgEndpoint("127.0.0.1", pg_server.port, role, "rls_src", password)
        (tmp_path / "work").mkdir()
        with pytest.raises(RowSecurityInTheWay) as refused:
            take_backup(db, endpoint, store, BackupLayout(), tmp_path / "work")
        message = str(refused.value)
        assert isinstance(refused.value, PermanentFailure)  # no retry: it cannot help
        assert "role 'Backup Reader' is subject to row-level security on table 'tenants_data'" in message
        assert 'ALTER ROLE "Backup Reader" BYPASSRLS' in message and password not in message
        assert BackupCatalog(store, BackupLayout(), "rls_src").backups() == []

        with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
            conn.execute('ALTER ROLE "Backup Reader" BYPASSRLS')
        (tmp_path / "work2").mkdir()
        taken = take_backup(db, endpoint, store, BackupLayout(), tmp_path / "work2")
        assert taken.manifest.row_counts == {"public.tenants_data": 30}
    finally:
        with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS rls_src WITH (FORCE)")
            conn.execute('DROP ROLE IF EXISTS "Backup Reader"')
