"""Taking a base backup from the worker: pg_basebackup, checksum, upload, record last.

pgdr runs ``pg_basebackup`` over the replication protocol (nothing runs on the database host):
the tar on stdout (``-Ft -D -``), compressed with zstd and checked file by file against the
backup's manifest as it streams (:mod:`pgdr.physical.tarstream`; a pgbench database shrinks about
24x), a fast checkpoint, and ``-X none``: the WAL the backup needs is in the archive, shipped by
the server's ``archive_command``. An *incremental*
base backup (PostgreSQL 17+, ``summarize_wal = on``) is taken with ``--incremental`` against its
parent's ``backup_manifest`` and holds only the blocks changed since, and its own WAL (``-X fetch``:
the few segments from its start to its end, checked by :mod:`pgdr.physical.tarstream`).

``-X none`` makes ``pg_basebackup`` wait until the backup's last WAL segment is archived, and it
has no timeout: with a failing archiver it would wait forever. pgdr therefore watches
``pg_stat_archiver`` while the backup runs and stops it, with an error that names the failing
segment, as soon as archiving fails (an incremental one too: the archive is what recovers past it).
The server checks for that segment once a second, so the wait cost an incremental most of its time
(0.9-1.0 s of 1.2-1.4 s on the bench's 2 GB); ``-X fetch`` does not wait. It needs the WAL still on the
server at the backup's end: when a checkpoint recycled it during a long incremental, the backup is taken
again with ``-X none``.

A server of the plan may name ``source_conn_id``, a hot standby: the base backup is then read there (the primary's
disk reads nothing for it), chosen as a logical backup's source is (:func:`pgdr.logical.standby.choose_source`: a
standby lagging past ``max_standby_lag`` is not used). The WAL archive stays the primary's: a standby that does not
archive itself (``archive_mode = on``, not ``always``) does not wait for it at the backup's end, so pgdr waits until
the primary has archived the backup's last segment before the backup is recorded (:func:`wait_archived_by_primary`).
The standby must be the same cluster (system identifier) as the primary, else nothing is taken.

Each file is hashed (SHA-256) and uploaded; the record (``backup.json``) is written last.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pgdr.errors import ChecksumMismatch, DumpFailed, PermanentFailure
from pgdr.logical.standby import BackupSource
from pgdr.physical.archive import ArchiverFailing, ArchiverState, archiver_state, segment_of_lsn
from pgdr.physical.catalog import BaseBackupCatalog, BaseBackupEntry, BaseBackupFile, BaseBackupRecord
from pgdr.physical.heartbeat import switch_and_wait_archived
from pgdr.physical.tarstream import MANIFEST, STORED_TAR, Manifest, check_against_record, compress_tar
from pgdr.postgres.client import PgEndpoint, connect, endpoint_conninfo, passfile_env, pg_tool, tool_error
from pgdr.storage.backends import BackupStore, sha256_stream
from pgdr.storage.layout import PhysicalLayout, new_backup_id

log = logging.getLogger(__name__)
# CRC32C, PostgreSQL's default: with its built-in SHA-256 (no OpenSSL) the server spent 7 s of 9.5 s hashing 2 GB.
MANIFEST_CHECKSUMS = "CRC32C"


@dataclass(frozen=True)
class ServerFacts:
    """What a base backup needs to know of the server, read before it starts."""

    system_identifier: str
    pg_version: int
    timeline: int
    wal_segment_size: int
    archive_mode: str
    summarize_wal: str
    archiver: ArchiverState  # when the backup started
    full_page_writes: str = "on"  # off: no base backup can be taken on its standby


def server_facts(endpoint: PgEndpoint) -> ServerFacts:
    """Read the server's identity and archiving state."""
    with connect(endpoint) as conn:
        row = conn.execute(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()), "
            "current_setting('server_version_num')::int, (SELECT timeline_id FROM pg_control_checkpoint()), (SELECT "
            "setting::int * 1 FROM pg_settings WHERE name = 'wal_segment_size'), current_setting('archive_mode'), "
            "current_setting('summarize_wal', true), current_setting('full_page_writes')"
        ).fetchone()
        return ServerFacts(*row[:6], archiver_state(conn), row[6])


