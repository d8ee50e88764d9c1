"""The PITR fault matrix, with real parts: an archiver whose S3 goes away, a WAL segment missing from the
middle of the archive, a damaged base backup, a moment outside the window, a worker without matching binaries."""

from __future__ import annotations

import io
import tarfile
import time

import psycopg
import pytest
from conftest import BUCKET
from support import FaultProxy

pytestmark = pytest.mark.integration
SERVER = "flaky"
PREFIX = "pitr-faults"


@pytest.fixture(scope="module")
def flaky(session_dir, s3_server):
    """A server archiving through a proxy the tests can cut (S3 down for the archiver only), with one full base
    backup."""
    from pgdr.physical.basebackup import take_base_backup
    from pgdr.postgres.client import PgEndpoint
    from pgdr.storage.backends import S3Store
    from support import archiving_server

    proxy = FaultProxy(s3_server.port)
    server = archiving_server(session_dir / "postgres-flaky", proxy.port, BUCKET, PREFIX, SERVER, archive_timeout_s=5)
    archive = server.archive
    with psycopg.connect(**server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE marks (id serial PRIMARY KEY, label text)")
    store = S3Store(s3_server.client, BUCKET)
    endpoint = PgEndpoint("127.0.0.1", server.port, "postgres", "postgres", server.password)
    work = session_dir / "flaky-work"
    full = take_base_backup(SERVER, endpoint, store, archive.layout, work / "full", archive.url)
    yield {
        "server": server,
        "proxy": proxy,
        "archive": archive,
        "store": store,
        "endpoint": endpoint,
        "full": full,
        "work": work,
    }
    server.destroy()
    proxy.close()


def catalog(flaky):
    from pgdr.physical.catalog import BaseBackupCatalog

    return BaseBackupCatalog(flaky["store"], flaky["archive"].layout, SERVER)


def write_and_switch(server, n: int) -> list[str]:
    """Write a row and close the WAL segment ``n`` times; return the closed segments' names."""
    names = []
    with psycopg.connect(**server.dsn(), autocommit=True) as conn:
        for i in range(n):
            conn.execute("INSERT INTO marks (label) VALUES (%s)", (f"row {i}",))
            names.append(conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0])
    return names


@pytest.mark.timeout(240)
def test_a_failing_archiver_stops_the_base_backup_and_the_archive_catches_up_without_a_gap(flaky, tmp_path):
    from pgdr.physical.archive import ArchiverFailing
    from pgdr.physical.basebackup import take_base_backup
    from pgdr.physical.heartbeat import switch_and_wait_archived

    server, proxy, archive, store = flaky["server"], flaky["proxy"], flaky["archive"], flaky["store"]
    proxy.cut_after(0)  # S3 goes away for the archiver
    try:
        pending = write_and_switch(server, 2)
        started = time.monotonic()
        with pytest.raises(ArchiverFailing) as failure:
            take_base_backup(SERVER, flaky["endpoint"], store, archive.layout, tmp_path / "b", archive.url)
        assert time.monotonic() - started < 120  # stopped, not waiting forever for the archive
        message = str(failure.value)
        assert "archive_command is failing" in message and "last failed WAL segment 0000" in message
        assert catalog(flaky).partial() == []  # nothing was uploaded: the upload comes after pg_basebackup
        assert [e.backup_id for e in catalog(flaky).backups()] == [flaky["full"].backup_id]
        with psycopg.connect(**server.dsn()) as conn:
            failed, last_failed = conn.execute("SELECT failed_count, last_failed_wal FROM pg_stat_archiver").fetchone()
        assert failed > 0 and last_failed >= pending[0]
    finally:
        proxy.heal()
    newest = switch_and_wait_archived(flaky["endpoint"], 120)
    segments = archive.segments(store)
    reached = archive.check_continuous(segments, flaky["full"].start_wal)  # no gap from the base backup on
    assert reached.name >= newest and {p for p in pending} <= {s.name for s in segments}


