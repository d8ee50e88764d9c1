"""Recovering a whole lost server onto the host that will run it: ``python -m pgdr recover-server``.

When the server is gone (not one table, the whole host), the fastest way back is the one
pgBackRest, barman and CloudNativePG take: restore the cluster itself, on the new host, from its
base backups and WAL, in the time it takes to download and replay. pgdr does it in four steps,
each said in the terminal and in the report:

1. **Plan and refuse** (:func:`plan_server_recovery`, also the ``--dry-run`` output): the chain,
   the WAL to replay, the expected time from past PITR verifications, the size needed on disk
   against the free space. A data directory that holds anything is refused unless ``--delta``;
   a data directory a server runs on is always refused. The old host is never contacted.
2. **Place** the chain: downloaded, checked (SHA-256, every file against PostgreSQL's manifest), combined, in a staging
   directory beside the data directory (same filesystem: moving a file in is a rename). Without
   ``--delta`` the staging directory becomes the data directory; with it only the files whose
   size or SHA-256 differ from the backup's are replaced and files the backup lacks are removed
   (:func:`sync_delta`), so a second try after a partial copy finishes without starting over.
3. **Recover privately**: the base backup's own ``postgresql.conf`` and ``pg_hba.conf`` are kept;
   pgdr adds to ``postgresql.auto.conf`` (as ``ALTER SYSTEM`` would) ``archive_mode = off`` (until
   the operator points the server at a *new* archive prefix: two servers never archive into one),
   the port, and the recovery settings. The server starts with no TCP listener on a private socket
   (trust there only), replays to the target and promotes (or pauses there with ``--pause``).
   Heartbeats prove the target; every plan database of the server gets ``pg_amcheck``, sequence
   and Great Expectations checks as a role that is never a superuser, to the depth the plan's
   ``recovery_proof`` (or ``--proof``) asks: ``quick`` by default, ``thorough`` as
   ``pgdr_verify_pitr`` proves each chain (:data:`pgdr.physical.proof.RECOVERY_PROOFS`).
4. **Hand over**: the recovery settings are reset, the server is stopped and started in its own
   configuration (its port, its ``pg_hba.conf``), and the report (markdown and JSON, stored under
   the server's prefix, ``recoveries/``) says what was checked, the achieved recovery point, the
   data-loss window (achieved point to the moment the failure was declared) and each phase's time.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import pwd
import shlex
import shutil
import socket
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pgdr.errors import PermanentFailure
from pgdr.identifiers import printable
from pgdr.incident_review import incident_record, store_incident_record
from pgdr.messages import format_duration
from pgdr.physical.cluster import (
    RecoveryFailed,
    RecoveryResult,
    ScratchCluster,
    chown_tree,
    conf_literal,
)
from pgdr.physical.proof import RECOVERY_PROOFS

log = logging.getLogger(__name__)

RECOVERY_SETTINGS = (
    "restore_command",
    "recovery_target_time",
    "recovery_target_inclusive",
    "recovery_target_action",
    "recovery_target_timeline",
)
PAUSED_LINES = ("pausing at the end of recovery", "recovery has paused")


class ServerRecoveryRefused(PermanentFailure):
    """The data directory, the account or the disk cannot take the recovery; nothing was changed."""


# -- the data directory ---------------------------------------------------------------------------


def running_postmaster(data_dir: Path) -> int | None:
    """Return the pid of a postmaster running on ``data_dir`` (from ``postmaster.pid``), or ``None``."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, another user's
    return pid


def data_directory_state(data_dir: Path) -> str:
    """Return ``missing``, ``empty`` or ``not empty``."""
    if not data_dir.exists():
        return "missing"
    if not data_dir.is_dir():
        return "not a directory"
    return "not empty" if any(data_dir.iterdir()) else "empty"