def check_archiving(facts: ServerFacts, endpoint: PgEndpoint, archive_url: str) -> None:
    """Refuse a base backup the archive cannot complete: archiving off."""
    if facts.archive_mode not in ("on", "always"):
        raise PermanentFailure(
            f"The server of {endpoint.describe()} does not archive WAL (archive_mode = {facts.archive_mode}), so a "
            "base backup of it could never be recovered. Set the archive_command lines in its postgresql.conf "
            f"(README, Point-in-time recovery; archive: {archive_url}) and restart it."
        )


def _watch_archiver(
    endpoint: PgEndpoint, facts: ServerFacts, process: subprocess.Popen, stop: threading.Event, found: list
) -> None:
    """Stop ``process`` when the server's archiver starts failing: ``pg_basebackup -X none`` would wait forever."""
    while not stop.wait(2.0):
        try:
            with connect(endpoint, application_name="pgdr-archiver-watch") as conn:
                state = archiver_state(conn)
        except Exception:  # noqa: BLE001 - the backup's own connection reports an unreachable server
            continue
        if state.new_failures(facts.archiver) > 0:
            found.append((state.last_failed_wal, state.new_failures(facts.archiver)))
            if process.poll() is None:
                process.terminate()
            return


class ForeignCluster(PermanentFailure):
    """The server is another cluster than the one whose base backups its prefix holds."""


def foreign_cluster_message(server: str, newest, identifier: str, archive_url: str) -> str:
    """Return what to do when ``server`` is now another cluster (``identifier``) than its newest base backup's."""
    return (
        f"Server {server!r} is now another cluster (system identifier {identifier}) than the one whose base backups "
        f"and WAL are under its prefix (newest base backup {newest.backup_id}, system identifier "
        f"{newest.record.system_identifier}): it was rebuilt (initdb, or recovered with pgdr recover-server) and "
        f"its archive_command writes into the old server's archive {archive_url}. No base backup was taken, so the "
        "two are not mixed. Give the new server its own name in the plan's servers: and in its archive_command (a "
        "new prefix), then take a full base backup of it."
    )


def check_same_cluster(facts, newest, server: str, archive_url: str) -> None:
    """Refuse a base backup of a server that is not the cluster its prefix's base backups are of."""
    if newest is not None and newest.record.system_identifier != facts.system_identifier:
        raise ForeignCluster(foreign_cluster_message(server, newest, facts.system_identifier, archive_url))


# How long a base backup taken on a standby waits for the primary to archive the segment holding its end.
STANDBY_ARCHIVE_WAIT_S = 900.0


def check_standby_of(standby: PgEndpoint, at: ServerFacts, primary: ServerFacts, server: str) -> None:
    """Refuse a "standby" that is another cluster than the primary's (its base backup would mix into the archive), or
    the standby of a primary that writes no full-page images (PostgreSQL refuses it: the copy could hold torn pages)."""
    if primary.full_page_writes != "on":
        raise PermanentFailure(
            f"The base backup of server {server!r} is to be read on its standby ({standby.describe()}), but the "
            "primary runs with full_page_writes = off: a page copied on a standby could then be torn, so PostgreSQL "
            "refuses the backup there. No base backup was taken. Set full_page_writes = on on the primary (a "
            "reload, then CHECKPOINT), or remove the server's source_conn_id from the DR plan to back up from the "
            "primary."
        )
    # (not the timeline: a standby's control file names the one of its last restartpoint, stale for a while after a
    # failover; pg_basebackup records the timeline the backup's WAL is on)
    if at.system_identifier != primary.system_identifier:
        raise PermanentFailure(
            f"The standby of server {server!r}, {standby.describe()}, is not a replica of it: its system identifier "
            f"is {at.system_identifier}, the primary's {primary.system_identifier}. No base backup was taken, so "
            "nothing of another cluster is mixed into the archive. Point the server's source_conn_id in the DR plan "
            "at a streaming replica of this primary (or remove it to back up from the primary)."
        )