def test_a_missing_wal_segment_is_named_with_the_window_it_costs(flaky, tmp_path):
    from pgdr.physical.archive import WalGap
    from pgdr.physical.cluster import ScratchCluster
    from pgdr.physical.recovery import prepare_data_directory
    from pgdr.workdir import work_dir_root

    archive, store = flaky["archive"], flaky["store"]
    write_and_switch(flaky["server"], 3)
    from pgdr.physical.heartbeat import switch_and_wait_archived

    switch_and_wait_archived(flaky["endpoint"], 60)
    segments = archive.segments(store)
    victim = segments[-3]
    saved = store.get_bytes(victim.key)
    store.delete([victim.key])
    cluster = ScratchCluster(work_dir_root() / f"gap-{tmp_path.name}", flaky["full"].pg_version)
    try:
        with pytest.raises(WalGap) as gap:
            prepare_data_directory(
                catalog(flaky), catalog(flaky).get(flaky["full"].backup_id), store, tmp_path, cluster.data_dir, archive
            )
        message = str(gap.value)
        assert f"WAL segment {victim.name} is missing" in message
        assert "recovery window" in message and "full base backup" in message
        assert not cluster.data_dir.exists()  # refused before anything was downloaded or started
    finally:
        store.put_bytes(victim.key, saved)
        cluster.destroy()


def _rewrite_stored_tar(store, record, layout, change, name="PG_VERSION"):
    """Replace a stored base.tar.zst by one whose file ``name`` has other bytes (``change``; None: left out); fix the
    record's SHA-256, so only the check against PostgreSQL's manifest can tell."""
    import zstandard

    entry = record.file("base.tar.zst")
    original = store.get_bytes(entry.key)
    out = io.BytesIO()
    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(original), read_across_frames=True).read()
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as src:
        with tarfile.open(fileobj=out, mode="w:", format=tarfile.USTAR_FORMAT) as dst:
            for member in src.getmembers():
                data = src.extractfile(member).read() if member.isfile() else None
                if member.name == name:
                    data = change(data)
                    if data is None:
                        continue
                    member.size = len(data)
                dst.addfile(member, io.BytesIO(data) if data is not None else None)
    _put_with_record(store, record, layout, zstandard.ZstdCompressor().compress(out.getvalue()))
    return original


def _put_with_record(store, record, layout, stored: bytes) -> None:
    """Store ``stored`` as the base backup's base.tar.zst, and a record that agrees with it."""
    import hashlib
    from dataclasses import replace

    from pgdr.physical.catalog import BaseBackupCatalog, BaseBackupFile

    store.put_bytes(record.file("base.tar.zst").key, stored)
    files = tuple(
        BaseBackupFile(f.name, f.key, len(stored), hashlib.sha256(stored).hexdigest())
        if f.name == "base.tar.zst"
        else f
        for f in record.files
    )
    BaseBackupCatalog(store, layout, record.server).write_record(replace(record, files=files))


