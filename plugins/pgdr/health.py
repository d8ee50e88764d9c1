"""Health: is the DR plan's promise holding right now? Checked every few minutes.

For each database: is the source reachable; do restore tests run on a cluster of their own
(``verify_conn_id``); is the storage target reachable and writable (a small probe object is
written and removed); is the newest backup younger than the RPO; is the
newest *verified* backup younger than the plan's verification window; and is there enough free
space where pgdr keeps its work files. For each server under point-in-time recovery: a heartbeat
row is written, the archiver must not be failing, and the WAL archive must lag the server by no
more than the server's RPO.

The checks are pure functions of the deployment they are given (a :class:`pgdr.resources.Resources`);
the task opens the connections, emits the gauges and sends the alerts.

Alerts go out on a **change of state** only: one message when a check starts failing, one
recovery message when it passes again, never one every five minutes. The last state of every
check is kept in the alert journal (in the storage target), so it survives worker restarts.
Each run also emits gauges (:mod:`pgdr.airflow_glue.metrics`) through Airflow's metrics layer (StatsD or
OpenTelemetry, as Airflow
is configured), named ``pgdr.<metric>.<database>``.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pgdr.messages import first_line, format_duration
from pgdr.resources import Resources

log = logging.getLogger(__name__)


@dataclass
class CheckResult:
    """One health check of one database: ok or not, and a sentence that says why."""

    check: str
    database: str
    ok: bool
    detail: str
    value: float | None = None

    @property
    def key(self) -> str:
        return f"health-{self.check}-{self.database}"


@dataclass
class SourceBackups:
    """One reading of a database's catalog in its storage target, shared by every check that needs its backups."""

    backups: list  # BackupEntry, oldest first
    damaged: list  # DamagedBackup
    error: Exception | None = None  # the catalog could not be read


def read_source(db, res: Resources) -> SourceBackups:
    """Read the catalog of ``db`` once (every manifest); an unreadable catalog is a result, not an exception."""
    from pgdr.logical.catalog import BackupCatalog

    try:
        store, layout = res.store(db.storage)
        catalog = BackupCatalog(store, layout, db.name)
        return SourceBackups(catalog.backups(), catalog.damaged)
    except Exception as err:  # noqa: BLE001 - the failure is the result
        return SourceBackups([], [], err)


def check_source(db, res: Resources) -> CheckResult:
    """The source database answers a query."""
    from pgdr.postgres.client import connect

    try:
        endpoint = res.database(db)
        with connect(endpoint) as conn:
            conn.execute("SELECT 1")
        return CheckResult("source", db.name, True, f"{endpoint.describe()} answers")
    except Exception as err:  # noqa: BLE001 - the failure is the result
        return CheckResult("source", db.name, False, first_line(err))


def check_standby(db, res: Resources) -> CheckResult | None:
    """The standby a database (or a PITR server, for its base backups) is backed up from (``source_conn_id``) lags
    no more than ``max_standby_lag``; ``None`` when it names none. The lag is its value (a gauge)."""
    from pgdr.logical.standby import lag_problem, primary_mark, standby_lag
    from pgdr.plan import ProtectedServer

    if not db.source_conn_id:
        return None
    limit = db.max_standby_lag.total_seconds()
    backups = "base backups" if isinstance(db, ProtectedServer) else "backups"
    fallback = f"{backups} are taken from the primary" if db.on_standby_lag == "primary" else f"{backups} fail"
    endpoint = res.server if isinstance(db, ProtectedServer) else res.database
    try:
        standby = endpoint(db, conn_id=db.source_conn_id)
        lag = standby_lag(standby, primary_mark(endpoint(db)), limit)
    except Exception as err:  # noqa: BLE001 - the failure is the result
        return CheckResult("standby_lag", db.name, False, f"{first_line(err)}: {fallback} meanwhile")
    problem = lag_problem(standby, lag, limit)
    if problem is not None:
        return CheckResult(
            "standby_lag",
            db.name,
            False,
            f"{problem}: {fallback} meanwhile. Check pg_stat_replication on the primary",
            lag,
        )
    return CheckResult(
        "standby_lag", db.name, True, f"{standby.describe()} lags {format_duration(lag)} behind the primary", lag
    )