def check_data_directory(data_dir: Path, delta: bool) -> str:
    """Refuse a data directory a server runs on, or one that holds files (unless ``delta``); return its state."""
    pid = running_postmaster(data_dir)
    if pid is not None:
        raise ServerRecoveryRefused(
            f"A PostgreSQL server (pid {pid}) is running on {data_dir}. pgdr never recovers over a running server: "
            f"stop it first (pg_ctl -D {shlex.quote(str(data_dir))} stop), or choose another --data-dir. Nothing "
            "was changed."
        )
    state = data_directory_state(data_dir)
    if state == "not a directory":
        raise ServerRecoveryRefused(f"{data_dir} exists and is not a directory. Nothing was changed.")
    if state == "not empty" and not delta:
        raise ServerRecoveryRefused(
            f"The data directory {data_dir} is not empty. pgdr does not overwrite files it did not write: give an "
            "empty or new directory, or --delta to replace only the files that differ from the backup (and remove "
            "those it does not have), e.g. to finish a recovery that stopped half-way. Nothing was changed."
        )
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sync_delta(source: Path, target: Path) -> dict[str, int]:
    """Make ``target`` hold exactly ``source``'s files: keep those of equal size and SHA-256, move the others in
    (a rename: both are on one filesystem), remove what ``source`` lacks. Return the counts."""
    counts = {"kept": 0, "replaced": 0, "removed": 0}
    target.mkdir(parents=True, exist_ok=True)
    wanted: set[Path] = set()
    for root, dirs, files in os.walk(source):
        rel_root = Path(root).relative_to(source)
        for name in dirs:
            wanted.add(rel_root / name)
            there = target / rel_root / name
            if there.is_symlink() or (there.exists() and not there.is_dir()):
                there.unlink()
            there.mkdir(exist_ok=True)
        for name in files:
            rel = rel_root / name
            wanted.add(rel)
            new, old = source / rel, target / rel
            if old.is_symlink() or old.is_dir():
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
            if old.exists() and old.stat().st_size == new.stat().st_size and _sha256(old) == _sha256(new):
                counts["kept"] += 1
                continue
            shutil.move(new, old)  # a rename on one filesystem
            counts["replaced"] += 1
    for root, dirs, files in os.walk(target, topdown=False):
        rel_root = Path(root).relative_to(target)
        for name in files + dirs:
            rel = rel_root / name
            if rel not in wanted:
                path = target / rel
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                counts["removed"] += 1
    return counts


def _account(os_user: str | None) -> tuple[int, int, str]:
    """Return ``(uid, gid, name)`` of the account the server will run as: ``os_user``, or this process's."""
    if os_user:
        try:
            entry = pwd.getpwnam(os_user)
        except KeyError:
            raise ServerRecoveryRefused(f"--os-user {os_user!r}: no such account on this host.") from None
        return entry.pw_uid, entry.pw_gid, entry.pw_name
    if os.geteuid() == 0:
        raise ServerRecoveryRefused(
            "PostgreSQL never runs as root: run this command as the account that will own the server (e.g. "
            "sudo -u postgres python -m pgdr recover-server ...), or give --os-user postgres. Nothing was changed."
        )
    return os.geteuid(), os.getegid(), getpass.getuser()


def check_reachable(data_dir: Path, uid: int) -> None:
    """Refuse a data directory the server's account cannot reach (a parent it may not enter)."""
    if os.geteuid() != 0 or uid == 0:
        return
    for ancestor in data_dir.parents:
        mode = os.stat(ancestor)
        if mode.st_uid != uid and not mode.st_mode & 0o001:
            raise ServerRecoveryRefused(
                f"The server's account (uid {uid}) cannot enter {ancestor} (mode {oct(mode.st_mode & 0o777)}), on the "
                "way to the data directory. Choose a --data-dir under a directory that account may enter (e.g. "
                "/var/lib/postgresql), or `chmod o+x` that one. Nothing was changed."
            )


# -- the recovered server -------------------------------------------------------------------------