def test_a_damaged_base_backup_is_rejected_before_a_cluster_starts(flaky, tmp_path):
    from pgdr.errors import ChecksumMismatch
    from pgdr.physical.cluster import ScratchCluster
    from pgdr.physical.recovery import prepare_data_directory
    from pgdr.workdir import work_dir_root

    archive, store, full = flaky["archive"], flaky["store"], flaky["full"]
    key = full.file("base.tar.zst").key
    cluster = ScratchCluster(work_dir_root() / f"damaged-{tmp_path.name}", full.pg_version)
    original = store.get_bytes(key)
    try:
        # 1. bytes changed in the bucket after upload: the record's SHA-256 no longer matches
        store.put_bytes(key, original[:-10] + bytes(10))
        with pytest.raises(ChecksumMismatch, match="does not match its base backup record"):
            prepare_data_directory(
                catalog(flaky), catalog(flaky).get(full.backup_id), store, tmp_path / "a", cluster.data_dir, archive
            )
        # 2. a file damaged before upload (the record agrees with the stored bytes): the manifest check refuses it
        for n, (name, change, problem) in enumerate(
            [
                ("PG_VERSION", lambda data: b"17\n", '"PG_VERSION" has checksum'),
                ("PG_VERSION", lambda data: b"18.0\n", '"PG_VERSION" has size 5, the manifest says 3'),
                ("global/pg_control", lambda data: None, '"global/pg_control" is in the manifest but not in the'),
            ]
        ):
            store.put_bytes(key, original)
            _rewrite_stored_tar(store, full, archive.layout, change, name)
            with pytest.raises(ChecksumMismatch) as rejected:
                prepare_data_directory(
                    catalog(flaky),
                    catalog(flaky).get(full.backup_id),
                    store,
                    tmp_path / f"b{n}",
                    cluster.data_dir,
                    archive,
                )
            message = str(rejected.value)
            assert "The check against PostgreSQL's manifest rejected base backup" in message, message
            assert problem in message and "take a new full base backup" in message, message
            assert not cluster.data_dir.exists() and not cluster.log_file.exists()
        # 3. the stored tar cut short, its record made to agree: a cut tar, said so
        store.put_bytes(key, original)
        _rewrite_stored_tar(store, full, archive.layout, lambda data: data)
        import zstandard

        whole = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(store.get_bytes(key))).read()
        _put_with_record(store, full, archive.layout, zstandard.ZstdCompressor().compress(whole[: len(whole) // 2]))
        with pytest.raises(ChecksumMismatch, match="is not a readable tar .* cut short"):
            prepare_data_directory(
                catalog(flaky), catalog(flaky).get(full.backup_id), store, tmp_path / "c", cluster.data_dir, archive
            )
        # 4. a manifest of another cluster (its own checksum and the record made to agree): refused
        import hashlib
        import json
        from dataclasses import replace

        from pgdr.physical.catalog import BaseBackupCatalog, BaseBackupFile

        store.put_bytes(key, original)
        item = full.file("backup_manifest")
        saved_manifest = store.get_bytes(item.key)
        data = json.loads(saved_manifest)
        body = saved_manifest[: saved_manifest.rindex(b'"Manifest-Checksum"')].replace(
            str(data["System-Identifier"]).encode(), b"1234567890123456789", 1
        )
        forged = body + f'"Manifest-Checksum": "{hashlib.sha256(body).hexdigest()}"}}\n'.encode()
        store.put_bytes(item.key, forged)
        files = tuple(
            BaseBackupFile(f.name, f.key, len(forged), hashlib.sha256(forged).hexdigest()) if f is item else f
            for f in full.files
        )
        BaseBackupCatalog(store, archive.layout, SERVER).write_record(replace(full, files=files))
        try:
            with pytest.raises(ChecksumMismatch, match="is of the cluster with system identifier 1234567890123456789"):
                prepare_data_directory(
                    catalog(flaky), catalog(flaky).get(full.backup_id), store, tmp_path / "e", cluster.data_dir, archive
                )
        finally:
            store.put_bytes(item.key, saved_manifest)
    finally:
        store.put_bytes(key, original)
        from pgdr.physical.catalog import BaseBackupCatalog

        BaseBackupCatalog(store, archive.layout, SERVER).write_record(full)
        cluster.destroy()


def test_a_moment_outside_the_window_names_the_recoverable_range(flaky, tmp_path):
    from datetime import timedelta

    from pgdr.physical.heartbeat import switch_and_wait_archived
    from pgdr.physical.recovery import TargetOutsideWindow, choose_backup, recoverable_window

    # A commit after the base backup, archived: without one the window is the single moment the backup ended
    # (nothing to stop recovery at), which choose_backup rightly refuses.
    write_and_switch(flaky["server"], 1)
    switch_and_wait_archived(flaky["endpoint"], 60)
    window = recoverable_window(catalog(flaky), flaky["archive"], flaky["store"], tmp_path)
    for moment in (window.oldest - timedelta(hours=1), window.newest + timedelta(minutes=5)):
        with pytest.raises(TargetOutsideWindow) as outside:
            choose_backup(window, moment)
        assert f"the recoverable window is {window.describe()}" in str(outside.value)
    assert choose_backup(window, window.oldest).backup_id == flaky["full"].backup_id


def test_a_worker_without_the_backups_major_version_says_what_to_install():
    from pgdr.postgres.binaries import BinariesMissing, server_bin_dir_for

    with pytest.raises(BinariesMissing) as missing:
        server_bin_dir_for(170004)
    assert (
        "PostgreSQL 17" in str(missing.value)
        and "$PGDR_PG_BIN" in str(missing.value)
        and "version 18" in str(missing.value)
    )
    assert server_bin_dir_for(180006).joinpath("pg_ctl").exists()


def test_health_alerts_once_when_the_archiver_fails_and_once_when_it_recovers(
    flaky, plan, env, run_dag, slack, monkeypatch, s3_storage
):
    from pgdr.physical.heartbeat import switch_and_wait_archived

    server = flaky["server"]
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_FLAKY", server.connection_uri("postgres"))
    storage = {**s3_storage, "pitr": {"type": "s3", "bucket": BUCKET, "prefix": PREFIX, "aws_conn_id": "pgdr_s3"}}
    plan(
        databases=[
            {"name": "shop", "conn_id": "pgdr_shop", "storage": "s3"},
            {"name": "flakydb", "conn_id": "pgdr_flaky", "dbname": "postgres", "server": SERVER, "storage": "s3"},
        ],
        storage=storage,
        servers={SERVER: {"pitr": {"storage": "pitr", "rpo": "5m"}}},
    )
    flaky["proxy"].cut_after(0)
    try:
        with psycopg.connect(**server.dsn()) as conn:
            failed_before = conn.execute("SELECT failed_count FROM pg_stat_archiver").fetchone()[0]
        write_and_switch(server, 1)
        # barman-cloud retries inside one attempt (boto3's backoff): wait for the server to record the failure.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with psycopg.connect(**server.dsn()) as conn:
                if conn.execute("SELECT failed_count FROM pg_stat_archiver").fetchone()[0] > failed_before:
                    break
            time.sleep(0.5)
        else:
            raise AssertionError("the archiver never failed while S3 was cut")
        failing = run_dag("pgdr_health")
        second = run_dag("pgdr_health")
    finally:
        flaky["proxy"].heal()
    assert failing.states["check_server[0]"] == "success", failing.states
    alerts = [m["text"] for m in slack.messages if "archive_command" in m.get("text", "")]
    assert len(alerts) == 1, slack.messages  # the second run finds the same state: no second message
    assert f"archive_command of server '{SERVER}' is failing" in alerts[0] and "WAL segment 0000" in alerts[0]
    switch_and_wait_archived(flaky["endpoint"], 120)
    slack.clear()
    recovered = run_dag("pgdr_health")
    assert recovered.get_state() == "success" and second.get_state() == "success"
    assert any("archiver" in m.get("text", "") and SERVER in m.get("text", "") for m in slack.messages), slack.messages
    assert not any("is failing" in m.get("text", "") for m in slack.messages)


def test_a_base_backup_stored_before_zstd_still_verifies_and_restores(flaky, tmp_path):
    """Base backups stored before 2026-12 are a gzip'd tar: their restore and check keep pg_verifybackup."""
    import gzip
    import hashlib
    from dataclasses import replace

    import zstandard
    from pgdr.physical.catalog import BaseBackupCatalog, BaseBackupFile
    from pgdr.physical.cluster import ScratchCluster, is_streamed, verify_backup
    from pgdr.physical.recovery import prepare_data_directory
    from pgdr.workdir import work_dir_root

    archive, store, full = flaky["archive"], flaky["store"], flaky["full"]
    layout = archive.layout
    zst = full.file("base.tar.zst")
    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(store.get_bytes(zst.key))).read()
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as src, tarfile.open(fileobj=out, mode="w:") as dst:
        for member in src.getmembers():  # pg_basebackup -D <dir> wrote the manifest beside the tar, not in it
            if member.name != "backup_manifest":
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    legacy = gzip.compress(out.getvalue(), compresslevel=1)
    key = layout.file_key(SERVER, full.backup_id, "base.tar.gz")
    store.put_bytes(key, legacy)
    old = BaseBackupFile("base.tar.gz", key, len(legacy), hashlib.sha256(legacy).hexdigest())
    files = tuple(old if f.name == "base.tar.zst" else f for f in full.files)
    BaseBackupCatalog(store, layout, SERVER).write_record(replace(full, files=files))
    cluster = ScratchCluster(work_dir_root() / f"legacy-{tmp_path.name}", full.pg_version)
    try:
        entry = catalog(flaky).get(full.backup_id)
        assert not is_streamed(entry)
        prepared = prepare_data_directory(catalog(flaky), entry, store, tmp_path, cluster.data_dir, archive)
        assert prepared.timings["verify_stored"] > 0 and "download_check_extract" not in prepared.timings
        assert (cluster.data_dir / "PG_VERSION").read_text() == f"{full.pg_version // 10000}\n"
        verify_backup(cluster.data_dir, "the restored legacy base backup")
        # a damaged legacy one is still refused by pg_verifybackup
        with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:") as src:
            broken = io.BytesIO()
            with tarfile.open(fileobj=broken, mode="w:") as dst:
                for member in src.getmembers():
                    data = src.extractfile(member).read() if member.isfile() else None
                    if member.name == "PG_VERSION":
                        data = b"17\n"
                    dst.addfile(member, io.BytesIO(data) if data is not None else None)
        damaged = gzip.compress(broken.getvalue())
        store.put_bytes(key, damaged)
        files = tuple(
            replace(old, size=len(damaged), sha256=hashlib.sha256(damaged).hexdigest())
            if f.name == "base.tar.gz"
            else f
            for f in files
        )
        BaseBackupCatalog(store, layout, SERVER).write_record(replace(full, files=files))
        cluster.destroy()
        from pgdr.errors import ChecksumMismatch

        with pytest.raises(ChecksumMismatch, match="pg_verifybackup rejected base backup .*PG_VERSION"):
            prepare_data_directory(
                catalog(flaky), catalog(flaky).get(full.backup_id), store, tmp_path / "d", cluster.data_dir, archive
            )
    finally:
        store.delete([key])
        BaseBackupCatalog(store, layout, SERVER).write_record(full)
        cluster.destroy()


def test_a_stored_tar_that_cannot_be_written_fails_the_base_backup_and_leaves_no_pg_basebackup(
    flaky, tmp_path, monkeypatch
):
    """A full disk on the worker while the tar streams: the error says so, pg_basebackup is stopped and waited for
    (not left running, e.g. waiting on the archiver with nobody watching), nothing is recorded, the next one works."""
    import errno
    import subprocess

    import pgdr.physical.basebackup as basebackup

    archive, store = flaky["archive"], flaky["store"]
    before = [e.backup_id for e in catalog(flaky).backups()]
    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)  # kept alive here: only pgdr's own wait() can set its returncode

    def full_disk(stream, out, what):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(basebackup, "compress_tar", full_disk)
    monkeypatch.setattr(basebackup.subprocess, "Popen", Recorded)
    with pytest.raises(OSError, match="No space left on device"):
        basebackup.take_base_backup(SERVER, flaky["endpoint"], store, archive.layout, tmp_path / "a", archive.url)
    (process,) = started
    assert process.returncode is not None  # stopped and waited for by pgdr
    assert [e.backup_id for e in catalog(flaky).backups()] == before and catalog(flaky).partial() == []
    monkeypatch.undo()
    taken = basebackup.take_base_backup(SERVER, flaky["endpoint"], store, archive.layout, tmp_path / "b", archive.url)
    assert taken.file("base.tar.zst").size > 0
    store.delete([f.key for f in taken.files] + [archive.layout.record_key(SERVER, taken.backup_id)])
