"""Scratch clusters: a base backup chain restored on the worker and recovered to a moment.

Recovering a server to a point in time never touches the live server. The chain of base backups
(a full one, then its incrementals) is downloaded and checked (SHA-256 against the records, every
file against PostgreSQL's manifest as it is extracted: :mod:`pgdr.physical.tarstream`; ``pg_verifybackup``
for a gzip'd one stored before), combined with ``pg_combinebackup``, and started as
a *scratch cluster*: the same major version's binaries, a free local port, no TCP listener (a
private Unix socket directory only), ``archive_mode = off`` so it never writes into the
production archive, ``restore_command`` fetching WAL from the archive, and a recovery target.
When recovery reaches the target the cluster promotes, and pgdr reads from it (checks, or
``pg_dump`` of one database into the live server).

The cluster is pgdr's only while its run lives: a marker file in its directory names the run,
and the next run on the worker stops and removes the clusters of finished runs, only those.
Under root the cluster runs as the unprivileged ``nobody`` account (``pg_ctl`` refuses root).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pgdr.errors import ChecksumMismatch, PermanentFailure
from pgdr.physical.archive import ARCHIVED_NAMES, lsn_to_int
from pgdr.physical.catalog import BaseBackupEntry
from pgdr.postgres.binaries import UNPRIVILEGED_UID, free_port, major_of, pg_tool, server_bin_dir_for
from pgdr.postgres.client import PgEndpoint, tool_version
from pgdr.storage.backends import BackupStore
from pgdr.workdir import process_identity, run_is_over, state_of_run, still_runs

log = logging.getLogger(__name__)
MARKER = "pgdr-cluster.json"
READER_ROLE = "pgdr_scratch_reader"  # reads a recovered cluster for checks: never a superuser


class RecoveryFailed(PermanentFailure):
    """The scratch cluster did not reach its recovery target (missing WAL, a target outside the archive)."""


def _run_as() -> dict:
    if os.geteuid() != 0:
        return {}
    return {"user": UNPRIVILEGED_UID, "group": UNPRIVILEGED_UID, "extra_groups": []}


def conf_literal(value: str) -> str:
    """Return ``value`` as a quoted literal of ``postgresql.conf``, whose parser reads a backslash as an escape
    (``\\n``, ``\\\\``) and a doubled quote as a quote."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def chown_tree(path: Path, uid: int = UNPRIVILEGED_UID, gid: int = UNPRIVILEGED_UID) -> None:
    """Give ``path`` and everything under it to ``uid``:``gid`` (only when pgdr runs as root)."""
    if os.geteuid() != 0:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in files + dirs:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


# -- the chain, from the store to a data directory ------------------------------------------------


def download_chain(chain: list[BaseBackupEntry], store: BackupStore, dest: Path) -> list[Path]:
    """Download every file of every base backup of ``chain`` into ``dest/<backup_id>``, checked by SHA-256."""
    from pgdr.physical.basebackup import download_checked

    dirs = []
    for entry in chain:
        folder = dest / entry.backup_id
        for item in entry.record.files:
            download_checked(store, item, folder / item.name)
        dirs.append(folder)
    return dirs


def is_streamed(entry: BaseBackupEntry) -> bool:
    """Say whether a base backup is a zstd tar checked as it streams (pgdr's since 2026-12), not a gzip'd one."""
    from pgdr.physical.tarstream import STORED_TAR

    return any(f.name == STORED_TAR for f in entry.record.files)


