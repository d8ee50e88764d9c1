"""Point-in-time recovery with real parts: the embedded server's archive_command is barman-cloud
writing to the S3 server; base backups are taken with pg_basebackup; recovery runs a scratch cluster."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta

import psycopg
import pytest
from conftest import BUCKET, PITR_SERVER

pytestmark = pytest.mark.integration


def store_of(s3_server):
    from pgdr.storage.backends import S3Store

    return S3Store(s3_server.client, BUCKET)


def endpoint_of(server, dbname="postgres"):
    from pgdr.postgres.client import PgEndpoint

    return PgEndpoint("127.0.0.1", server.port, "postgres", dbname, server.password)


def insert_marked(server, dbname: str, table_sql: str, label: str) -> datetime:
    """Insert one row labelled ``label`` in its own transaction; return its commit time (the server's clock)."""
    with psycopg.connect(**server.dsn(dbname), autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table_sql} (label) VALUES (%s)", (label,))
        return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def switch_and_wait(server, timeout: float = 60) -> None:
    """Close the current WAL segment and wait until the archiver has shipped it."""
    with psycopg.connect(**server.dsn(), autocommit=True) as conn:
        wal = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()
            if row[0] is not None and row[0] >= wal:
                return
            time.sleep(0.2)
    raise AssertionError(f"WAL segment {wal} was not archived within {timeout}s")


@pytest.fixture(scope="module")
def marked_table(pitr_server):
    """A quoted, mixed-case, unicode table in a database with a hostile name, on the PITR server."""
    with psycopg.connect(**pitr_server.dsn(), autocommit=True) as conn:
        conn.execute('DROP DATABASE IF EXISTS "Ledger DB ü" WITH (FORCE)')
        conn.execute('CREATE DATABASE "Ledger DB ü"')
    with psycopg.connect(**pitr_server.dsn("Ledger DB ü"), autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "Sales Dept"')
        conn.execute(
            'CREATE TABLE "Sales Dept"."Orders ü" (id bigserial PRIMARY KEY, label text NOT NULL, at timestamptz '
            "DEFAULT clock_timestamp())"
        )
    return "Ledger DB ü", '"Sales Dept"."Orders ü"'


def labels(endpoint, table_sql: str) -> list[str]:
    from pgdr.postgres.client import connect

    with connect(endpoint) as conn:
        return [r[0] for r in conn.execute(f"SELECT label FROM {table_sql} ORDER BY id").fetchall()]


def _wal_carried(store, record) -> tuple[list[str], int]:
    """The WAL files a stored base backup carries, and the bytes of everything else in its tar."""
    import tarfile

    import zstandard

    wal, other = [], 0
    with store.open_read(record.file("base.tar.zst").key) as stream:
        with zstandard.ZstdDecompressor().stream_reader(stream) as plain, tarfile.open(fileobj=plain, mode="r|") as tar:
            for member in tar:
                if member.isfile() and member.name.startswith("pg_wal/"):
                    wal.append(member.name)
                elif member.isfile():
                    other += member.size
    return sorted(wal), other


def test_an_incremental_carries_its_wal_and_reads_it_from_the_archive_when_the_server_recycled_it(
    pitr_server, s3_server, tmp_path, monkeypatch, caplog
):
    """An incremental base backup does not wait for the archiver (-X fetch: its WAL inside). When a long one finds
    that a checkpoint recycled its first segment, it is taken again with its WAL left to the archive (-X none)."""
    import threading

    import pgdr.physical.basebackup as basebackup
    from pgdr.physical.basebackup import take_base_backup
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.postgres.client import pg_tool

    archive, store, endpoint = pitr_server.archive, store_of(s3_server), endpoint_of(pitr_server)
    catalog = BaseBackupCatalog(store, archive.layout, PITR_SERVER)
    full = take_base_backup(PITR_SERVER, endpoint, store, archive.layout, tmp_path / "w1", archive.url)
    incremental = take_base_backup(
        PITR_SERVER, endpoint, store, archive.layout, tmp_path / "w2", archive.url, catalog.get(full.backup_id)
    )
    assert _wal_carried(store, full)[0] == []  # a full one leaves its WAL to the archive
    wal, data_bytes = _wal_carried(store, incremental)
    assert f"pg_wal/{incremental.start_wal}" in wal, wal
    assert f"pg_wal/archive_status/{incremental.start_wal}.done" in wal, wal

    # A long incremental: the real pg_basebackup, sending about 12 s of data; meanwhile two checkpoints, each after
    # a segment switch the archiver shipped, recycle the segment the backup started in.
    slow = tmp_path / "pg_basebackup"
    slow.write_text(
        f'#!/bin/sh\nexec "{pg_tool("pg_basebackup")}" --max-rate={max(32, data_bytes // 12 // 1024)}k "$@"\n'
    )
    slow.chmod(0o755)
    real_tool = basebackup.pg_tool
    monkeypatch.setattr(basebackup, "pg_tool", lambda name: str(slow) if name == "pg_basebackup" else real_tool(name))
    recycled = threading.Event()

    def recycle_while_it_streams():
        with psycopg.connect(**pitr_server.dsn(), autocommit=True) as conn:
            deadline = time.monotonic() + 60
            while (
                time.monotonic() < deadline
                and not conn.execute(
                    "SELECT 1 FROM pg_stat_progress_basebackup WHERE phase = 'streaming database files'"
                ).fetchone()
            ):
                time.sleep(0.05)
            for _ in range(2):
                switch_and_wait(pitr_server)
                conn.execute("CHECKPOINT")
            recycled.set()

    recycler = threading.Thread(target=recycle_while_it_streams, daemon=True)
    recycler.start()
    with caplog.at_level("WARNING", logger="pgdr.physical.basebackup"):
        again = take_base_backup(
            PITR_SERVER, endpoint, store, archive.layout, tmp_path / "w3", archive.url, catalog.get(full.backup_id)
        )
    recycler.join(60)
    assert recycled.is_set()
    (warning,) = [r.getMessage() for r in caplog.records if "removed WAL the incremental" in r.getMessage()]
    assert "taking it again, its WAL read from the archive instead (-X none)" in warning, warning
    assert again.kind == "incremental" and again.parent == full.backup_id
    assert _wal_carried(store, again)[0] == [], "the second try leaves the WAL to the archive"


@pytest.mark.parametrize("links", [True, False], ids=["hard links", "copies"])
def test_full_and_incremental_chain_recovers_exactly_to_the_target(
    pitr_server, s3_server, marked_table, tmp_path, links, monkeypatch
):
    """The chain is combined with hard links to the extracted files where it can (one filesystem, PostgreSQL 18's
    pg_combinebackup), by copies where it cannot; either way the recovery is exact."""
    import os

    import pgdr.physical.cluster
    from pgdr.physical.basebackup import take_base_backup
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.physical.cluster import ScratchCluster
    from pgdr.physical.recovery import choose_backup, prepare_data_directory, recover_cluster, recoverable_window
    from pgdr.workdir import work_dir_root

    dbname, table = marked_table
    archive, store = pitr_server.archive, store_of(s3_server)
    catalog = BaseBackupCatalog(store, archive.layout, PITR_SERVER)
    with psycopg.connect(**pitr_server.dsn(dbname)) as conn:  # the rows of the module's tests before this one
        earlier = [r[0] for r in conn.execute(f"SELECT label FROM {table} ORDER BY id").fetchall()]
    insert_marked(pitr_server, dbname, table, "before-full")
    full = take_base_backup(PITR_SERVER, endpoint_of(pitr_server), store, archive.layout, tmp_path / "w1", archive.url)
    assert full.kind == "full" and full.parent is None
    insert_marked(pitr_server, dbname, table, "after-full")
    incremental = take_base_backup(
        PITR_SERVER,
        endpoint_of(pitr_server),
        store,
        archive.layout,
        tmp_path / "w2",
        archive.url,
        parent=catalog.get(full.backup_id),
    )
    assert incremental.kind == "incremental" and incremental.parent == full.backup_id
    assert incremental.size < full.size / 2, (incremental.size, full.size)

    before = insert_marked(pitr_server, dbname, table, "before-target")
    time.sleep(0.6)
    target = before + timedelta(milliseconds=300)
    time.sleep(0.6)
    insert_marked(pitr_server, dbname, table, "after-target")
    switch_and_wait(pitr_server)

    window = recoverable_window(catalog, archive, store, tmp_path)
    assert window.oldest <= full.finished_at and window.newest > target
    entry = choose_backup(window, target)
    assert entry.backup_id == incremental.backup_id
    cluster = ScratchCluster(work_dir_root() / f"cluster-{tmp_path.name}", entry.record.pg_version)
    if not links:
        monkeypatch.setattr(pgdr.physical.cluster, "_can_link", lambda *_: False)
    try:
        prepared = prepare_data_directory(catalog, entry, store, tmp_path / "work", cluster.data_dir, archive)
        assert prepared.verified == [full.backup_id, incremental.backup_id]
        one_filesystem = os.stat(tmp_path).st_dev == os.stat(cluster.data_dir).st_dev
        assert prepared.combined == ("linked" if links and one_filesystem else "copied")
        result = recover_cluster(cluster, archive, store, target)
        assert labels(cluster.endpoint(dbname), table) == [*earlier, "before-full", "after-full", "before-target"]
        assert result.achieved_point is not None and before - timedelta(seconds=1) < result.achieved_point <= target
        assert result.stopped_before is not None and result.stopped_before > target
        assert result.wal_bytes_replayed and result.wal_bytes_replayed > 0
    finally:
        cluster.destroy()
    assert not cluster.root.exists()


def test_a_server_with_a_tablespace_outside_its_data_directory_is_refused_saying_what_to_do(
    pitr_server, s3_server, tmp_path
):
    """pgdr's base backup is one tar of the data directory: a tablespace elsewhere would be missing from it. The
    backup is refused before anything is stored, and the message says what to do."""
    from pgdr.errors import PermanentFailure
    from pgdr.physical.basebackup import take_base_backup
    from pgdr.physical.catalog import BaseBackupCatalog
    from psycopg import sql

    archive, store = pitr_server.archive, store_of(s3_server)
    catalog = BaseBackupCatalog(store, archive.layout, PITR_SERVER)
    before = ([b.backup_id for b in catalog.backups()], catalog.partial())
    location = pitr_server.root / "tablespace-elsewhere"
    location.mkdir()
    owner = pitr_server.data_dir.stat()
    os.chown(location, owner.st_uid, owner.st_gid)
    with psycopg.connect(**pitr_server.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLESPACE elsewhere LOCATION {}").format(sql.Literal(str(location))))
    try:
        with pytest.raises(PermanentFailure) as refused:
            take_base_backup(PITR_SERVER, endpoint_of(pitr_server), store, archive.layout, tmp_path / "w", archive.url)
    finally:
        with psycopg.connect(**pitr_server.dsn(), autocommit=True) as conn:
            conn.execute("DROP TABLESPACE elsewhere")
    assert "has tablespaces outside its data directory" in str(refused.value)
    assert "Move them into pg_default, or use logical backups for this server" in str(refused.value)
    assert ([b.backup_id for b in catalog.backups()], catalog.partial()) == before