def check_copies(db, res: Resources, now: datetime, source: SourceBackups) -> list[CheckResult]:
    """Each copy target (``copies``) holds every backup stored more than ``copy_rpo`` ago; the value is how long the
    oldest missing one has waited (a gauge per target)."""
    from pgdr.logical.copies import copy_lags

    if not db.copies:
        return []
    limit = db.copy_rpo.total_seconds()
    try:
        if source.error is not None:
            raise source.error
        lags = copy_lags(db, res, now, source.backups)
    except Exception as err:  # noqa: BLE001 - the failure is the result
        return [
            CheckResult(f"copy_lag.{target.name}", db.name, False, f"the copy cannot be compared: {first_line(err)}")
            for target in db.copies
        ]
    return copy_lag_results(
        db.name, lags, limit, "every backup", lambda lag: f"{len(lag.missing)} of them" if lag.missing else ""
    )


def copy_lag_results(subject: str, lags, limit: float, whole: str, lacking) -> list[CheckResult]:
    """The ``copy_lag.<target>`` check of each copy's lag (a database's or a server's): failing with the lag's problem
    past ``limit``; else saying the copy holds ``whole``, or what it lacks (``lacking(lag)``, ``""`` for nothing)."""
    results = []
    for lag in lags:
        problem, missing = lag.problem(limit), lacking(lag)
        if problem is not None:
            detail = problem
        elif not missing:
            detail = f"copy {lag.target!r} holds {whole}"
        else:
            detail = (
                f"copy {lag.target!r} lacks the newest {missing}, for {format_duration(lag.lag_s)} (within copy_rpo)"
            )
        results.append(CheckResult(f"copy_lag.{lag.target}", subject, problem is None, detail, lag.lag_s))
    return results


def check_verification_server(db, res: Resources) -> CheckResult:
    """Restore tests run on a cluster of their own, not on the production one (``verify_conn_id``)."""

    try:
        source = res.database(db)
        verify = res.database(db, conn_id=db.verify_conn_id)
    except Exception as err:  # noqa: BLE001
        return CheckResult("verify_server", db.name, False, first_line(err))
    if (source.host, source.port) == (verify.host, verify.port):
        return CheckResult(
            "verify_server",
            db.name,
            False,
            f"verify-restores and drills restore on the production cluster {source.host}:{source.port} "
            f"(verify_conn_id {db.verify_conn_id!r}): they compete with it for disk and CPU and run restored code "
            "there. Set verify_conn_id to a connection of another cluster (README, Security model)",
        )
    return CheckResult(
        "verify_server", db.name, True, f"restore tests run on {verify.host}:{verify.port}, apart from production"
    )


def check_storage(db, res: Resources) -> CheckResult:
    """The storage target accepts and returns a small probe object (one per database, written again each run)."""

    try:
        store, layout = res.store(db.storage)
        # One key per database, written again each run and never deleted: the workers' credentials need no delete
        # (README, least privilege), and under Object Lock it could not be deleted for days anyway (a lifecycle
        # rule expires its old versions).
        key = layout.probe_key(db.name)
        payload = b"pgdr health probe"
        store.put_bytes(key, payload)
        if store.get_bytes(key) != payload:
            return CheckResult("storage", db.name, False, f"{store.describe(key)} returned different bytes")
        return CheckResult("storage", db.name, True, f"{store.describe()} is writable")
    except Exception as err:  # noqa: BLE001
        return CheckResult("storage", db.name, False, first_line(err))


SSE_SAMPLE = 100  # objects whose encryption one run asks S3 about (a HEAD each): the newest, then a rotating slice