@dataclass
class RecoveredServer(ScratchCluster):
    """A server recovered into a data directory of its own, run as ``uid``; private while pgdr checks it."""

    target_dir: Path = Path()
    uid: int = -1
    gid: int = -1
    service_port: int | None = None
    pause: bool = False
    settings_written: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.data_dir = Path(self.target_dir)

    def _run_as(self) -> dict:
        if os.geteuid() != 0 or self.uid == os.geteuid():
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def private_options(self) -> str:
        """Options of the private start: no TCP listener, a socket only this account may enter, trust there."""
        values = {
            "listen_addresses": "",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "hba_file": str(self.root / "pg_hba.private.conf"),
            "ident_file": str(self.root / "pg_ident.private.conf"),
            "logging_collector": "off",
            # Not readable before promotion, so none of the primary's parameter checks (the lost server may have
            # run with larger limits given on its command line than its postgresql.conf says).
            "hot_standby": "on" if self.pause else "off",
        }
        return " ".join(f"-c {name}={shlex.quote(value)}" for name, value in values.items())

    def prepare(
        self, restore_command: str, target: datetime | None, pause: bool, label: str, archived: Iterable[str]
    ) -> None:
        """Keep the base backup's configuration; add the recovery's settings as ``ALTER SYSTEM`` would.

        :param archived: the names of the files the archive holds now (:meth:`WalArchive.archived_names`).
        """
        for stale in ("postmaster.pid", "postmaster.opts", "standby.signal", "backup_manifest"):
            (self.data_dir / stale).unlink(missing_ok=True)
        settings = {"archive_mode": "off"}  # never into the old server's archive: a new prefix is the operator's
        if self.service_port:
            settings["port"] = str(self.service_port)
        settings |= {
            "restore_command": restore_command,
            "recovery_target_action": "pause" if pause else "promote",
            "recovery_target_timeline": "latest",
        }
        if target is not None:
            settings["recovery_target_time"] = target.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
            settings["recovery_target_inclusive"] = "on"
        if pause:
            settings["hot_standby"] = "on"  # a paused server is readable, for the look before promotion
            settings |= self.primary_limits()  # which a hot standby needs at least as large as the primary's

        auto = self.data_dir / "postgresql.auto.conf"
        text = auto.read_text() if auto.exists() else "# Do not edit this file manually!\n"
        lines = [f"# {label}"] + [f"{k} = {conf_literal(v)}" for k, v in settings.items()]
        auto.write_text(text.rstrip("\n") + "\n" + "\n".join(lines) + "\n")
        (self.data_dir / "recovery.signal").write_text("")
        self.settings_written = settings
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.chmod(0o700)
        (self.root / "pg_hba.private.conf").write_text("local all all trust\n")  # the socket directory is private
        (self.root / "pg_ident.private.conf").write_text("")
        self.data_dir.chmod(0o700)
        self.new_spool(archived)
        chown_tree(self.data_dir, self.uid, self.gid)
        chown_tree(self.root, self.uid, self.gid)

    def primary_limits(self) -> dict[str, str]:
        """Return the limits a hot standby must match, as the lost primary ran with them (``pg_controldata``)."""
        import subprocess

        from pgdr.postgres.binaries import server_bin_dir_for

        names = {
            "max_connections setting": "max_connections",
            "max_worker_processes setting": "max_worker_processes",
            "max_wal_senders setting": "max_wal_senders",
            "max_prepared_xacts setting": "max_prepared_transactions",
            "max_locks_per_xact setting": "max_locks_per_transaction",
        }
        result = subprocess.run(
            [str(server_bin_dir_for(self.pg_version) / "pg_controldata"), str(self.data_dir)],
            capture_output=True,
            text=True,
            env={"LC_ALL": "C", "PATH": os.defpath},
        )
        limits = {}
        for line in result.stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in names and value.strip().isdigit():
                limits[names[key.strip()]] = value.strip()
        return limits

    def recover(self, target: datetime | None, pause: bool, timeout_s: float) -> RecoveryResult:
        ready = ("database system is ready to accept connections", *(PAUSED_LINES if pause else ()))
        return self.start(target, timeout_s, options=self.private_options(), ready=ready)

    def reset_recovery_settings(self) -> None:
        """After promotion: ``ALTER SYSTEM RESET`` the recovery settings (the port and ``archive_mode`` stay)."""
        from pgdr.postgres.client import connect

        with connect(self.endpoint("postgres"), application_name="pgdr-recover-server") as conn:
            for name in RECOVERY_SETTINGS:
                conn.execute(f"ALTER SYSTEM RESET {name}")

    def hand_over(self) -> None:
        """Stop the private server and start it in its own configuration; explain a failure from the log."""
        self.stop()
        result = self._pg_ctl("-l", str(self.log_file), "-w", "-t", "120", "start", timeout=180)
        if result.returncode != 0:
            raise RecoveryFailed(
                f"The recovered server did not start in its own configuration (its postgresql.conf, pg_hba.conf and "
                f"port): {result.stderr.strip()}. The data directory {self.data_dir} is recovered and consistent: "
                f"fix the setting the log names and start it with pg_ctl -D {shlex.quote(str(self.data_dir))} start."
                f"\nThe end of its log ({self.log_file}):\n{self.log_tail(1500)}"
            )