def wait_archived_by_primary(primary: PgEndpoint, segment: str, timeout_s: float) -> None:
    """Wait until ``primary`` has archived WAL ``segment`` (the end of a base backup read on its standby): at once by
    closing its current segment (``pg_switch_wal()``), else, when its role may not, by its ``archive_timeout``.

    :raises ArchiverFailing: when archiving fails meanwhile, or has not got there in ``timeout_s``.
    """
    import psycopg

    from pgdr.physical.archive import wait_archived

    try:
        switch_and_wait_archived(primary, timeout_s)  # a segment after the backup's end: so it too is archived
        return
    except psycopg.errors.InsufficientPrivilege:
        log.info("The primary's role may not switch WAL (pg_switch_wal): waiting for its archive_timeout instead.")
    with connect(primary, application_name="pgdr-basebackup") as conn:
        wait_archived(
            conn,
            segment,
            archiver_state(conn),
            timeout_s,
            failing=lambda state: (
                f"The primary's archive_command is failing (last failed WAL segment {state.last_failed_wal}) "
                f"while the base backup read on its standby waits for segment {segment}. Check the primary's log "
                "for 'archive command failed' and the storage target; the task will retry."
            ),
            late=lambda state: (
                f"The primary did not archive WAL segment {segment}, the end of the base backup read on its "
                f"standby, within {timeout_s:.0f}s (last archived: {state.last_archived_wal}). Its archiver is "
                "behind or stuck (pg_stat_archiver), or archive_timeout is off and the primary idle: grant the "
                "server's role EXECUTE on pg_switch_wal() so pgdr closes the segment itself."
            ),
        )


STANDBY_REPLAY_WAIT_S = 60.0  # how long an incremental one on a standby waits for it to replay the primary's checkpoint


def restartpoint_after(primary: PgEndpoint, standby: PgEndpoint, lsn: str, server: str) -> None:
    """Make sure an incremental base backup on ``standby`` can start after ``lsn`` (its parent's end).

    On a standby a base backup starts at a restartpoint, which only a checkpoint record the primary wrote can give:
    after a quiet spell the newest one may be older than the parent's end, and PostgreSQL refuses the backup. When
    the primary's newest checkpoint is that old, pgdr asks the primary for one (``CHECKPOINT``, which its role needs
    ``pg_checkpoint`` for: the write of dirty pages the primary would do at its next timed checkpoint anyway), then
    waits until the standby has replayed it.
    """
    import psycopg

    from pgdr.logical.standby import PrimaryMark, replay_position
    from pgdr.physical.archive import lsn_to_int

    with connect(primary, application_name="pgdr-basebackup") as conn:
        checkpoint, redo, at = conn.execute(
            "SELECT checkpoint_lsn::text, redo_lsn::text, now() FROM pg_control_checkpoint()"
        ).fetchone()
        if lsn_to_int(redo) < lsn_to_int(lsn):
            try:
                conn.execute("CHECKPOINT")
            except psycopg.errors.InsufficientPrivilege:
                raise DumpFailed(
                    f"The incremental base backup of server {server!r} on its standby cannot start yet: the primary "
                    f"has written no checkpoint since the parent base backup ended (at {lsn}), and its role "
                    f"({primary.describe()}) may not request one. Grant it pg_checkpoint (GRANT pg_checkpoint TO "
                    f"{primary.user}); meanwhile the task retries, and succeeds after the primary's next timed "
                    "checkpoint (checkpoint_timeout)."
                ) from None
            checkpoint, at = conn.execute("SELECT checkpoint_lsn::text, now() FROM pg_control_checkpoint()").fetchone()
    if not replay_position(standby, PrimaryMark(checkpoint, at), STANDBY_REPLAY_WAIT_S).caught_up:
        raise DumpFailed(
            f"The incremental base backup of server {server!r} on its standby ({standby.describe()}) cannot start: "
            f"the standby has not replayed the primary's checkpoint at {checkpoint} within "
            f"{STANDBY_REPLAY_WAIT_S:.0f}s. Check its replication (pg_stat_replication on the primary); the task "
            "retries."
        )


@dataclass
class _Taken:
    """What one run of ``pg_basebackup`` gave: the checked tar's manifest, size and SHA-256, or why not."""

    returncode: int = 0
    stderr: str = ""
    manifest: Manifest | None = None
    tar_size: int = 0
    tar_sha256: str = ""
    streamed: DumpFailed | None = None  # the tar cut short, or not what its manifest says
    stopped: bool = False  # pgdr stopped pg_basebackup (its exit status then says nothing)
    archiver_failing: tuple | None = None  # (last failed segment, failures) seen while it ran