def check_encryption(db, res: Resources, now: datetime, source: SourceBackups) -> CheckResult | None:
    """Every object under the database's prefix is stored with the target's server-side encryption,
    and the newest backup is encrypted client-side when the plan says so. ``None``: nothing to check.

    S3 tells an object's encryption only per object (a HEAD request), so one run checks the
    :data:`SSE_SAMPLE` newest objects and a slice of the others that moves on every run: over
    successive runs every object is checked.
    """
    target = db.storage
    if not (target.kind == "s3" and target.sse) and not db.encryption_key_conn_id:
        return None
    findings: list[str] = []
    checked = 0
    try:
        store, layout = res.store(target)
        if target.kind == "s3" and target.sse:
            objects = sorted(store.list(layout.database_prefix(db.name)), key=lambda o: o.key)
            newest = sorted(objects, key=lambda o: o.modified, reverse=True)[:SSE_SAMPLE]
            start = (int(now.timestamp()) // 60 * SSE_SAMPLE) % max(1, len(objects))
            sample = {o.key: o for o in [*newest, *objects[start : start + SSE_SAMPLE]]}
            for key in sorted(sample):
                found, kms_key = store.encryption_of(key)
                checked += 1
                # S3 answers with the key's ARN; the plan may name the key by id, alias or ARN
                kms_ok = (
                    target.sse != "aws:kms"
                    or not target.kms_key_id
                    or target.kms_key_id.startswith("alias/")
                    or target.kms_key_id in (kms_key or "")
                )
                if found != target.sse or not kms_ok:
                    findings.append(
                        f"{store.describe(key)} is stored with {found or 'no server-side encryption'}"
                        + ("" if kms_ok else " under another KMS key")
                    )
        if db.encryption_key_conn_id:
            if source.error is not None:
                raise source.error
            backups = source.backups
            if backups and backups[-1].manifest.encryption is None:
                findings.append(
                    f"the newest backup {backups[-1].backup_id} is not encrypted client-side, though the plan "
                    f"encrypts {db.name} (encryption.key_conn_id {db.encryption_key_conn_id!r})"
                )
    except Exception as err:  # noqa: BLE001 - the failure is the result
        return CheckResult("encryption", db.name, False, f"encryption could not be checked: {first_line(err)}")
    if findings:
        more = f" and {len(findings) - 3} more" if len(findings) > 3 else ""
        return CheckResult(
            "encryption",
            db.name,
            False,
            f"{len(findings)} finding(s): {'; '.join(findings[:3])}{more}. Someone or something wrote to the "
            "backups' prefix without the plan's encryption: find out what, and re-upload or delete those objects",
            float(len(findings)),
        )
    what = [f"{checked} objects checked: all {target.sse}"] if checked else []
    if db.encryption_key_conn_id:
        what.append("the newest backup is encrypted client-side")
    return CheckResult("encryption", db.name, True, "; ".join(what), 0.0)


LOCK_SAMPLE = 20  # the newest objects of each locked target whose lock one run asks S3 about (a HEAD each)
LOCK_SLACK = timedelta(minutes=10)  # how much earlier than written + days a lock may end (the worker's clock)


def check_object_lock(db, res: Resources) -> CheckResult | None:
    """Every storage target of ``db`` with ``object_lock`` in the plan is a bucket with Object Lock enabled, its
    newest objects carry the plan's lock (mode, and a retain-until date at least ``days`` after they were written),
    and no object of ``db`` there is hidden by a delete marker (pgdr deletes versions on such a target, never makes a
    marker: a marker is someone else's delete). ``None``: no target of ``db`` asks for Object Lock."""
    targets = [t for t in (db.storage, *db.copies) if t.kind == "s3" and t.object_lock is not None]
    if not targets:
        return None

    def open_target(target):
        store, layout = res.store(target)
        return store, [layout.database_prefix(db.name)]

    return _object_lock_result(db.name, f"backups of {db.name}", targets, open_target, f"--database {db.name}")


def check_server_object_lock(server, res: Resources) -> CheckResult | None:
    """The same for a PITR server's base backups and WAL archive (and their copies); the archive's own bucket also
    needs a default retention at least the plan's lock, the only lock the archiver's WAL gets (barman-cloud cannot
    ask for one). ``None``: no target of the server asks for Object Lock."""
    pitr = server.pitr
    targets = [t for t in (pitr.storage, *pitr.copies) if t.kind == "s3" and t.object_lock is not None]
    if not targets:
        return None

    def open_target(target):
        store, layout, _archive = res.archive(server, None if target == pitr.storage else target)
        return store, [layout.server_prefix(server.name), layout.wal_segments_prefix(server.name)]

    return _object_lock_result(
        server.name,
        f"base backups or WAL of server {server.name}",
        targets,
        open_target,
        f"--server {server.name}",
        archived_by_barman=pitr.storage,
    )


def _default_retention_problem(store, lock) -> str | None:
    """What is wrong with the default retention of the bucket the archiver writes to (``None``: it locks the WAL
    at least as the plan's ``lock`` asks), with the command that sets it."""
    import json

    default = store.default_retention()
    if default is not None and default.days >= lock.days and default.mode in (lock.mode, "compliance"):
        return None
    rule = {"DefaultRetention": {"Mode": lock.mode.upper(), "Days": lock.days}}
    config = json.dumps({"ObjectLockEnabled": "Enabled", "Rule": rule})
    has = f"a default retention of {default.describe()}" if default else "no default retention"
    return (
        f"s3://{store.bucket} has {has}, and the WAL archive is locked by nothing else (barman-cloud cannot ask for a "
        f"lock of its own): until it is set, any credentials allowed to delete (the pruner's, an administrator's, "
        f"a thief's) can delete the WAL a recovery needs. Set it: aws s3api put-object-lock-configuration "
        f"--bucket {store.bucket} --object-lock-configuration '{config}'"
    )


def _object_lock_result(
    name: str, what: str, targets: list, open_target, undelete: str, archived_by_barman=None
) -> CheckResult:
    """The ``object_lock`` check of ``name`` over its locked ``targets``: ``open_target(target)`` returns the store
    and the key prefixes of ``what`` there; ``undelete`` is what ``python -m pgdr undelete`` is given to bring
    hidden objects back; ``archived_by_barman``, the target whose WAL the archiver writes (locked by the bucket's
    default retention alone)."""
    unlocked: list[str] = []
    hidden: list[str] = []
    no_default: list[str] = []
    checked = 0
    try:
        for target in targets:
            store, prefixes = open_target(target)
            store.check_object_lock()
            lock = target.object_lock
            if target == archived_by_barman:
                no_default += [p for p in (_default_retention_problem(store, lock),) if p]
            markers = []
            for prefix in prefixes:
                versions = store.versions(prefix)  # one listing: the objects, and the delete markers hiding some
                markers += [v for v in versions if v.delete_marker and v.latest]
                current = [v for v in versions if v.latest and not v.delete_marker]
                for version in sorted(current, key=lambda v: v.modified, reverse=True)[:LOCK_SAMPLE]:
                    mode, until = store.retention_of(version.key, version.version_id)
                    checked += 1
                    if mode not in (lock.mode.upper(), "COMPLIANCE"):
                        unlocked.append(f"{store.describe(version.key)} has {mode or 'no'} lock, not {lock.mode}")
                    elif until is None or until < lock.until(version.modified) - LOCK_SLACK:
                        unlocked.append(
                            f"{store.describe(version.key)} is locked only until {until:%Y-%m-%d %H:%M} UTC"
                        )
            if markers:
                first = min(markers, key=lambda m: m.modified)
                hidden.append(
                    f"{len(markers)} objects on {target.name} (the first {store.describe(first.key)}, deleted "
                    f"{first.modified:%Y-%m-%d %H:%M} UTC; python -m pgdr undelete {undelete} --from {target.name})"
                )
    except Exception as err:  # noqa: BLE001 - the failure is the result
        return CheckResult("object_lock", name, False, f"Object Lock could not be checked: {first_line(err)}")
    problems = []
    if hidden:
        problems.append(
            f"someone deleted {what} (pgdr never does on a locked target: it deletes versions once their lock ends), "
            f"hiding them behind delete markers: {'; '.join(hidden)}. Their locked versions are intact. Find out who "
            "did it (CloudTrail, the credentials used), then bring them back with the command given"
        )
    problems += no_default
    if unlocked:
        more = f" and {len(unlocked) - 3} more" if len(unlocked) > 3 else ""
        problems.append(
            f"{len(unlocked)} of the {checked} newest objects lack the plan's Object Lock: {'; '.join(unlocked[:3])}"
            f"{more}. Until their lock is right, whoever holds the workers' credentials can delete them: find what "
            "wrote them without pgdr's lock (another tool, a plan without object_lock, the archiver without the "
            "bucket's default retention) and set it (aws s3api put-object-retention) or write them again"
        )
    if problems:
        count = float(len(unlocked) + len(hidden) + len(no_default))
        return CheckResult("object_lock", name, False, ". ".join(problems), count)
    where = ", ".join(f"{t.name} ({t.object_lock.describe()})" for t in targets)
    return CheckResult("object_lock", name, True, f"{checked} newest objects locked as planned on {where}", 0.0)


def check_backup_ages(db, res: Resources, now: datetime, source: SourceBackups) -> list[CheckResult]:
    """The newest backup is within the RPO; the newest verified one within the verification window."""
    if source.error is not None:
        reason = f"the catalog cannot be read: {first_line(source.error)}"
        return [CheckResult("backup_age", db.name, False, reason), CheckResult("verified_age", db.name, False, reason)]
    backups, damaged = source.backups, source.damaged
    results = [
        CheckResult(
            "catalog",
            db.name,
            not damaged,
            f"{len(damaged)} damaged records (each says what pgdr does without it): "
            + "; ".join(f"{d.backup_id}: {first_line(d.problem)[:200]}" for d in damaged[:5])
            + ". Restore or delete them, and find out what changed the storage"
            if damaged
            else f"all {len(backups)} backups are readable",
            float(len(damaged)),
        )
    ]
    good = [b for b in backups if b.status != "failed"]
    verified = [b for b in backups if b.status == "verified"]
    if good:
        age = (now - good[-1].recovery_point).total_seconds()
        ok = age <= db.rpo.total_seconds()
        results.append(
            CheckResult(
                "backup_age",
                db.name,
                ok,
                f"the newest backup ({good[-1].backup_id}) is {format_duration(age)} old; the RPO is "
                f"{format_duration(db.rpo.total_seconds())}",
                age,
            )
        )
    else:
        results.append(CheckResult("backup_age", db.name, False, "there is no backup at all; run pgdr_backup"))
    window = res.plan.health.verify_window.total_seconds()
    if verified:
        age = (now - verified[-1].recovery_point).total_seconds()
        results.append(
            CheckResult(
                "verified_age",
                db.name,
                age <= window,
                f"the newest verified backup ({verified[-1].backup_id}) is {format_duration(age)} old; the window "
                f"is {format_duration(window)}",
                age,
            )
        )
    else:
        results.append(
            CheckResult("verified_age", db.name, False, "no backup has been verified; check pgdr_verify_restore")
        )
    return results


def check_pitr_server(
    server, res: Resources, now: datetime, source: str = "pgdr_health"
) -> tuple[list[CheckResult], dict[str, float]]:
    """Point-in-time recovery of one server: a heartbeat written, the archiver working, the archive's lag within the
    RPO.

    The *WAL archive lag* is how much acknowledged work exists only on the server: the bytes
    written since the end of the newest archived segment, and (when there are any) the seconds
    since that segment was archived. It is the data a server loss would cost now: the RPO achieved.
    """
    from pgdr.physical.archive import archiver_state
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.physical.heartbeat import write_heartbeat
    from pgdr.postgres.client import connect

    name, rpo = server.name, server.pitr.rpo
    try:  # read once: the identity check and the copies' lag both compare with them
        store, layout, archive = res.archive(server)
        archive_url, backups = archive.url, BaseBackupCatalog(store, layout, server.name).backups()
    except Exception as err:  # noqa: BLE001 - the failure is each check's result
        archive_url, backups = "", err
    copies = check_server_copies(server, res, now, None if isinstance(backups, Exception) else backups)
    optional = [c for c in (check_server_object_lock(server, res), check_standby(server, res)) if c is not None]
    try:
        endpoint = res.server(server)
        write_heartbeat(endpoint, source)
        with connect(endpoint, application_name="pgdr-health") as conn:
            state = archiver_state(conn)
            current_lsn, mode, segment_size, server_now, identifier = conn.execute(
                "SELECT pg_current_wal_lsn()::text, current_setting('archive_mode'), (SELECT setting::bigint FROM "
                "pg_settings WHERE name = 'wal_segment_size'), clock_timestamp(), "
                "(SELECT system_identifier::text FROM pg_control_system())"
            ).fetchone()
    except Exception as err:  # noqa: BLE001 - the failure is the result
        return [
            CheckResult(
                "archiver", name, False, f"cannot read the archiver state of server {name!r}: {first_line(err)}"
            ),
            *copies,
            *optional,
        ], {}
    lag_bytes, lag = wal_lag(state, current_lsn, segment_size, server_now, name, rpo)
    checks = [
        archiver_check(state, mode, name),
        lag,
        cluster_identity_check(server, identifier, backups, archive_url),
        *copies,
        *optional,
    ]
    return checks, {f"wal_archive_lag_bytes.{name}": float(lag_bytes)}


def check_server_copies(server, res: Resources, now: datetime, backups: list | None = None) -> list[CheckResult]:
    """Each copy target of a server (``pitr.copies``) holds its WAL and base backups stored more than ``copy_rpo``
    ago, with no segment missing after its newest base backup; the value is how long the oldest missing one waited.

    :param backups: the archive's base backups, when already read (else they are read here)."""
    from pgdr.physical.copies import server_copy_lags

    if not server.pitr.copies:
        return []
    limit = server.pitr.copy_rpo.total_seconds()
    try:
        lags = server_copy_lags(server, res, now, backups)
    except Exception as err:  # noqa: BLE001 - the failure is the result
        return [
            CheckResult(f"copy_lag.{t.name}", server.name, False, f"the copy cannot be compared: {first_line(err)}")
            for t in server.pitr.copies
        ]
    return copy_lag_results(
        server.name,
        lags,
        limit,
        "the whole WAL archive and every base backup",
        lambda lag: (
            f"{len(lag.missing_wal)} WAL files and {len(lag.missing_backups)} base backups"
            if lag.missing_wal or lag.missing_backups
            else ""
        ),
    )


def cluster_identity_check(server, identifier: str, backups: list | Exception, archive_url: str) -> CheckResult:
    """The server is the cluster whose base backups (and so WAL) its prefix holds: a rebuilt server archiving into
    the old one's prefix is told apart by its system identifier.

    :param backups: the server's base backups (oldest first), or the error that kept them from being read.
    :param archive_url: where its WAL archive is (named in the alert).
    """
    from pgdr.physical.basebackup import foreign_cluster_message

    if isinstance(backups, Exception):
        return CheckResult(
            "cluster_identity", server.name, False, f"cannot read the base backups: {first_line(backups)}"
        )
    if backups and backups[-1].record.system_identifier != identifier:
        return CheckResult(
            "cluster_identity",
            server.name,
            False,
            foreign_cluster_message(server.name, backups[-1], identifier, archive_url),
        )
    return CheckResult(
        "cluster_identity",
        server.name,
        True,
        f"server {server.name!r} is the cluster of its base backups (system identifier {identifier})",
    )


def archiver_check(state, mode: str, name: str) -> CheckResult:
    """The server archives WAL (``archive_mode``) and its ``archive_command`` is not failing."""
    archived, last_wal = state.archived_count, state.last_archived_wal
    failed, failed_wal, failed_time = state.failed_count, state.last_failed_wal, state.last_failed_time
    if mode not in ("on", "always"):
        return CheckResult(
            "archiver",
            name,
            False,
            f"server {name!r} does not archive WAL (archive_mode = {mode}): point-in-time recovery is "
            "impossible. Set the archive_command lines (README) and restart it",
        )
    if state.failing:
        return CheckResult(
            "archiver",
            name,
            False,
            f"the archive_command of server {name!r} is failing: {failed} failed attempts so far, last on WAL "
            f"segment {failed_wal} at {failed_time:%Y-%m-%d %H:%M:%S} UTC. WAL piles up on the server and "
            f"nothing after {last_wal or 'the first segment'} can be recovered. Check the server log ('archive "
            "command failed') and the storage target",
            float(failed),
        )
    return CheckResult(
        "archiver", name, True, f"server {name!r} archives WAL ({archived} segments, newest {last_wal})", 0.0
    )


def wal_lag(
    state, current_lsn: str, segment_size: int, server_now: datetime, name: str, rpo
) -> tuple[int, CheckResult]:
    """Return the bytes the WAL archive lags the server by, and the check that its lag in time is within ``rpo``."""
    from pgdr.physical.archive import archived_segment, lsn_to_int, segment_number

    last_time = state.last_archived_time
    segment = archived_segment(state.last_archived_wal)
    if segment:
        archived_end = (segment_number(segment, segment_size) + 1) * segment_size
        lag_bytes = max(0, lsn_to_int(current_lsn) - archived_end)
    else:
        lag_bytes = lsn_to_int(current_lsn)
    lag_s = (server_now - last_time).total_seconds() if lag_bytes and last_time else 0.0
    if last_time is None:
        lag_s = float("inf")
    ok = lag_s <= rpo.total_seconds()
    return lag_bytes, CheckResult(
        "wal_lag",
        name,
        ok,
        (
            f"the WAL archive of server {name!r} is {format_duration(lag_s)} ({lag_bytes / 1e6:.1f} MB) behind "
            f"the server, within its RPO of {format_duration(rpo.total_seconds())}"
        )
        if ok
        else (
            f"the WAL archive of server {name!r} is "
            f"{'never written' if last_time is None else format_duration(lag_s)} ({lag_bytes / 1e6:.1f} MB) "
            f"behind the server: more than its RPO of {format_duration(rpo.total_seconds())}. A loss of the "
            "server now would lose that much. Check the archiver (pg_stat_archiver) and archive_timeout"
        ),
        lag_s if lag_s != float("inf") else None,
    )


def check_free_space(path: Path, min_free_gb: float) -> CheckResult:
    """Enough free space where pgdr keeps its work files (dumps are staged there)."""
    path.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(path).free / 1e9
    return CheckResult(
        "free_space",
        "workers",
        free_gb >= min_free_gb,
        f"{free_gb:.1f} GB free in {path}; at least {min_free_gb:g} GB are needed",
        free_gb,
    )


def transitions(results: list[CheckResult], journal) -> tuple[list[CheckResult], list[CheckResult]]:
    """Compare with the stored states; return (newly failing, newly recovered) and store the new states."""
    failing, recovered = [], []
    now = datetime.now(UTC).isoformat()
    for result in results:
        previous = journal.get_state(result.key) or {}
        was_ok = previous.get("ok", True)  # a check never seen before counts as ok: its failure is news
        if was_ok and not result.ok:
            failing.append(result)
        elif not was_ok and result.ok:
            recovered.append(result)
        if previous.get("ok") is not result.ok or not previous:
            journal.set_state(result.key, {**asdict(result), "since": now})
    return failing, recovered


def last_measurements(db, res: Resources, source: SourceBackups) -> dict[str, float | None]:
    """Return the last restore duration (verification) and the last drill's RTO and RPO of ``db``."""
    import json

    values: dict[str, float | None] = {}
    verified = [b for b in source.backups if b.verification]
    if verified and verified[-1].verification.restore_seconds is not None:
        values[f"last_restore_seconds.{db.name}"] = verified[-1].verification.restore_seconds
    target = res.plan.default_storage or db.storage
    store, layout = res.store(target)
    drills = sorted(o.key for o in store.list(layout.report_key("drills") + "/") if o.key.endswith("/drill.json"))
    if drills:
        report = json.loads(store.get_bytes(drills[-1]))
        for result in report.get("databases", []):
            if result["database"] == db.name:
                values[f"last_rto_seconds.{db.name}"] = result["checks"]["rto"]["achieved_s"]
                values[f"last_rpo_seconds.{db.name}"] = result["checks"]["rpo_newest_verified"]["achieved_s"]
    return values


def check_database(db, res: Resources, now: datetime) -> tuple[list[CheckResult], dict[str, float | None]]:
    """Run every check of one database; return the results and the last restore and drill numbers (gauges)."""
    source = read_source(db, res)
    results = [
        check_source(db, res),
        check_verification_server(db, res),
        check_storage(db, res),
        *check_backup_ages(db, res, now, source),
        *check_copies(db, res, now, source),
    ]
    for optional in (check_encryption(db, res, now, source), check_object_lock(db, res), check_standby(db, res)):
        if optional is not None:
            results.append(optional)
    try:
        extra = last_measurements(db, res, source)
    except Exception as err:  # noqa: BLE001 - metrics must not hide the checks
        log.warning("Could not read the last restore and drill numbers of %s: %s", db.name, err)
        extra = {}
    log_results(results, db.name)
    return results, extra


def log_results(results: list[CheckResult], what: str) -> None:
    """Log every check of ``what``: OK ones as information, failing ones as warnings."""
    for r in results:
        log.log(
            logging.INFO if r.ok else logging.WARNING,
            "%s %s: %s: %s",
            "OK  " if r.ok else "FAIL",
            what,
            r.check,
            r.detail,
        )