# -- plan, recover, prove, hand over ------------------------------------------------------------


def plan_server_recovery(
    server,
    res,
    target: datetime | None,
    data_dir: Path,
    workdir: Path,
    delta: bool = False,
    pause: bool = False,
    source=None,
    proof: str | None = None,
) -> dict[str, Any]:
    """Return the recovery plan of ``server`` into ``data_dir`` (the dry run); refuse what cannot be done.

    ``source`` is one of the server's ``pitr.copies`` (:class:`~pgdr.plan.StorageTarget`) to recover from instead of
    its archive (``--from``: the primary region or bucket is lost). ``proof`` overrides the plan's
    ``recovery_proof``.

    :raises ServerRecoveryRefused: the data directory holds a running server, or files without ``delta``, or the
        disk is too small. :raises TargetOutsideWindow: naming the recoverable window.
    """
    from pgdr.physical.recovery import WAL_HEADROOM, free_bytes, plan_point_in_time

    data_dir = data_dir.resolve()
    if pause and target is None:
        raise ServerRecoveryRefused(
            "--pause needs a moment to pause at: PostgreSQL pauses only at a recovery target, and 'latest' (the end "
            "of the archive) is none. Give --to a UTC time, or leave --pause out. Nothing was changed."
        )
    state = check_data_directory(data_dir, delta)
    pitr = plan_point_in_time(server, res, target, workdir, source)
    _store, _layout, archive = res.archive(server, source)
    needed = pitr["chain_disk_bytes"] + WAL_HEADROOM + pitr["wal_bytes"]  # the server runs on there: its pg_wal
    existing = data_dir if data_dir.exists() else data_dir.parent
    while not existing.exists():
        existing = existing.parent
    free = free_bytes(existing)
    if free < needed:
        raise ServerRecoveryRefused(
            f"{existing} has {free / 1e9:.1f} GB free; recovering server {server.name!r} needs about "
            f"{needed / 1e9:.1f} GB (the base backup chain as it is placed there, pg_wal's room and the WAL "
            "replayed). Free space there or choose another --data-dir. Nothing was changed."
        )
    return {
        **pitr,
        "data_dir": str(data_dir),
        "data_dir_state": state,
        "delta": delta,
        "host": socket.gethostname(),
        "disk_needed_bytes": needed,
        "disk_free_bytes": free,
        "read_from": f"copy {source.name!r} ({archive.describe()})" if source is not None else archive.describe(),
        "proof": proof or server.recovery_proof,
    }


def render_server_plan(plan: dict[str, Any]) -> str:
    """Return the server recovery plan as the on-call engineer reads it."""
    from pgdr.messages import pitr_target_words

    return "\n".join(
        [
            f"  server          : {plan['server']} (system identifier {plan['system_identifier']}, PostgreSQL "
            f"{plan['pg_version'] // 10000})",
            f"  recover to      : {pitr_target_words(plan['target'])}"
            + (
                f"; the archive's last transaction is at {plan['end_of_archive']} UTC "
                f"({format_duration(plan['end_of_archive_behind_seconds'])} ago)"
            ),
            f"  base backups    : {' -> '.join(plan['chain'])} ({plan['base_backup_bytes'] / 1e6:.1f} MB stored, the "
            f"newest ended {plan['base_backup_ended']})",
            f"  WAL to replay   : up to {plan['wal_segments']} segments ({plan['wal_bytes'] / 1e6:.0f} MB)",
            f"  read from       : {plan.get('read_from', 'the archive')}",
            f"  recoverable     : {plan['window']['oldest']} to {plan['window']['newest']} UTC",
            f"  expected time   : {plan['expected_recovery']} (median of past PITR verifications)",
            f"  data directory  : {plan['data_dir']} on {plan['host']} ({plan['data_dir_state']}"
            + (", --delta: only differing files replaced" if plan["delta"] else "")
            + ")",
            f"  disk            : about {plan['disk_needed_bytes'] / 1e9:.2f} GB needed, "
            f"{plan['disk_free_bytes'] / 1e9:.1f} GB free",
            f"  proof           : {plan['proof']}: {RECOVERY_PROOFS[plan['proof']]}, before any client connects"
            + ("" if plan["proof"] == "thorough" else " (--proof thorough adds every row looked up in every index)"),
            "  old host        : never contacted",
        ]
    )