def check_streamed(
    entry: BaseBackupEntry,
    store: BackupStore,
    workdir: Path,
    dest: Path | None,
    what: str,
    waits: dict[str, float] | None = None,
) -> float:
    """Read a streamed base backup from the store once: SHA-256 against its record, every file against its manifest,
    extracted into ``dest`` when given. Return seconds; add to ``waits`` those spent waiting for the bucket and the
    disk (see :func:`~pgdr.physical.tarstream.restore_tar`)."""
    from pgdr.physical.basebackup import download_checked
    from pgdr.physical.tarstream import MANIFEST, STORED_TAR, Manifest, restore_tar

    started = time.monotonic()
    manifest_path = workdir / f"{entry.backup_id}.manifest"
    download_checked(store, entry.record.file(MANIFEST), manifest_path)
    manifest = Manifest(manifest_path.read_bytes(), what)
    manifest_path.unlink()
    if manifest.system_identifier not in ("", entry.record.system_identifier):
        raise ChecksumMismatch(
            f"The check against PostgreSQL's manifest rejected {what}: its backup_manifest is of the cluster with "
            f"system identifier {manifest.system_identifier}, its record of {entry.record.system_identifier}. The "
            "base backup was mixed with another cluster's; no cluster was started from it. Recover from an older "
            "chain, and take a new full base backup."
        )
    tar = entry.record.file(STORED_TAR)
    with store.open_read(tar.key) as stream:
        restore_tar(stream, tar, manifest, dest, what, store.describe(tar.key), waits)
    return time.monotonic() - started


def verify_backup(folder: Path, what: str) -> float:
    """Run ``pg_verifybackup -n`` on a base backup directory (tar files or extracted); return seconds."""
    started = time.monotonic()
    result = subprocess.run([pg_tool("pg_verifybackup"), "-n", str(folder)], capture_output=True, text=True)
    if result.returncode != 0:
        detail = "; ".join(line for line in result.stderr.strip().splitlines()[:4])
        raise ChecksumMismatch(
            f"pg_verifybackup rejected {what}: {detail}. The stored base backup is damaged; no cluster was started. "
            "Recover from an older chain (choose a moment before this base backup is needed), and take a new full "
            "base backup."
        )
    return time.monotonic() - started