def _stream_base_backup(
    args: list[str],
    read_from: PgEndpoint,
    endpoint: PgEndpoint,
    facts: ServerFacts,
    workdir: Path,
    out: Path,
    server: str,
) -> _Taken:
    """Run ``pg_basebackup`` (``args``: the tar on stdout) and store its tar zstd-compressed in ``out``, checked against
    its manifest as it streams, while a thread watches the archiver of ``endpoint``."""
    taken = _Taken()
    found: list = []
    stop = threading.Event()
    out.mkdir(parents=True, exist_ok=True)
    with passfile_env(read_from, workdir) as env, open(workdir / "pg_basebackup.err", "w+") as errors:
        process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=errors)
        watcher = threading.Thread(target=_watch_archiver, args=(endpoint, facts, process, stop, found), daemon=True)
        watcher.start()
        try:
            with process.stdout, open(out / STORED_TAR, "wb") as stored:
                try:
                    taken.manifest, taken.tar_size, taken.tar_sha256 = compress_tar(
                        process.stdout, stored, f"the base backup of server {server!r}"
                    )
                except ChecksumMismatch as err:  # cut short (its error below), or not what its manifest says
                    taken.streamed = DumpFailed(f"{err} The task retries.")
                    try:  # a tar cut short: pg_basebackup is exiting, its own error says why
                        process.wait(timeout=5)
                    except subprocess.TimeoutExpired:  # still sending: what it sent is not what it says
                        taken.stopped = True
                        process.terminate()
            process.wait()
        except BaseException:  # the stored tar could not be written (a full disk): pg_basebackup is not left behind
            if process.poll() is None:
                process.terminate()
            process.wait()
            raise
        finally:
            stop.set()
            watcher.join()
        errors.seek(0)
        taken.stderr = errors.read()
    taken.returncode = process.returncode
    taken.archiver_failing = found[0] if found else None
    return taken


# What the server says when -X fetch finds a segment of the backup gone (basebackup.c lists pg_wal, asks whether a
# segment it needs was removed (CheckXLogRemoved, also while sending), then checks that its listing holds every
# segment from the backup's start to its end). Taken again with -X none, the backup reads that WAL from the archive.
_WAL_GONE = re.compile(r"has already been removed|could not find (any )?WAL file", re.IGNORECASE)


def _wal_removed(stderr: str) -> bool:
    """pg_basebackup -X fetch failed because the server no longer had WAL the backup needs."""
    return _WAL_GONE.search(stderr) is not None