@dataclass
class ServerRecovery:
    """One recovery of a whole server onto this host: what was asked, and where it works."""

    server: Any  # pgdr.plan.ProtectedServer
    res: Any  # pgdr.resources.Resources
    target: datetime | None
    data_dir: Path
    port: int | None = None
    pause: bool = False
    delta: bool = False
    os_user: str | None = None
    declared_at: datetime | None = None  # when the failure was declared: the end of the data-loss window
    incident_id: str | None = None  # the incident's ticket, for the review
    triggered_by: str = "command line"
    timeout_s: float = 6 * 3600
    resume_key: str | None = None  # an Airflow run: its retry resumes its own earlier try's directory (as --delta)
    source: Any = None  # one of the server's pitr.copies (a StorageTarget) to recover from; None: its archive
    proof: str | None = None  # quick or thorough (pgdr.physical.proof.RECOVERY_PROOFS); None: the plan's recovery_proof
    phases: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self.control = self.data_dir.parent / f".{self.data_dir.name}.pgdr"  # socket, log, staging: one filesystem

    def _phase(self, name: str, started: float) -> None:
        self.phases[name] = round(time.monotonic() - started, 2)

    def run(self, say=log.info) -> dict[str, Any]:
        """Recover, prove and hand over the server; return the report (stored too). ``say`` reports progress."""
        from pgdr.physical.archive import archiver_bin_dir
        from pgdr.physical.catalog import BaseBackupCatalog

        started_at = datetime.now(UTC)
        declared = self.declared_at or started_at
        uid, gid, account = _account(self.os_user)
        check_reachable(self.data_dir, uid)
        if self.resumes_own_try():
            say(f"{self.data_dir} holds an earlier try of this run: resuming it as --delta does.")
            self.delta = True
        t = time.monotonic()
        plan = plan_server_recovery(
            self.server,
            self.res,
            self.target,
            self.data_dir,
            self.control / "plan",
            self.delta,
            self.pause,
            self.source,
            self.proof,
        )
        self._phase("plan", t)
        say("Recovery plan:\n" + render_server_plan(plan))
        store, layout, archive = self.res.archive(self.server, self.source)
        catalog = BaseBackupCatalog(store, layout, self.server.name)
        entry = catalog.get(plan["base_backup"])
        delta_counts = self.place(plan, catalog, entry, store, archive, say)
        server = RecoveredServer(
            self.control,
            entry.record.pg_version,
            login=self.res.server(self.server).user,
            target_dir=self.data_dir,
            uid=uid,
            gid=gid,
            service_port=self.port,
            pause=self.pause,
        )
        server.environment = dict(archive.access.environment())
        label = (
            f"pgdr recover-server {started_at:%Y-%m-%dT%H:%M:%SZ}: archive_mode stays off until this server archives "
            "into a NEW prefix; the recovery settings below are reset after promotion"
        )
        server.prepare(
            archive.restore_command(server.spool_dir, archiver_bin_dir(), entry.record.wal_segment_size),
            self.target,
            self.pause,
            label,
            archive.archived_names(store),
        )
        t = time.monotonic()
        say(
            f"Replaying WAL to {plan['target']} on a private socket (no TCP listener) as {account}; the log is "
            f"{server.log_file} ..."
        )
        try:
            result = server.recover(self.target, self.pause, self.timeout_s)
        except BaseException:
            server.stop()
            raise
        finally:
            server.drop_spool()
        self._phase("replay", t)
        t = time.monotonic()
        try:
            achieved = result.achieved_point or _replayed_point(server)
            proof = self.prove(server, plan, achieved, plan["proof"])
            if not self.pause:
                server.reset_recovery_settings()
        except BaseException:
            server.stop()
            raise
        self._phase("checks", t)
        t = time.monotonic()
        server.hand_over()
        self._phase("hand_over", t)
        report = self.report(plan, result, achieved, proof, delta_counts, declared, started_at, server, account)
        report["report"] = self.store_report(report)
        return report

    def resumes_own_try(self) -> bool:
        """Say whether the data directory was written by an earlier try of this run (its marker names the run);
        mark it as this run's otherwise. A directory no marker of this run names is never reused unasked."""
        marker = self.control / "pgdr-recovery.json"
        if self.resume_key is None:
            return False
        try:
            earlier = json.loads(marker.read_text()).get("run")
        except (OSError, ValueError, AttributeError):
            earlier = None
        written = data_directory_state(self.data_dir) == "not empty"
        if earlier != self.resume_key and written:
            return False  # someone else's files: check_data_directory refuses them
        self.control.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"run": self.resume_key, "host": socket.gethostname()}))
        return earlier == self.resume_key and written

    def place(self, plan: dict[str, Any], catalog, entry, store, archive, say) -> dict[str, int] | None:
        """Download, check and combine the chain beside the data directory, then move it in (``--delta``: sync it);
        return the delta's counts."""
        from pgdr.physical.recovery import prepare_data_directory

        staging = self.control / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        self.control.mkdir(parents=True, exist_ok=True)
        self.control.chmod(0o755)
        say(f"Downloading and checking {' -> '.join(plan['chain'])} into {staging} ...")
        prepared = prepare_data_directory(catalog, entry, store, staging / "work", staging / "data", archive)
        self.phases |= {f"restore_{k}": round(v, 2) for k, v in prepared.timings.items()}
        t = time.monotonic()
        delta_counts = None
        if plan["data_dir_state"] == "not empty":
            delta_counts = sync_delta(staging / "data", self.data_dir)
            say(
                f"--delta: {delta_counts['kept']} files kept (same size and SHA-256), {delta_counts['replaced']} "
                f"replaced, {delta_counts['removed']} removed."
            )
        else:  # entry by entry: the data directory may be a mount point, never renamed itself
            self.data_dir.mkdir(parents=True, exist_ok=True)
            for item in (staging / "data").iterdir():
                shutil.move(item, self.data_dir / item.name)
        shutil.rmtree(staging, ignore_errors=True)
        self._phase("place", t)
        return delta_counts

    def prove(
        self, server: RecoveredServer, plan: dict[str, Any], achieved: datetime | None, level: str
    ) -> dict[str, Any]:
        """Heartbeats prove the target; every plan database of the server is checked to ``level`` (a key of
        :data:`~pgdr.physical.proof.RECOVERY_PROOFS`; not when paused: read-only)."""
        from pgdr.physical.heartbeat import heartbeats
        from pgdr.physical.proof import check_recovered_databases

        beats = heartbeats(server.endpoint("postgres"))
        after = [b for b in beats if self.target is not None and b > self.target]
        if after:
            raise PermanentFailure(
                f"The recovered server holds {len(after)} heartbeat(s) written after the target "
                f"{self.target:%Y-%m-%d %H:%M:%S} UTC (first: {after[0].isoformat()}): replay went past the target. "
                "Do not open it to clients; report this as a pgdr defect. The server was stopped."
            )
        proof: dict[str, Any] = {
            "heartbeats_at_or_before_target": len(beats),
            "newest_heartbeat": beats[-1].isoformat() if beats else None,
            "databases_found": _databases(server),
            "level": level,
            "includes": RECOVERY_PROOFS[level],
        }
        if self.pause:
            proof["databases"] = "not checked: the server is paused in recovery (read-only); check after promotion"
            return proof

        point = (achieved or datetime.now(UTC)).isoformat()
        had_amcheck = _with_amcheck(server, proof["databases_found"])
        try:
            proof["databases"] = check_recovered_databases(
                self.res.plan,
                self.server,
                server,
                plan["base_backup"],
                point,
                lambda label: _work_folder(self.control / label),
                # the new host serves nobody yet: the proof, most of a large server's recovery, gets every core
                amcheck_jobs=max(2, os.cpu_count() or 2),
                proof=level,
            )
        finally:
            _remove_checker(server, proof["databases_found"], had_amcheck)
        return proof

    def report(
        self, plan, result, achieved, proof, delta_counts, declared, started_at, server, account
    ) -> dict[str, Any]:
        finished = datetime.now(UTC)
        # a recovery point after the declared failure lost nothing (to 'latest', declared earlier)
        loss = max(0.0, (declared - achieved).total_seconds()) if achieved else None
        return {
            "kind": "server-recovery",
            "server": self.server.name,
            "status": "paused at the target" if self.pause else "recovered and promoted",
            "triggered_by": self.triggered_by,
            "host": socket.gethostname(),
            "os_user": account,
            "data_dir": str(self.data_dir),
            "port": self.port,
            "target": plan["target"],
            "achieved_recovery_point": achieved.isoformat() if achieved else None,
            "declared_at": declared.isoformat(),
            "incident_id": self.incident_id,
            "data_loss_window_seconds": round(loss, 1) if loss is not None else None,
            "started_at": started_at.isoformat(),
            "finished_at": finished.isoformat(),
            "achieved_rto_seconds": round((finished - declared).total_seconds(), 1),
            "phase_seconds": self.phases,
            "plan": plan,
            "recovery": result.to_dict(),
            "delta": delta_counts,
            "proof": proof,
            "settings_added": {k: v for k, v in server.settings_written.items() if k != "restore_command"},
            "server_log": str(server.log_file),
            "next_steps": next_steps(self.pause, self.data_dir, self.server.name),
        }

    def store_report(self, report: dict[str, Any]) -> str:
        """Store the report (JSON and markdown) under the server's prefix (in the copy it recovered from, if one);
        return where the markdown is."""
        store, layout, _archive = self.res.archive(self.server, self.source)
        stamp = report["started_at"][:19].replace(":", "").replace("-", "") + "Z"
        base = layout.recovery_report_key(self.server.name, stamp, report["host"])
        store.put_bytes(base + ".json", json.dumps(report, indent=2, default=str).encode())
        store.put_bytes(base + ".md", render_server_report(report).encode())
        rto = server_rto_seconds(self.res.plan, self.server)
        record = incident_record(
            "server recovery",
            self.server.name,
            self.resume_key or report["started_at"],
            "restored",
            server_incident_measures(report),
            rto,
        )
        store_incident_record(store, layout, {**record, "mode": "server", "report": store.describe(base + ".md")})
        return store.describe(base + ".md")