def extract_base_backup(folder: Path, dest: Path) -> Path:
    """Extract ``base.tar.gz`` of a downloaded base backup into ``dest``, with its ``backup_manifest`` beside."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "base.tar.gz", "r|gz") as archive:
        # The tar came from the bucket: untrusted. The data filter refuses absolute paths, '..' and
        # links out of the directory (a tablespace link would be one: those are refused at backup).
        archive.extractall(dest, filter="data")
    shutil.copyfile(folder / "backup_manifest", dest / "backup_manifest")
    return dest


def combine_chain(members: list[Path], out: Path) -> str:
    """Make ``out`` a full data directory from extracted chain members: the full one itself (``"moved"``), or
    ``pg_combinebackup``'s output, its unchanged files hard links to the members' (``"linked"``) or copies of them
    (``"copied"``: another filesystem, or a ``pg_combinebackup`` before PostgreSQL 18); return which.

    The members are removed after, so linking costs them nothing. pg_combinebackup does not fsync its output
    (``--no-sync``): the server started on it syncs its whole data directory first (a backup's ``pg_control`` says
    the server was running), and a scratch cluster runs with ``fsync = off``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(members) == 1:
        shutil.move(members[0], out)  # a rename when both are on one filesystem
        return "moved"
    tool = pg_tool("pg_combinebackup")
    how = "linked" if _can_link(members, out.parent) else "copied"
    result = subprocess.run(
        [tool, "--no-sync", *(["--link"] if how == "linked" else []), "-o", str(out), *map(str, members)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        detail = "; ".join(result.stderr.strip().splitlines()[:4])
        raise PermanentFailure(
            f"pg_combinebackup could not combine the chain {', '.join(m.name for m in members)}: {detail}"
        )
    for member in members:
        shutil.rmtree(member, ignore_errors=True)
    return how


def _can_link(members: list[Path], out_parent: Path) -> bool:
    """Say whether pg_combinebackup can link the members' files into the output: it has ``--link`` and they share
    a filesystem (a hard link cannot cross one)."""
    device = os.stat(out_parent).st_dev
    return all(os.stat(member).st_dev == device for member in members) and combine_links()


def combine_links() -> bool:
    """Say whether the pg_combinebackup pgdr runs has ``--link`` (PostgreSQL 18+); before it, a chain's combine
    copies every file, so the full backup is on disk twice until the members are removed."""
    return (major_of(tool_version("pg_combinebackup")) or 0) >= 18


# -- the scratch cluster ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RecoveryResult:
    """What a recovery did: where it stopped and how long it took."""

    target_time: datetime | None  # None: recover to the end of the archive ("latest")
    achieved_point: datetime | None  # the commit time of the last transaction replayed
    stopped_before: datetime | None  # the first commit after the target (not replayed)
    redo_start_lsn: str | None
    redo_end_lsn: str | None
    replay_seconds: float
    timeline: int | None

    @property
    def wal_bytes_replayed(self) -> int | None:
        if self.redo_start_lsn and self.redo_end_lsn:
            return lsn_to_int(self.redo_end_lsn) - lsn_to_int(self.redo_start_lsn)
        return None

    def to_dict(self) -> dict:
        return {
            "target_time": self.target_time.isoformat() if self.target_time else "latest",
            "achieved_recovery_point": self.achieved_point.isoformat() if self.achieved_point else None,
            "stopped_before_commit_at": self.stopped_before.isoformat() if self.stopped_before else None,
            "redo_start_lsn": self.redo_start_lsn,
            "redo_end_lsn": self.redo_end_lsn,
            "wal_bytes_replayed": self.wal_bytes_replayed,
            "replay_seconds": round(self.replay_seconds, 2),
            "timeline": self.timeline,
        }


def cluster_dir_name(dag_id: str, run_id: str, key: str) -> str:
    """Return the directory name of a run's scratch cluster (the same on every retry)."""
    return "pgdr-cluster-" + hashlib.sha256(f"{dag_id}/{run_id}/{key}".encode()).hexdigest()[:16]


@dataclass
class ScratchCluster:
    """A PostgreSQL cluster recovered from base backups on this worker, reachable on a private socket."""

    root: Path
    pg_version: int
    login: str = "postgres"  # a role of the recovered cluster (trust over the private socket)
    port: int = 0
    environment: dict[str, str] = field(default_factory=dict, repr=False)  # the archive's credentials

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log_file = self.root / "server.log"
        self.spool_dir = self.root / "wal-spool"  # segments fetched ahead of replay (WalArchive.restore_command)
        if not self.port:
            self.port = free_port()

    # -- marker ----------------------------------------------------------------------------------
    def write_marker(self, dag_id: str, run_id: str, purpose: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        info = {
            "dag_id": dag_id,
            "run_id": run_id,
            "purpose": purpose,
            "host": socket.gethostname(),
            "port": self.port,
            "pg_version": self.pg_version,
            "created": datetime.now(UTC).isoformat(),
            "owner": process_identity(os.getpid()),  # the process that recovers it: see remove_leftover_clusters
        }
        (self.root / MARKER).write_text(json.dumps(info))

    def endpoint(self, dbname: str = "postgres", user: str | None = None) -> PgEndpoint:
        """Return how pgdr reaches the cluster: its private socket, no password (as ``user``, default the source's
        login)."""
        return PgEndpoint(host=str(self.socket_dir), port=self.port, user=user or self.login, dbname=dbname, conn_id="")

    def reader(self, dbname: str) -> PgEndpoint:
        """Return the endpoint of a role that may read everything and nothing more, created on first use.

        Checks of a recovered cluster read tables whose index expressions, views and functions were
        written by whoever owned a schema: like a restored dump, they run as a role without superuser.
        """
        from psycopg import sql

        from pgdr.postgres.client import connect

        with connect(self.endpoint("postgres"), application_name="pgdr-scratch-setup") as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (READER_ROLE,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(
                sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS").format(
                    sql.Identifier(READER_ROLE)
                )
            )
            conn.execute(sql.SQL("GRANT pg_read_all_data, pg_read_all_stats TO {}").format(sql.Identifier(READER_ROLE)))
        return self.endpoint(dbname, READER_ROLE)

    # -- configuration ---------------------------------------------------------------------------
    def configure(self, restore_command: str, target_time: datetime | None, archived: Iterable[str]) -> None:
        """Replace the restored server's configuration with a scratch cluster's and request recovery.

        :param archived: the names of the files the archive holds now (:meth:`WalArchive.archived_names`).
        """
        self._check_reachable()
        for name in ("postgresql.conf", "postgresql.auto.conf", "pg_hba.conf", "pg_ident.conf"):
            source = self.data_dir / name
            if source.exists():
                source.rename(self.data_dir / f"{name}.source")  # kept for a human who investigates
        for stale in ("postmaster.pid", "postmaster.opts", "standby.signal", "backup_manifest"):
            (self.data_dir / stale).unlink(missing_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.chmod(0o700)

        settings = {
            "listen_addresses": "",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "archive_mode": "off",  # never write into the production archive
            "summarize_wal": "off",
            "hot_standby": "off",  # no reads before promotion, and no parameter checks against the source
            "restore_command": restore_command,
            "recovery_target_action": "promote",
            "recovery_target_timeline": "latest",
            "max_connections": "50",
            "shared_buffers": "128MB",
            "fsync": "off",  # a scratch copy: a crash is answered by recovering again
            "full_page_writes": "on",
            "timezone": "UTC",
            "log_timezone": "UTC",
            "logging_collector": "off",
            "shared_preload_libraries": "",
        }
        if target_time is not None:
            settings["recovery_target_time"] = target_time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
            settings["recovery_target_inclusive"] = "on"
        lines = ["# A pgdr scratch cluster (pgdr.physical.cluster); the source's settings are in *.source."]
        lines += [f"{k} = {conf_literal(v)}" for k, v in settings.items()]
        (self.data_dir / "postgresql.conf").write_text("\n".join(lines) + "\n")
        (self.data_dir / "pg_hba.conf").write_text("local all all trust\n")  # the socket directory is private (0700)
        (self.data_dir / "pg_ident.conf").write_text("")
        (self.data_dir / "recovery.signal").write_text("")
        self.data_dir.chmod(0o700)
        self.new_spool(archived)
        chown_tree(self.root)

    def new_spool(self, archived: Iterable[str]) -> None:
        """Give this recovery an empty spool of its own (before its root is given to the server's OS user), with the
        names of the files the archive holds as the replay begins (the restore_command's :data:`ARCHIVED_NAMES`)."""
        shutil.rmtree(self.spool_dir, ignore_errors=True)
        self.spool_dir.mkdir(mode=0o700, parents=True)
        (self.spool_dir / ARCHIVED_NAMES).write_text("".join(f"{name}\n" for name in archived))

    def drop_spool(self) -> None:
        """Remove what the replay fetched ahead and did not need (past the target)."""
        shutil.rmtree(self.spool_dir, ignore_errors=True)

    def _check_reachable(self) -> None:
        """Fail, saying what to do, when the unprivileged user cannot enter the cluster's directory."""
        if os.geteuid() != 0:
            return
        for ancestor in self.root.resolve().parents:
            if not os.stat(ancestor).st_mode & 0o001:
                raise PermanentFailure(
                    f"A scratch cluster must run as an unprivileged user (uid {UNPRIVILEGED_UID}) when pgdr runs as "
                    f"root, but that user cannot enter {ancestor} (mode {oct(os.stat(ancestor).st_mode & 0o777)}). "
                    "Point $PGDR_WORK_DIR at a directory every user may enter (e.g. /var/tmp/pgdr), or `chmod o+x` "
                    "that one."
                )

    # -- lifecycle -------------------------------------------------------------------------------
    def _run_as(self) -> dict:
        """The account the server runs as: under root, the unprivileged one (``pg_ctl`` refuses root)."""
        return _run_as()

    def _pg_ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        bin_dir = server_bin_dir_for(self.pg_version)
        env = {
            "PATH": os.defpath,
            "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8",
            "TZ": "UTC",
            "HOME": str(self.root),
            **self.environment,
        }
        return subprocess.run(
            [str(bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            **self._run_as(),
        )

    def start(
        self,
        target_time: datetime | None,
        timeout_s: float = 6 * 3600,
        options: str = "",
        ready: tuple[str, ...] = ("database system is ready to accept connections",),
    ) -> RecoveryResult:
        """Start the cluster and wait until recovery reached its target and it promoted (a line of ``ready`` in
        its log).

        ``pg_ctl -w`` returns once the server accepts connections, which (``hot_standby = off``) is
        after promotion, or fails when the server stops; a failed recovery is explained from the log.

        :param options: server options for this start only (``pg_ctl -o``).
        """
        self.log_file.touch()
        user = self._run_as()
        if user:
            os.chown(self.log_file, user["user"], user["group"])
        started = time.monotonic()
        extra = ("-o", options) if options else ()
        result = self._pg_ctl("-l", str(self.log_file), *extra, "-w", "-t", "120", "start", timeout=180)
        if result.returncode != 0:
            text = self.log_tail(20000)
            fatal = re.search(r"(?:FATAL|PANIC):\s+(.*)", text)
            raise RecoveryFailed(
                self._explain_failure(
                    fatal.group(1) if fatal else result.stderr.strip() or "it stopped", target_time, text
                )
            )
        # pg_ctl returns while recovery still runs: follow the log until promotion, or a failure.
        while True:
            text = self.log_file.read_text(errors="replace")
            if any(line in text for line in ready):
                break
            fatal = re.search(r"(?:FATAL|PANIC):\s+(.*)", text)
            if fatal or not self.is_running():
                time.sleep(0.2)  # let the last lines reach the log
                text = self.log_file.read_text(errors="replace")
                raise RecoveryFailed(
                    self._explain_failure(fatal.group(1) if fatal else "the server stopped", target_time, text)
                )
            if time.monotonic() - started > timeout_s:
                raise RecoveryFailed(
                    f"Recovery of the scratch cluster did not finish within {timeout_s:.0f}s.\n{self.log_tail()}"
                )
            time.sleep(0.25)
        return _parse_recovery_log(text, target_time, time.monotonic() - started)

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def is_running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists() and self._pg_ctl("status").returncode == 0

    def _explain_failure(self, fatal: str, target_time: datetime | None, text: str) -> str:
        missing = re.findall(r'restored log file "([0-9A-F]{24})"', text)
        last = missing[-1] if missing else None
        if "recovery ended before configured recovery target was reached" in fatal:
            return (
                f"Recovery could not reach the target {target_time:%Y-%m-%d %H:%M:%S} UTC: the archive ends before "
                f"it (last WAL segment replayed: {last or 'none'}). The moment is after the newest archived WAL, or "
                "a segment is missing. Choose a moment inside the recoverable window, or check the server's "
                "archiver (pg_stat_archiver)."
            )
        if "WAL file is from different database system" in text:
            return (
                "The WAL archive holds segments of another cluster than the base backup's (PostgreSQL refused them: "
                "'WAL file is from different database system'): a rebuilt server archives into this server's prefix "
                "under the same name. Give the new server its own name and prefix in the plan; recover the old one "
                "to a moment before the new server started archiving, or move the new segments away."
            )
        archiver = re.findall(r"ERROR: (Barman cloud WAL restore exception: .*)", text)
        if archiver and ("checkpoint record" in fatal or "consistent recovery point" in fatal):
            return (
                f"The scratch cluster could not fetch WAL from the archive: {archiver[-1]}. Check the storage "
                "target's AWS connection (credentials, endpoint_url) and that barman-cloud on this worker can "
                "reach it."
            )
        if "consistent recovery point" in fatal or "end of online backup" in fatal or "checkpoint record" in fatal:
            return (
                f"The WAL that makes the base backup consistent is missing from the archive ({fatal}; last segment "
                f"replayed: {last or 'none'}). This base backup cannot be recovered; use another chain."
            )
        return f"Recovery of the scratch cluster failed: {fatal}. The end of its log:\n{self.log_tail(1500)}"

    def stop(self) -> None:
        """Stop the cluster: fast, then immediate. Safe to call when it does not run."""
        if not (self.data_dir / "postmaster.pid").exists():
            return
        if self._pg_ctl("-m", "fast", "-w", "-t", "30", "stop").returncode != 0:
            self._pg_ctl("-m", "immediate", "-w", "-t", "30", "stop")

    def destroy(self) -> None:
        """Stop the cluster and remove its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _time(text: str) -> datetime:
    text = text.strip()
    if re.search(r"[+-]\d\d$", text):
        text += ":00"
    return datetime.fromisoformat(text.replace(" ", "T", 1)).astimezone(UTC)


def _parse_recovery_log(text: str, target_time: datetime | None, seconds: float) -> RecoveryResult:
    def find(pattern: str) -> str | None:
        match = re.findall(pattern, text)
        return match[-1] if match else None

    achieved = find(r"last completed transaction was at log time ([0-9: .+-]+)")
    stopped = find(r"recovery stopping before (?:commit|abort) of transaction \d+, time ([0-9: .+-]+)")
    timeline = find(r"selected new timeline ID: (\d+)")
    return RecoveryResult(
        target_time=target_time,
        achieved_point=_time(achieved) if achieved else None,
        stopped_before=_time(stopped) if stopped else None,
        redo_start_lsn=find(r"redo starts at ([0-9A-F]+/[0-9A-F]+)"),
        redo_end_lsn=find(r"redo done at ([0-9A-F]+/[0-9A-F]+)"),
        replay_seconds=seconds,
        timeline=int(timeline) if timeline else None,
    )


def remove_leftover_clusters(root: Path, run_state: Callable[[str, str], Any], keep: Path | None = None) -> list[Path]:
    """Stop and remove scratch clusters on this host whose run is over (:func:`pgdr.workdir.run_is_over`); return
    their directories.

    A cluster whose recovering process still runs, another than this one, is kept whatever ``run_state`` says: the
    break-glass command (``python -m pgdr``) runs its DAG with a metadata database of its own, so an Airflow worker on
    the same host knows nothing of its run, and must not take the on-call's recovery for a leftover.

    :param run_state: returns the Airflow state of the run ``(dag_id, run_id)`` (it may raise: no such run).
    :param keep: this run's own cluster directory, never removed here.
    """
    removed = []
    for marker in root.glob(f"pgdr-cluster-*/{MARKER}"):
        folder = marker.parent
        if keep is not None and folder == keep:
            continue
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("host") != socket.gethostname():
            continue
        owner = info.get("owner")
        if isinstance(owner, dict) and owner.get("pid") != os.getpid() and still_runs(owner):
            continue
        if not run_is_over(state_of_run(run_state, str(info.get("dag_id")), str(info.get("run_id")))):
            continue
        ScratchCluster(folder, int(info.get("pg_version") or 180000), port=int(info.get("port") or 1)).destroy()
        removed.append(folder)
        log.warning(
            "Removed the scratch cluster %s left by run %s of %s.", folder, info.get("run_id"), info.get("dag_id")
        )
    return removed


def run_cluster(root: Path, recovery: dict[str, Any]) -> ScratchCluster:
    """Return the scratch cluster in ``root`` as a run's recovery left it: version and port from ``recovery`` (the
    task's XCom) or from the cluster's marker (a teardown that ran without it)."""
    marker = json.loads((root / MARKER).read_text()) if (root / MARKER).exists() else {}
    return ScratchCluster(
        root,
        recovery.get("pg_version") or marker.get("pg_version") or 180000,
        login=recovery.get("login", "postgres"),
        port=recovery.get("port") or marker.get("port") or 0,
    )