def take_base_backup(
    server: str,
    endpoint: PgEndpoint,
    store: BackupStore,
    layout: PhysicalLayout,
    workdir: Path,
    archive_url: str,
    parent: BaseBackupEntry | None = None,
    airflow_info: dict | None = None,
    newest: BaseBackupEntry | None = None,
    source: BackupSource | None = None,
) -> BaseBackupRecord:
    """Take a full base backup of ``server`` (or an incremental one on ``parent``) into ``store``.

    :param endpoint: the server (the primary, whose archiver ships the WAL).
    :param workdir: a private, empty directory; the caller removes it.
    :param archive_url: where the server archives its WAL (for messages).
    :param newest: the server's newest base backup: a server whose cluster is another one's is refused.
    :param source: where to read the backup (:func:`pgdr.logical.standby.choose_source`); None: ``endpoint``.
    :raises ArchiverFailing: when the server's archive_command fails while the backup waits for it.
    :raises ForeignCluster: when the server is not the cluster whose base backups and WAL the prefix holds.
    """
    facts = server_facts(endpoint)
    check_same_cluster(facts, newest or parent, server, archive_url)
    check_archiving(facts, endpoint, archive_url)
    standby = source.endpoint if source is not None and source.primary_mark_from is not None else None
    read_from = standby or endpoint
    at = facts
    if standby is not None:
        at = server_facts(standby)  # its version and summarize_wal are the ones pg_basebackup meets
        check_standby_of(standby, at, facts, server)
    args = [
        pg_tool("pg_basebackup"),
        f"--dbname={endpoint_conninfo(read_from)}",
        "-D",
        "-",
        "-Ft",
        "-X",
        "none",
        "-c",
        "fast",
        f"--manifest-checksums={MANIFEST_CHECKSUMS}",
        "--no-password",
        "--label=pgdr",
    ]
    if parent is not None:
        if at.pg_version < 170000:
            raise PermanentFailure(
                f"Incremental base backups need PostgreSQL 17 or newer; the server of {read_from.describe()} runs "
                f"{at.pg_version // 10000}. Set incremental_schedule: null for it in the DR plan."
            )
        if at.summarize_wal != "on":
            raise PermanentFailure(
                f"The server of {read_from.describe()} has summarize_wal = {at.summarize_wal or 'off'}, which "
                "incremental base backups need. Add 'summarize_wal = on' to its postgresql.conf and reload it (no "
                "restart needed); the next full base backup starts the first chain."
            )
        parent_manifest = workdir / "parent_backup_manifest"
        download_checked(store, parent.record.file("backup_manifest"), parent_manifest)
        args.append(f"--incremental={parent_manifest}")
        if standby is not None:
            restartpoint_after(endpoint, standby, parent.record.end_lsn, server)

    # An incremental one carries its own WAL (-X fetch): -X none would wait for the archiver to ship the backup's
    # last segment, and PostgreSQL checks for that once a second (do_pg_backup_stop), which was most of an
    # incremental's time. A full one waits (its WAL can be hours of a busy server: the archive holds it once).
    for wal_mode in ("fetch", "none") if parent is not None else ("none",):
        args[args.index("-X") + 1] = wal_mode
        started_at = datetime.now(UTC)
        t0 = time.monotonic()
        out = workdir / "backup"
        taken = _stream_base_backup(args, read_from, endpoint, facts, workdir, out, server)
        if wal_mode == "fetch" and taken.returncode != 0 and not taken.stopped and not taken.archiver_failing:
            if _wal_removed(taken.stderr):
                log.warning(
                    "The server removed WAL the incremental base backup of server %r had to carry (-X fetch) before "
                    "the backup ended (a checkpoint recycled it during a long backup): taking it again, its WAL read "
                    "from the archive instead (-X none). pg_basebackup said: %s",
                    server,
                    taken.stderr.strip()[-300:],
                )
                shutil.rmtree(out, ignore_errors=True)
                continue
        break
    if taken.archiver_failing:
        wal, failures = taken.archiver_failing
        raise ArchiverFailing(
            f"The base backup of server {server!r} was stopped: the server's archive_command is failing ({failures} "
            f"failed attempts since the backup started; last failed WAL segment {wal}), and a base backup is of no "
            "use without the WAL archived after it. WAL is piling up on the server. Check its log for 'archive "
            f"command failed' and that it can write to {archive_url} (credentials, endpoint, barman-cloud installed "
            "for the server's OS user); the task will retry."
        )
    if taken.returncode != 0 and "single tablespace" in taken.stderr:
        raise PermanentFailure(
            f"Server {server!r} has tablespaces outside its data directory; pgdr's point-in-time recovery restores "
            "the data directory only. Move them into pg_default, or use logical backups for this server."
        )
    if taken.returncode != 0 and not taken.stopped:
        error = tool_error(read_from, f"pg_basebackup of server {server!r}", taken.stderr, DumpFailed)
        if "summar" in taken.stderr.lower() and parent is not None:
            raise PermanentFailure(
                f"{error} The server has no WAL summaries reaching back to the parent base backup "
                f"{parent.backup_id} (summarize_wal was off, or the summaries were removed after "
                "wal_summary_keep_time). Take a full base backup (trigger pgdr_basebackup with kind=full)."
            ) from None
        raise error
    if taken.streamed is not None:
        raise taken.streamed
    manifest = taken.manifest
    (out / MANIFEST).write_bytes(manifest.raw)
    wal_ranges = manifest.wal_ranges
    if standby is not None:  # the primary archives the WAL: its segment holding the backup's end must be there first
        end = wal_ranges[-1]
        segment = segment_of_lsn(end["Timeline"], end["End-LSN"].upper(), facts.wal_segment_size)
        wait_archived_by_primary(endpoint, segment, STANDBY_ARCHIVE_WAIT_S)
        log.info("Base backup read on the standby; the primary has archived its last WAL segment %s.", segment)
    backup_seconds = time.monotonic() - t0
    finished_at = datetime.now(UTC)

    timeline = wal_ranges[-1]["Timeline"]
    start_lsn, end_lsn = wal_ranges[0]["Start-LSN"].upper(), wal_ranges[-1]["End-LSN"].upper()
    backup_id = new_backup_id(finished_at)

    t1 = time.monotonic()
    uploaded: list[str] = []
    files = []
    try:
        stored_files = (  # the manifest after the data; each hashed as it was written
            (out / STORED_TAR, taken.tar_size, taken.tar_sha256),
            (out / MANIFEST, len(manifest.raw), hashlib.sha256(manifest.raw).hexdigest()),
        )
        for path, size, sha256 in stored_files:
            key = layout.file_key(server, backup_id, path.name)
            store.put_file(key, path)
            uploaded.append(key)
            files.append(BaseBackupFile(name=path.name, key=key, size=size, sha256=sha256))
        record = BaseBackupRecord(
            backup_id=backup_id,
            server=server,
            kind="incremental" if parent else "full",
            parent=parent.backup_id if parent else None,
            system_identifier=facts.system_identifier,
            pg_version=facts.pg_version,
            timeline=timeline,
            start_lsn=start_lsn,
            end_lsn=end_lsn,
            start_wal=segment_of_lsn(wal_ranges[0]["Timeline"], start_lsn, facts.wal_segment_size),
            started_at=started_at,
            finished_at=finished_at,
            wal_segment_size=facts.wal_segment_size,
            files=tuple(files),
            airflow={k: v for k, v in (airflow_info or {}).items() if v is not None} or None,
            source=source.summary() if standby is not None else None,
        )
        BaseBackupCatalog(store, layout, server).write_record(record)
    except Exception:
        try:
            store.delete(uploaded)
        except Exception as err:  # noqa: BLE001 - the first failure matters; retention removes the rest
            log.warning(
                "Could not remove the %d objects of the failed base backup %s: %s", len(uploaded), backup_id, err
            )
        raise
    log.info(
        "%s base backup %s of server %r (read on the %s): %.1f MB in %.1fs (pg_basebackup) + %.1fs (upload); WAL "
        "from %s.",
        record.kind.capitalize(),
        backup_id,
        server,
        "standby" if standby else "primary",
        record.size / 1e6,
        backup_seconds,
        time.monotonic() - t1,
        record.start_wal,
    )
    return record