def server_incident_measures(report: dict[str, Any]) -> dict[str, Any]:
    """The incident measured by a server recovery's report: declared, served (handed over), MTTR, data-loss window."""
    return {
        "id": report.get("incident_id"),
        "declared_at": report.get("declared_at"),
        "served_at": report.get("finished_at"),
        "mttr_seconds": report.get("achieved_rto_seconds"),  # declared to handed over
        "data_loss_window_seconds": report.get("data_loss_window_seconds"),
    }


def server_rto_seconds(plan, server) -> float | None:
    """A whole server's RTO: the strictest of its databases'."""
    return min((plan.database(name).rto.total_seconds() for name in server.databases), default=None)


@contextmanager
def _work_folder(path: Path):
    """A work directory of the checks, removed after them."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _replayed_point(server: RecoveredServer) -> datetime | None:
    from pgdr.postgres.client import connect

    with connect(server.endpoint("postgres"), application_name="pgdr-recover-server") as conn:
        return conn.execute("SELECT pg_last_xact_replay_timestamp()").fetchone()[0]


def _databases(server: RecoveredServer) -> list[str]:
    from pgdr.postgres.client import connect

    with connect(server.endpoint("postgres"), application_name="pgdr-recover-server") as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname").fetchall()
    return [r[0] for r in rows]


def _with_amcheck(server: RecoveredServer, databases: list[str]) -> set[str]:
    """Return the databases that have the ``amcheck`` extension already (the checks install it elsewhere)."""
    from pgdr.postgres.client import connect

    found = set()
    for name in databases:
        with connect(server.endpoint(name), application_name="pgdr-recover-server") as conn:
            if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'").fetchone():
                found.add(name)
    return found


def _remove_checker(server: RecoveredServer, databases: list[str], had_amcheck: set[str]) -> None:
    """Leave the server as it was recovered: no checking role, no ``amcheck`` where the checks installed it."""
    from psycopg import sql

    from pgdr.physical.cluster import READER_ROLE
    from pgdr.postgres.client import connect

    reader = sql.Identifier(READER_ROLE)
    with connect(server.endpoint("postgres"), application_name="pgdr-recover-server") as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (READER_ROLE,)).fetchone():
            return
    for name in databases:
        with connect(server.endpoint(name), application_name="pgdr-recover-server") as conn:
            conn.execute("SET search_path = pg_catalog, pg_temp")
            conn.execute(sql.SQL("DROP OWNED BY {}").format(reader))  # its grants (it owns nothing)
            if name not in had_amcheck:
                conn.execute("DROP EXTENSION IF EXISTS amcheck")
    with connect(server.endpoint("postgres"), application_name="pgdr-recover-server") as conn:
        conn.execute(sql.SQL("DROP ROLE {}").format(reader))


def next_steps(pause: bool, data_dir: Path, server: str) -> list[str]:
    """Return what the operator does next, in order."""
    quoted = shlex.quote(str(data_dir))
    steps = []
    if pause:
        steps.append(
            "Look at the data (the server is paused at the target, read-only, in its own configuration); then "
            f"promote it: pg_ctl -D {quoted} promote (or SELECT pg_promote()), and ALTER SYSTEM RESET "
            "restore_command, recovery_target_time, recovery_target_action; or stop it and recover to another moment."
        )
    steps += [
        "Hand the server to this host's service manager: pgdr started it with pg_ctl (pg_ctl -D "
        f"{quoted} stop, then start it as your service does, e.g. systemctl start postgresql).",
        "Point the application (DNS, connection strings, the plan's Airflow connections) at this host.",
        "Turn archiving on into a NEW prefix (never the old server's): set archive_command to the plan's archiver "
        f"with a new server name (e.g. {server}-2 in the plan's servers:), ALTER SYSTEM SET archive_mode = on, "
        "restart; then take a full base backup (pgdr_basebackup kind=full).",
        "Check the server's own settings for the new host (memory, listen_addresses, pg_hba.conf): they are the "
        "lost server's.",
    ]
    return steps


def render_server_report(report: dict[str, Any]) -> str:
    """Return a server recovery's report as markdown."""
    from pgdr.messages import duration_or_na, pitr_target_words

    proof = report["proof"]
    lines = [
        f"# Recovery of server `{report['server']}`: {report['status'].upper()}",
        "",
        f"- Triggered by: {report['triggered_by']}, on {report['host']} as {report['os_user']}",
        f"- Data directory: `{report['data_dir']}`" + (f", port {report['port']}" if report["port"] else ""),
        f"- Target: {pitr_target_words(report['target'])}; achieved recovery point (last transaction replayed): "
        f"{report['achieved_recovery_point'] or 'unknown'}",
        *([f"- Incident: {report['incident_id']}"] if report.get("incident_id") else []),
        f"- Failure declared at {report['declared_at']}: data-loss window "
        f"{duration_or_na(report['data_loss_window_seconds'])} (from the recovery point to the declaration)",
        f"- Achieved RTO (declared to handed over): {duration_or_na(report['achieved_rto_seconds'])}",
        f"- Base backups: {' -> '.join(report['plan']['chain'])}; WAL replayed: "
        f"{(report['recovery'].get('wal_bytes_replayed') or 0) / 1e6:.0f} MB",
        "",
        "## Phases",
        "",
        "| phase | seconds |",
        "| --- | --- |",
        *[f"| {name} | {seconds:.1f} |" for name, seconds in report["phase_seconds"].items()],
        "",
        "## Checks",
        "",
        f"- Heartbeats at or before the target: {proof['heartbeats_at_or_before_target']} (newest "
        f"{proof['newest_heartbeat'] or 'none'}); none after it",
        f"- Databases on the server: {', '.join(printable(d) for d in proof['databases_found'])}",
        # reports stored before the proof had levels: thorough
        f"- Proof: {proof.get('level', 'thorough')}: {RECOVERY_PROOFS[proof.get('level', 'thorough')]}",
    ]
    if isinstance(proof["databases"], str):
        lines.append(f"- Plan databases: {proof['databases']}")
    else:
        for name, facts in proof["databases"].items():
            expectations = facts["validation"].get("expectations", 0)
            lines.append(
                f"- `{name}`: {facts['tables']} tables, {facts['rows']} rows; pg_amcheck and sequences "
                f"{'passed' if facts['integrity'].get('ok', True) else 'FAILED'}; expectations: "
                + (
                    f"{expectations - facts['validation'].get('failed', 0)} of {expectations} passed"
                    if expectations
                    else "no suite in the plan"
                )
                + f"; checked as {facts['checked_as']} (never a superuser)"
            )
    if report["delta"]:
        d = report["delta"]
        lines.append(f"- --delta: {d['kept']} files kept, {d['replaced']} replaced, {d['removed']} removed")
    lines += ["", "## Settings added (postgresql.auto.conf)", ""]
    lines += [f"- `{k} = {v}`" for k, v in report["settings_added"].items()]
    lines += ["", "## Next steps", ""] + [f"1. {step}" for step in report["next_steps"]]
    return "\n".join(lines) + "\n"