def download_checked(store: BackupStore, entry: BaseBackupFile, dest: Path) -> None:
    """Download one stored file of a base backup and check its size and SHA-256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with store.open_read(entry.key) as stream, open(dest, "wb") as out:
        size, sha256 = sha256_stream(stream, out.write)
    check_against_record(entry, size, sha256, store.describe(entry.key))


def due_kind(entries, full_schedule: str, incremental_schedule: str | None, now: datetime) -> str | None:
    """Say which base backup a scheduled run takes for a server: ``full``, ``incremental`` or ``None``.

    A full one is due when the newest full base backup ended before the last tick of
    ``full_schedule``; else an incremental one when the newest base backup of any kind ended
    before the last tick of ``incremental_schedule``.
    """
    from croniter import croniter

    fulls = [e for e in entries if e.record.kind == "full"]
    if not fulls or fulls[-1].record.finished_at < croniter(full_schedule, now).get_prev(datetime):
        return "full"
    if incremental_schedule and entries[-1].record.finished_at < croniter(incremental_schedule, now).get_prev(datetime):
        return "incremental"
    return None


def parent_for(kind: str, entries, server: str):
    """Return the base backup an incremental one builds on (the newest not failed); ``None`` for a full one.

    Without any, the incremental one becomes a full one (said in the log).
    """
    if kind != "incremental":
        return None
    usable = [e for e in entries if e.status != "failed"]
    if not usable:
        log.warning("Server %s has no base backup to build an incremental one on: taking a full one.", server)
        return None
    return usable[-1]
