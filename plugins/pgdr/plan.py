"""The DR plan: one YAML file that declares what is protected and what was promised.

A disaster-recovery plan states, for each protected database, how often it is backed up, how
much data may be lost (the RPO, recovery point objective), how long a restore may take (the RTO,
recovery time objective), how long backups are kept (the retention policy), where they are
stored and who is told when something goes wrong. pgdr reads these promises from
``include/pgdr.yaml`` (or the file named by ``$PGDR_PLAN``) and turns each into a DAG.

Loading is cheap and does no network or database I/O, so DAG files read the plan at parse time.
The file is validated as it is loaded: a typo gets one error naming the file, the line, the key
and what was expected, long before anyone relies on the plan at 3 a.m.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from pgdr.errors import PlanError
from pgdr.storage.backends import LOCK_MODES, ObjectLock

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PLAN_PATH = PROJECT_ROOT / "include" / "pgdr.yaml"
PLAN_ENV_VAR = "PGDR_PLAN"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$")
_DURATION_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_CONN_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
# Names that the storage layout (pgdr.storage.layout) uses for its own objects beside the databases' folders.
RESERVED_NAMES = {"reports": "drill and health reports"}
DEFAULT_COMPRESSION = "gzip:1"  # readable by every build of pg_restore; see compression_spec


@dataclass(frozen=True)
class RetentionPolicy:
    """How long backups are kept.

    A backup is kept while it is one of the newest ``keep_last`` complete backups *or* younger
    than ``keep_days``; the newest verified backup is always kept. Partial uploads (objects with
    no manifest, left by a killed run) are removed once older than ``partial_grace``.
    """

    keep_last: int = 7
    keep_days: int = 14
    partial_grace: timedelta = timedelta(hours=6)


@dataclass(frozen=True)
class StorageTarget:
    """Where backups live: a local folder or an S3 bucket and prefix."""

    name: str
    kind: str  # "local" or "s3"
    path: Path | None = None
    bucket: str | None = None
    prefix: str = ""
    aws_conn_id: str | None = None
    # S3 server-side encryption asked for on every write: "AES256" (SSE-S3) or "aws:kms" (SSE-KMS,
    # with kms_key_id, or the account's default KMS key when that is None). None: the bucket's default.
    sse: str | None = None
    kms_key_id: str | None = None
    # S3 Object Lock on every object pgdr writes there (pgdr.storage.backends.ObjectLock); None: no lock asked for.
    object_lock: ObjectLock | None = None
    # The AWS connection of the pruner: the only one that deletes (retention, a copy's retention); None: aws_conn_id.
    # With it, aws_conn_id's credentials need no delete permission at all (README, least privilege).
    prune_conn_id: str | None = None

    def describe(self) -> str:
        """Return the target as a person would write it (``s3://bucket/prefix`` or a path)."""
        if self.kind == "s3":
            return f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return str(self.path)


@dataclass(frozen=True)
class Notifications:
    """Who is told: a Slack webhook connection, and e-mail through an SMTP connection."""

    slack_conn_id: str | None = None
    smtp_conn_id: str | None = None
    email_to: tuple[str, ...] = ()
    email_from: str = "pgdr@localhost"


@dataclass(frozen=True)
class DrillPolicy:
    """When the DR drill runs and how long it may take as a whole."""

    schedule: str = "0 3 1 * *"  # the first of each month, 03:00 UTC
    max_duration: timedelta = timedelta(hours=2)


@dataclass(frozen=True)
class HealthPolicy:
    """How often health is checked, and its thresholds."""

    schedule: str = "*/5 * * * *"
    verify_window: timedelta = timedelta(days=1)  # the newest verified backup may be this old
    min_free_gb: float = 1.0  # free space where pgdr keeps work files


@dataclass(frozen=True)
class EvidencePolicy:
    """The evidence log (:mod:`pgdr.evidence`): signed, hash-chained receipts of every backup, verification and
    restore, under ``<prefix>/evidence-v1/`` of ``storage``, kept ``keep`` (never by backup retention)."""

    storage: StorageTarget
    key_conn_id: str  # the Airflow connection of the signing key (login: key id; password: base64 key)
    keep: timedelta = timedelta(days=400)


@dataclass(frozen=True)
class ProtectedDatabase:
    """One database of the plan, with every target and policy resolved."""

    name: str
    conn_id: str
    dbname: str
    rpo: timedelta
    rto: timedelta
    retention: RetentionPolicy
    storage: StorageTarget
    notify: Notifications
    dump_jobs: int
    verify_conn_id: str
    server: str  # the pool key: databases on one server share its dump budget
    line: int = 0
    compression: str = DEFAULT_COMPRESSION  # pg_dump's --compress, normalised: "gzip:1", "zstd:3", "none"
    # How long a backup waits for a table's lock before it gives up (pg_dump --lock-wait-timeout, and the row
    # counts' lock_timeout), so that it never queues a migration's ALTER TABLE, and every query behind it, for long.
    lock_wait_timeout: timedelta = timedelta(seconds=30)
    # With it, a backup that holds up another session (a migration's ALTER TABLE queued behind pg_dump) this long
    # gives way: stopped and retried later. None (the default): the backup goes on and a warning names the session.
    yield_after: timedelta | None = None
    # A hot standby of the database's server to dump from (pgdr.logical.standby), so the primary reads nothing; one
    # lagging more than max_standby_lag (or not a standby, or unreachable) is not used: on_standby_lag "primary" backs
    # up from the primary with a warning, "fail" fails the backup.
    source_conn_id: str | None = None
    max_standby_lag: timedelta = timedelta(minutes=5)
    on_standby_lag: str = "primary"
    # The Airflow connection whose login restores and reads restored copies: a role without
    # superuser (see pgdr.airflow_glue.connections.restore_endpoint). None: not configured (restores refuse).
    restore_conn_id: str | None = None
    restore_as_superuser: bool = False  # explicit, documented opt-out, warned about in every report
    # Client-side encryption (pgdr.storage.encryption): the Airflow connection holding the master
    # keys. None: backups are stored as pg_dump wrote them (still under the target's SSE, if any).
    encryption_key_conn_id: str | None = None
    # Second copies (pgdr.logical.copies): storage targets every complete backup is copied to by pgdr_copy, checked
    # against its manifest there; another bucket, region or account, so that losing the first one loses no backup.
    # A backup not in a copy copy_rpo after it was stored fails the health check copy_lag.
    copies: tuple[StorageTarget, ...] = ()
    copy_rpo: timedelta = timedelta(hours=1)
    # How often pgdr_verify_restore's daily run restores the newest backup of each copy from the copy itself, so that
    # the copy is proven, not assumed (pgdr.verification.copy_targets).
    verify_copies_every: timedelta = timedelta(days=7)
    # The logins the application uses: after a restore's privileges phase, each must be able to do on
    # the restored copy exactly what it can do on the live database (pgdr.logical.privileges.compare_app_roles).
    app_roles: tuple[str, ...] = ()
    # Objects a restored copy goes without (pgdr.logical.privileges.SKIPPABLE): "publications", "event_triggers".
    skip_objects: tuple[str, ...] = ()

    def storage_named(self, name: str | None) -> StorageTarget:
        """Return the storage target a restore reads from: the database's own (``None`` or its name) or one of its
        ``copies``; :class:`ValueError` saying which exist for another name."""
        return _own_or_copy(name, self.storage, "its storage", self.copies, f"database {self.name!r} is", "it is")


def _own_or_copy(
    name: str | None, own: StorageTarget, own_role: str, copies: tuple[StorageTarget, ...], subject: str, pronoun: str
) -> StorageTarget:
    """Return ``own`` (for ``None``, ``""`` or its name) or the copy called ``name``; else :class:`ValueError`:
    "<subject> not stored in <name>; <pronoun> in: <own> (<own_role>), <copy> (a copy)..."."""
    if name in (None, "", own.name):
        return own
    for copy in copies:
        if copy.name == name:
            return copy
    where = ", ".join([f"{own.name} ({own_role})", *(f"{c.name} (a copy)" for c in copies)])
    raise ValueError(f"{subject} not stored in {name!r}; {pronoun} in: {where}")


@dataclass(frozen=True)
class PitrPolicy:
    """Point-in-time recovery of one server: WAL archive plus base backups, and what was promised.

    The server's ``archive_command`` ships every WAL segment to the S3 target ``storage`` (with
    barman-cloud); pgdr takes a full base backup on ``full_schedule`` and, between two fulls,
    incremental ones on ``incremental_schedule``. Everything needed to recover to any moment of
    the last ``keep_window`` is kept; nothing older is, except the newest verified chain.
    """

    storage: StorageTarget
    keep_window: timedelta = timedelta(days=7)
    full_schedule: str = "@daily"
    incremental_schedule: str | None = "@hourly"
    rpo: timedelta = timedelta(minutes=5)  # the archive may lag the server by at most this
    archive_timeout: timedelta = timedelta(seconds=60)  # the server's setting: an idle server's RPO
    partial_grace: timedelta = timedelta(hours=6)  # an unfinished base backup older than this is a killed run's
    wal_compression: str = "zstd"  # how the archiver compresses each segment: one of WAL_COMPRESSIONS
    # Second copies (pgdr.physical.copies): S3 targets pgdr_copy copies the WAL archive and every base backup to.
    # A segment or base backup not there copy_rpo after it was stored fails the health check copy_lag.<target>.
    copies: tuple[StorageTarget, ...] = ()
    copy_rpo: timedelta = timedelta(hours=1)

    def storage_named(self, name: str | None) -> StorageTarget:
        """Return the target a recovery reads from: the archive's own (``None`` or its name) or one of ``copies``;
        :class:`ValueError` saying which exist for another name."""
        return _own_or_copy(
            name, self.storage, "its archive", self.copies, "the WAL archive and base backups are", "they are"
        )


@dataclass(frozen=True)
class ServerRestoreTarget:
    """Where a whole-server recovery from the ``pgdr_restore`` form runs: a worker on the new database host."""

    queue: str  # the Celery queue a worker on that host serves (airflow celery worker --queues <queue>)
    data_dir: str  # the new data directory on that host (empty or missing)
    port: int | None = None  # the port the recovered server listens on (default: the lost server's own)
    os_user: str | None = None  # the account the server runs as, when the worker runs as root


@dataclass(frozen=True)
class ProtectedServer:
    """A PostgreSQL server (cluster) under point-in-time recovery: every database on it is covered."""

    name: str  # a database's ``server`` (its conn_id unless given): in storage keys and the archive
    conn_id: str  # the connection base backups use: a role with REPLICATION
    pitr: PitrPolicy
    databases: tuple[str, ...]  # the plan's databases on this server
    notify: Notifications = field(default_factory=Notifications)
    line: int = 0
    restore: ServerRestoreTarget | None = None  # a whole-server recovery from the form runs there
    # A hot standby of the server to take base backups from (pgdr.physical.basebackup), so the primary's disk reads
    # nothing for them; the WAL archive stays the primary's. Used as a database's source_conn_id is (pgdr.logical.
    # standby): one lagging more than max_standby_lag is not used, on_standby_lag says what then.
    source_conn_id: str | None = None
    max_standby_lag: timedelta = timedelta(minutes=5)
    on_standby_lag: str = "primary"
    # How recover-server (and the form's mode server) proves the server before it is handed over: "quick" (every page
    # checked, not every row looked up in every index) or "thorough" (as pgdr_verify_pitr proves each chain)
    recovery_proof: str = "quick"


@dataclass(frozen=True)
class DRPlan:
    """The whole plan, validated."""

    path: Path
    backup_schedule: str | None  # None: backups are triggered from outside (no schedule)
    max_dumps_per_server: int
    retries: int
    retry_delay: timedelta
    databases: tuple[ProtectedDatabase, ...]
    storages: dict[str, StorageTarget] = field(default_factory=dict)
    notify: Notifications = field(default_factory=Notifications)  # the plan-wide default
    default_storage: StorageTarget | None = None  # where plan-wide state (alerts, reports) lives
    drill: DrillPolicy = field(default_factory=DrillPolicy)
    health: HealthPolicy = field(default_factory=HealthPolicy)
    servers: tuple[ProtectedServer, ...] = ()  # the servers under point-in-time recovery
    evidence: EvidencePolicy | None = None  # the evidence log; None: no receipts are written

    @property
    def database_names(self) -> list[str]:
        """Return the names of the protected databases, in plan order."""
        return [db.name for db in self.databases]

    def notifications_for(self, name: str | None) -> Notifications:
        """Return who to tell about ``name`` (a database), or the plan's default."""
        for db in self.databases:
            if db.name == name:
                return db.notify
        return self.notify

    @property
    def server_names(self) -> list[str]:
        """Return the names of the servers under point-in-time recovery, in plan order."""
        return [server.name for server in self.servers]

    def server(self, name: str) -> ProtectedServer:
        """Return the PITR server called ``name`` or raise :class:`PlanError` listing the known ones."""
        for server in self.servers:
            if server.name == name:
                return server
        raise PlanError(
            f"Server {name!r} has no point-in-time recovery in the DR plan {self.path}. Servers with PITR: "
            f"{', '.join(self.server_names) or 'none (add a servers: section)'}."
        )

    def pitr_server_of(self, database: str) -> ProtectedServer | None:
        """Return the PITR server that holds ``database``, or ``None`` when it has logical backups only."""
        for server in self.servers:
            if database in server.databases:
                return server
        return None

    def database(self, name: str) -> ProtectedDatabase:
        """Return the database called ``name`` or raise :class:`PlanError` listing the known ones."""
        for db in self.databases:
            if db.name == name:
                return db
        raise PlanError(
            f"Database {name!r} is not in the DR plan {self.path}. The plan protects: "
            f"{', '.join(self.database_names) or 'nothing'}."
        )


# ------------------------------------------------------------------------------------------------
# Validation. The plan is composed into YAML nodes (which carry line numbers), then each node is
# checked against the field specs below.
# ------------------------------------------------------------------------------------------------


class _Checker:
    """Validate YAML nodes of one plan file and build error messages that point at them."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, node: yaml.Node | None, key: str, problem: str) -> PlanError:
        line = f", line {node.start_mark.line + 1}" if node is not None else ""
        return PlanError(f"{self.path}{line}: {key}: {problem}")

    def mapping(self, node: yaml.Node, key: str, allowed: set[str]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, key, f"expected a mapping of keys ({', '.join(sorted(allowed))}), got {_kind(node)}")
        result: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            name = key_node.value
            if name not in allowed:
                close = _closest(name, allowed)
                hint = f" Did you mean {close!r}?" if close else ""
                raise self.fail(
                    key_node,
                    f"{key}.{name}" if key else name,
                    f"unknown key.{hint} Allowed here: {', '.join(sorted(allowed))}.",
                )
            if name in result:
                raise self.fail(key_node, f"{key}.{name}" if key else name, "given twice")
            result[name] = (key_node, value_node)
        return result

    def scalar(self, node: yaml.Node, key: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, key, f"expected a single value, got {_kind(node)}")
        return yaml.safe_load(yaml.serialize(node))

    def string(self, node: yaml.Node, key: str, pattern: re.Pattern | None = None, what: str = "") -> str:
        value = self.scalar(node, key)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(node, key, f"expected {what or 'a non-empty string'}, got {value!r}")
        if pattern is not None and not pattern.match(value):
            raise self.fail(node, key, f"expected {what}, got {value!r}")
        return value

    def integer(self, node: yaml.Node, key: str, minimum: int = 0) -> int:
        value = self.scalar(node, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(node, key, f"expected a whole number of at least {minimum}, got {value!r}")
        return value

    def duration(self, node: yaml.Node, key: str) -> timedelta:
        value = self.scalar(node, key)
        parsed = _duration(value)
        if parsed is None:
            raise self.fail(node, key, f"{_DURATION_EXPECTED}, got {value!r}")
        return parsed

    def string_list(self, node: yaml.Node, key: str) -> tuple[str, ...]:
        if isinstance(node, yaml.ScalarNode):
            return (self.string(node, key),)
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, key, f"expected a list of strings, got {_kind(node)}")
        return tuple(self.string(item, f"{key}[{i}]") for i, item in enumerate(node.value))


# What a restored copy may go without (pgdr.logical.privileges.SKIPPABLE says which entries each is).
SKIPPABLE_OBJECTS = ("event_triggers", "publications", "subscriptions")


def _skip_objects(c, fields, key: str) -> tuple[str, ...]:
    """Read a database's ``skip_objects``: kinds of objects its restored copies go without."""
    if "skip_objects" not in fields:
        return ()
    node = fields["skip_objects"][1]
    kinds = c.string_list(node, f"{key}.skip_objects")
    for kind in kinds:
        if kind not in SKIPPABLE_OBJECTS:
            raise c.fail(
                node,
                f"{key}.skip_objects",
                f"{kind!r} is not a kind pgdr can skip; choose from {', '.join(SKIPPABLE_OBJECTS)}",
            )
    return kinds


_COMPRESSION_LEVELS = {"gzip": (1, 9), "lz4": (1, 12), "zstd": (1, 22)}
_COMPRESSION_EXPECTED = (
    "expected pg_dump's compression: gzip, lz4 or zstd with an optional level (gzip:1 to gzip:9, lz4:1 to lz4:12, "
    "zstd:1 to zstd:22), or none"
)


def compression_spec(value: Any) -> str | None:
    """Return ``value`` as a normalised ``pg_dump --compress`` spec (``gzip:1``, ``none``), else ``None``.

    pg_dump compresses each file of a directory-format dump itself, in its parallel workers, and
    ``pg_restore`` reads the files as they are; pgdr stores them unchanged. ``gzip`` works with
    every build of the client tools; ``lz4`` and ``zstd`` need a client built with them, on every
    worker that backs up or restores (an error says so at the first backup otherwise).
    """
    if value is False or value == 0 or (isinstance(value, str) and value.strip().lower() in ("none", "0")):
        return "none"
    if not isinstance(value, str):
        return None
    method, _, level = value.strip().lower().partition(":")
    if method not in _COMPRESSION_LEVELS:
        return None
    if not level:
        return method
    low, high = _COMPRESSION_LEVELS[method]
    if not level.isdigit() or not low <= int(level) <= high:
        return None
    return f"{method}:{int(level)}"


_DURATION_EXPECTED = "expected a duration such as 90s, 30m, 1h, 2d or 1w (or a number of seconds)"


def _duration(value: Any) -> timedelta | None:
    """Return the positive duration ``value`` stands for (``30m``, ``1h``, or seconds), else ``None``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return timedelta(seconds=value) if value > 0 else None
    match = _DURATION.match(value) if isinstance(value, str) else None
    if not match or float(match.group(1)) <= 0:
        return None
    return timedelta(seconds=float(match.group(1)) * _DURATION_UNITS[match.group(2)])


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"the value {node.value!r}"


def _closest(word: str, choices: set[str]) -> str | None:
    import difflib

    # A transposed or repeated letter (rop for rpo) is the commonest typo: prefer an anagram.
    anagrams = [choice for choice in sorted(choices) if sorted(choice) == sorted(word)]
    if anagrams:
        return anagrams[0]
    matches = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


_TOP_KEYS = {"version", "backup", "defaults", "storage", "databases", "drill", "health", "servers", "evidence"}
_EVIDENCE_KEYS = {"storage", "key_conn_id", "keep"}
_SERVER_KEYS = {"conn_id", "pitr", "restore", "source_conn_id", "max_standby_lag", "on_standby_lag", "recovery_proof"}
# How a whole-server recovery proves the server before handing it over (pgdr.physical.proof.RECOVERY_PROOFS)
RECOVERY_PROOF_LEVELS = ("quick", "thorough")
_SERVER_RESTORE_KEYS = {"queue", "data_dir", "port", "os_user"}
_QUEUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_OS_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_PITR_KEYS = {
    "storage",
    "keep_window",
    "full_schedule",
    "incremental_schedule",
    "rpo",
    "archive_timeout",
    "partial_grace",
    "wal_compression",
    "copies",
    "copy_rpo",
}
# pitr.wal_compression: barman-cloud-wal-archive's --<name> options that pgdr reads back (pgdr.physical.archive). lz4
# and zstd need the lz4 and zstandard modules in the archiver's venv (make archiver installs them); not snappy.
# zstd, the default, measured the fastest, storing less than gzip (bench/wal_codecs.py: archive_mb_s, _stored_ratio).
WAL_COMPRESSIONS = ("gzip", "lz4", "zstd", "bzip2", "xz")
_DRILL_KEYS = {"schedule", "max_duration"}
_HEALTH_KEYS = {"schedule", "verify_window", "min_free_gb"}
_BACKUP_KEYS = {"schedule", "max_dumps_per_server", "retries", "retry_delay"}
_POLICY_KEYS = {
    "rpo",
    "rto",
    "retention",
    "storage",
    "notify",
    "dump_jobs",
    "lock_wait_timeout",
    "yield_after",
    "max_standby_lag",
    "on_standby_lag",
    "compression",
    "restore_conn_id",
    "restore_as_superuser",
    "encryption",
    "copies",
    "copy_rpo",
    "verify_copies_every",
}
_DATABASE_KEYS = _POLICY_KEYS | {
    "name",
    "conn_id",
    "dbname",
    "verify_conn_id",
    "source_conn_id",
    "server",
    "app_roles",
    "skip_objects",
}
_RETENTION_KEYS = {"keep_last", "keep_days", "partial_grace"}
_NOTIFY_KEYS = {"slack_conn_id", "smtp_conn_id", "email_to", "email_from"}
_STORAGE_KEYS = {"type", "path", "bucket", "prefix", "aws_conn_id", "sse", "kms_key_id", "object_lock", "prune_conn_id"}
_OBJECT_LOCK_KEYS = {"mode", "days"}
_ENCRYPTION_KEYS = {"key_conn_id"}
SSE_KINDS = ("AES256", "aws:kms")


def _parse_retention(c: _Checker, node: yaml.Node, key: str, base: RetentionPolicy) -> RetentionPolicy:
    fields = c.mapping(node, key, _RETENTION_KEYS)
    values = {}
    if "keep_last" in fields:
        values["keep_last"] = c.integer(fields["keep_last"][1], f"{key}.keep_last", minimum=1)
    if "keep_days" in fields:
        values["keep_days"] = c.integer(fields["keep_days"][1], f"{key}.keep_days", minimum=0)
    if "partial_grace" in fields:
        values["partial_grace"] = c.duration(fields["partial_grace"][1], f"{key}.partial_grace")
    return RetentionPolicy(**{**base.__dict__, **values})


def _parse_notify(c: _Checker, node: yaml.Node, key: str, base: Notifications) -> Notifications:
    fields = c.mapping(node, key, _NOTIFY_KEYS)
    values: dict[str, Any] = {}
    for conn_key in ("slack_conn_id", "smtp_conn_id"):
        if conn_key in fields:
            values[conn_key] = c.string(fields[conn_key][1], f"{key}.{conn_key}", _CONN_ID, "an Airflow connection id")
    if "email_to" in fields:
        values["email_to"] = c.string_list(fields["email_to"][1], f"{key}.email_to")
    if "email_from" in fields:
        values["email_from"] = c.string(fields["email_from"][1], f"{key}.email_from")
    return Notifications(**{**base.__dict__, **values})


def _parse_storage(c: _Checker, name: str, node: yaml.Node, plan_dir: Path) -> StorageTarget:
    key = f"storage.{name}"
    fields = c.mapping(node, key, _STORAGE_KEYS)
    if "type" not in fields:
        raise c.fail(node, f"{key}.type", "missing; expected 'local' or 's3'")
    kind = c.string(fields["type"][1], f"{key}.type")
    if kind not in ("local", "s3"):
        raise c.fail(fields["type"][1], f"{key}.type", f"expected 'local' or 's3', got {kind!r}")
    required = {"local": ("path",), "s3": ("bucket", "aws_conn_id")}[kind]
    for needed in required:
        if needed not in fields:
            raise c.fail(node, f"{key}.{needed}", f"missing; a {kind} storage target needs {' and '.join(required)}")
    unexpected = {
        "local": {"bucket", "aws_conn_id", "prefix", "sse", "kms_key_id", "object_lock", "prune_conn_id"},
        "s3": {"path"},
    }[kind] & fields.keys()
    if unexpected:
        extra = sorted(unexpected)[0]
        hint = {
            "sse": " (a folder has no server-side encryption: encrypt the backups themselves with 'encryption: "
            "{key_conn_id: ...}' under defaults)",
            "object_lock": " (a folder cannot refuse a delete: immutable copies need an S3 bucket with Object Lock; "
            "add one as a copy target with 'copies')",
        }.get("sse" if extra == "kms_key_id" else extra, "")
        raise c.fail(fields[extra][0], f"{key}.{extra}", f"not used by a {kind} storage target; remove it{hint}")
    if kind == "local":
        raw = Path(os.path.expandvars(c.string(fields["path"][1], f"{key}.path")))
        return StorageTarget(name=name, kind="local", path=(plan_dir / raw).resolve())
    prefix = c.string(fields["prefix"][1], f"{key}.prefix").strip("/") if "prefix" in fields else ""
    sse = c.string(fields["sse"][1], f"{key}.sse") if "sse" in fields else None
    if sse is not None and sse not in SSE_KINDS:
        raise c.fail(fields["sse"][1], f"{key}.sse", f"expected AES256 (SSE-S3) or aws:kms (SSE-KMS), got {sse!r}")
    kms_key_id = c.string(fields["kms_key_id"][1], f"{key}.kms_key_id") if "kms_key_id" in fields else None
    if kms_key_id is not None and sse != "aws:kms":
        raise c.fail(
            fields["kms_key_id"][1], f"{key}.kms_key_id", "only used with 'sse: aws:kms'; add it, or remove kms_key_id"
        )
    return StorageTarget(
        name=name,
        kind="s3",
        bucket=c.string(fields["bucket"][1], f"{key}.bucket"),
        prefix=prefix,
        aws_conn_id=c.string(fields["aws_conn_id"][1], f"{key}.aws_conn_id", _CONN_ID, "an Airflow connection id"),
        sse=sse,
        kms_key_id=kms_key_id,
        object_lock=_parse_object_lock(c, fields["object_lock"][1], f"{key}.object_lock")
        if "object_lock" in fields
        else None,
        prune_conn_id=c.string(fields["prune_conn_id"][1], f"{key}.prune_conn_id", _CONN_ID, "an Airflow connection id")
        if "prune_conn_id" in fields
        else None,
    )


def _parse_object_lock(c: _Checker, node: yaml.Node, key: str) -> ObjectLock:
    """``object_lock: {mode: governance|compliance, days: N}``: the retention every object is written with."""
    fields = c.mapping(node, key, _OBJECT_LOCK_KEYS)
    for needed in ("mode", "days"):
        if needed not in fields:
            raise c.fail(
                node, f"{key}.{needed}", "missing; Object Lock needs a mode (governance or compliance) and days"
            )
    mode = c.string(fields["mode"][1], f"{key}.mode")
    if mode not in LOCK_MODES:
        raise c.fail(
            fields["mode"][1],
            f"{key}.mode",
            f"expected governance (a principal with s3:BypassGovernanceRetention may still delete) or compliance (no "
            f"one may, not even the account's root, until the date), got {mode!r}",
        )
    return ObjectLock(mode=mode, days=c.integer(fields["days"][1], f"{key}.days", minimum=1))


@dataclass
class _Policy:
    rpo: timedelta = timedelta(hours=1)
    rto: timedelta = timedelta(minutes=30)
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    storage: str | None = None
    notify: Notifications = field(default_factory=Notifications)
    dump_jobs: int = 2
    lock_wait_timeout: timedelta = timedelta(seconds=30)
    yield_after: timedelta | None = None
    max_standby_lag: timedelta = timedelta(minutes=5)
    on_standby_lag: str = "primary"
    compression: str = DEFAULT_COMPRESSION
    restore_conn_id: str | None = None
    restore_as_superuser: bool = False
    encryption_key_conn_id: str | None = None
    copies: tuple[str, ...] = ()
    copy_rpo: timedelta = timedelta(hours=1)
    verify_copies_every: timedelta = timedelta(days=7)


def _parse_policy(c: _Checker, fields: dict, key: str, base: _Policy, storages: dict[str, StorageTarget]) -> _Policy:
    policy = _Policy(**base.__dict__)
    if "rpo" in fields:
        policy.rpo = c.duration(fields["rpo"][1], f"{key}.rpo")
    if "rto" in fields:
        policy.rto = c.duration(fields["rto"][1], f"{key}.rto")
    if "retention" in fields:
        policy.retention = _parse_retention(c, fields["retention"][1], f"{key}.retention", base.retention)
    if "notify" in fields:
        policy.notify = _parse_notify(c, fields["notify"][1], f"{key}.notify", base.notify)
    if "dump_jobs" in fields:
        policy.dump_jobs = c.integer(fields["dump_jobs"][1], f"{key}.dump_jobs", minimum=1)
    if "lock_wait_timeout" in fields:
        node = fields["lock_wait_timeout"][1]
        policy.lock_wait_timeout = c.duration(node, f"{key}.lock_wait_timeout")
        if not timedelta(seconds=1) <= policy.lock_wait_timeout <= timedelta(hours=1):
            raise c.fail(
                node,
                f"{key}.lock_wait_timeout",
                "expected between 1s and 1h (how long a backup may wait for a table's lock, holding up whatever "
                f"queues behind it), got {c.scalar(node, f'{key}.lock_wait_timeout')!r}",
            )
    if "yield_after" in fields:
        node = fields["yield_after"][1]
        policy.yield_after = c.duration(node, f"{key}.yield_after")  # whole seconds, at least 1
    if "max_standby_lag" in fields:
        policy.max_standby_lag = c.duration(fields["max_standby_lag"][1], f"{key}.max_standby_lag")
    if "on_standby_lag" in fields:
        node = fields["on_standby_lag"][1]
        value = c.scalar(node, f"{key}.on_standby_lag")
        if value not in ("primary", "fail"):
            raise c.fail(
                node,
                f"{key}.on_standby_lag",
                "expected primary (back up from the primary, with a warning, when the standby lags more than "
                f"max_standby_lag) or fail (fail the backup), got {value!r}",
            )
        policy.on_standby_lag = value
    if "compression" in fields:
        node = fields["compression"][1]
        value = c.scalar(node, f"{key}.compression")
        spec = compression_spec(value)
        if spec is None:
            raise c.fail(node, f"{key}.compression", f"{_COMPRESSION_EXPECTED}, got {value!r}")
        policy.compression = spec
    if "restore_conn_id" in fields:
        policy.restore_conn_id = c.string(
            fields["restore_conn_id"][1], f"{key}.restore_conn_id", _CONN_ID, "an Airflow connection id"
        )
    if "restore_as_superuser" in fields:
        value = c.scalar(fields["restore_as_superuser"][1], f"{key}.restore_as_superuser")
        if not isinstance(value, bool):
            raise c.fail(
                fields["restore_as_superuser"][1],
                f"{key}.restore_as_superuser",
                f"expected true or false, got {value!r}",
            )
        policy.restore_as_superuser = value
    if "encryption" in fields:
        node = fields["encryption"][1]
        if isinstance(node, yaml.ScalarNode) and node.value in ("none", "off", "false"):
            policy.encryption_key_conn_id = None  # a database that opts out of the defaults' encryption
        else:
            enc = c.mapping(node, f"{key}.encryption", _ENCRYPTION_KEYS)
            if "key_conn_id" not in enc:
                raise c.fail(
                    node,
                    f"{key}.encryption.key_conn_id",
                    "missing; name the Airflow connection that holds the master key",
                )
            policy.encryption_key_conn_id = c.string(
                enc["key_conn_id"][1], f"{key}.encryption.key_conn_id", _CONN_ID, "an Airflow connection id"
            )
    if "copies" in fields:
        node = fields["copies"][1]
        names = c.string_list(node, f"{key}.copies")
        for name in names:
            if name not in storages:
                known = ", ".join(sorted(storages)) or "none (add a top-level 'storage:' section)"
                raise c.fail(node, f"{key}.copies", f"no storage target named {name!r}; defined: {known}")
        if len(set(names)) != len(names):
            raise c.fail(node, f"{key}.copies", "a storage target is named twice; name each copy once")
        policy.copies = tuple(names)
    if "copy_rpo" in fields:
        policy.copy_rpo = c.duration(fields["copy_rpo"][1], f"{key}.copy_rpo")
    if "verify_copies_every" in fields:
        policy.verify_copies_every = c.duration(fields["verify_copies_every"][1], f"{key}.verify_copies_every")
    if "storage" in fields:
        name = c.string(fields["storage"][1], f"{key}.storage")
        if name not in storages:
            known = ", ".join(sorted(storages)) or "none (add a top-level 'storage:' section)"
            raise c.fail(fields["storage"][1], f"{key}.storage", f"no storage target named {name!r}; defined: {known}")
        policy.storage = name
    return policy


def parse_plan(text: str, path: Path) -> DRPlan:
    """Validate the YAML ``text`` of the plan file at ``path`` and return the :class:`DRPlan`.

    :raises PlanError: naming the file, line and key of the first problem found.
    """
    c = _Checker(path)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise PlanError(f"{path}{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if root is None:
        raise PlanError(f"{path}: the plan is empty; see include/pgdr.yaml in the pgdr repository for an example")
    top = c.mapping(root, "", _TOP_KEYS)

    if "version" in top and c.scalar(top["version"][1], "version") != 1:
        raise c.fail(top["version"][1], "version", "this pgdr understands plan version 1 only")

    schedule, max_dumps, retries, retry_delay = "@daily", 2, 3, timedelta(minutes=1)
    if "backup" in top:
        backup = c.mapping(top["backup"][1], "backup", _BACKUP_KEYS)
        if "schedule" in backup:
            node = backup["schedule"][1]
            schedule = (
                None
                if c.scalar(node, "backup.schedule") is None
                else c.string(
                    node,
                    "backup.schedule",
                    what="a cron expression or preset such as @hourly (or null: triggered from outside)",
                )
            )
        if "max_dumps_per_server" in backup:
            max_dumps = c.integer(backup["max_dumps_per_server"][1], "backup.max_dumps_per_server", minimum=1)
        if "retries" in backup:
            retries = c.integer(backup["retries"][1], "backup.retries", minimum=0)
        if "retry_delay" in backup:
            retry_delay = c.duration(backup["retry_delay"][1], "backup.retry_delay")

    drill = DrillPolicy()
    if "drill" in top:
        fields = c.mapping(top["drill"][1], "drill", _DRILL_KEYS)
        drill = DrillPolicy(
            schedule=c.string(fields["schedule"][1], "drill.schedule", what="a cron expression or preset")
            if "schedule" in fields
            else drill.schedule,
            max_duration=c.duration(fields["max_duration"][1], "drill.max_duration")
            if "max_duration" in fields
            else drill.max_duration,
        )
    health = HealthPolicy()
    if "health" in top:
        fields = c.mapping(top["health"][1], "health", _HEALTH_KEYS)
        min_free = health.min_free_gb
        if "min_free_gb" in fields:
            min_free = c.scalar(fields["min_free_gb"][1], "health.min_free_gb")
            if isinstance(min_free, bool) or not isinstance(min_free, (int, float)) or min_free < 0:
                raise c.fail(
                    fields["min_free_gb"][1], "health.min_free_gb", f"expected a number of gigabytes, got {min_free!r}"
                )
        health = HealthPolicy(
            schedule=c.string(fields["schedule"][1], "health.schedule", what="a cron expression or preset")
            if "schedule" in fields
            else health.schedule,
            verify_window=c.duration(fields["verify_window"][1], "health.verify_window")
            if "verify_window" in fields
            else health.verify_window,
            min_free_gb=float(min_free),
        )

    storages: dict[str, StorageTarget] = {}
    if "storage" in top:
        storage_node = top["storage"][1]
        if not isinstance(storage_node, yaml.MappingNode):
            raise c.fail(
                storage_node, "storage", f"expected a mapping of target names to targets, got {_kind(storage_node)}"
            )
        for name_node, target_node in storage_node.value:
            storages[name_node.value] = _parse_storage(c, name_node.value, target_node, path.parent)
        _check_storage_overlap(c, storage_node, storages)

    defaults = _Policy(storage=next(iter(storages), None))
    if "defaults" in top:
        defaults = _parse_policy(
            c, c.mapping(top["defaults"][1], "defaults", _POLICY_KEYS), "defaults", defaults, storages
        )

    if "databases" not in top:
        raise c.fail(root, "databases", "missing; list the databases to protect, each with a name and a conn_id")
    db_nodes = top["databases"][1]
    if not isinstance(db_nodes, yaml.SequenceNode) or not db_nodes.value:
        raise c.fail(db_nodes, "databases", "expected a non-empty list of databases")

    databases: list[ProtectedDatabase] = []
    for index, node in enumerate(db_nodes.value):
        key = f"databases[{index}]"
        if isinstance(node, yaml.MappingNode):  # name the database in every message about it
            named = [v.value for k, v in node.value if k.value == "name" and isinstance(v, yaml.ScalarNode)]
            key += f" ({named[0]})" if named else ""
        fields = c.mapping(node, key, _DATABASE_KEYS)
        for needed in ("name", "conn_id"):
            if needed not in fields:
                raise c.fail(node, f"{key}.{needed}", "missing; every database needs a name and a conn_id")
        name = c.string(
            fields["name"][1], f"{key}.name", _IDENTIFIER, "a lower-case name of letters, digits and _ (at most 63)"
        )
        if name in (db.name for db in databases):
            raise c.fail(fields["name"][1], f"{key}.name", "the same name is given to two databases")
        if name in RESERVED_NAMES:
            raise c.fail(
                fields["name"][1],
                f"{key}.name",
                f"{name!r} is where pgdr keeps its own {RESERVED_NAMES[name]} in the storage target, so its backups "
                "would mix with them; give the database another name (its dbname on the server can stay)",
            )
        conn_id = c.string(fields["conn_id"][1], f"{key}.conn_id", _CONN_ID, "an Airflow connection id")
        policy = _parse_policy(c, fields, key, defaults, storages)
        if policy.storage is None:
            raise c.fail(node, f"{key}.storage", "no storage target: add a top-level 'storage:' section")
        for copy in policy.copies:
            if _location(storages[copy]) == _location(storages[policy.storage]):
                raise c.fail(
                    fields["copies"][1] if "copies" in fields else node,
                    f"{key}.copies",
                    f"{copy!r} is the database's own storage location ({storages[copy].describe()}), so it would be "
                    "no second copy; name a target in another bucket (better: another region or account)",
                )
        databases.append(
            ProtectedDatabase(
                name=name,
                conn_id=conn_id,
                dbname=c.string(fields["dbname"][1], f"{key}.dbname") if "dbname" in fields else name,
                rpo=policy.rpo,
                rto=policy.rto,
                retention=policy.retention,
                storage=storages[policy.storage],
                notify=policy.notify,
                dump_jobs=policy.dump_jobs,
                lock_wait_timeout=policy.lock_wait_timeout,
                yield_after=policy.yield_after,
                source_conn_id=(
                    c.string(fields["source_conn_id"][1], f"{key}.source_conn_id", _CONN_ID, "an Airflow connection id")
                    if "source_conn_id" in fields
                    else None
                ),
                max_standby_lag=policy.max_standby_lag,
                on_standby_lag=policy.on_standby_lag,
                compression=policy.compression,
                restore_conn_id=policy.restore_conn_id,
                restore_as_superuser=policy.restore_as_superuser,
                encryption_key_conn_id=policy.encryption_key_conn_id,
                copies=tuple(storages[name] for name in policy.copies),
                copy_rpo=policy.copy_rpo,
                verify_copies_every=policy.verify_copies_every,
                verify_conn_id=(
                    c.string(fields["verify_conn_id"][1], f"{key}.verify_conn_id", _CONN_ID, "an Airflow connection id")
                    if "verify_conn_id" in fields
                    else conn_id
                ),
                server=c.string(fields["server"][1], f"{key}.server") if "server" in fields else conn_id,
                app_roles=c.string_list(fields["app_roles"][1], f"{key}.app_roles") if "app_roles" in fields else (),
                skip_objects=_skip_objects(c, fields, key),
                line=node.start_mark.line + 1,
            )
        )
    servers = _parse_servers(c, top["servers"][1], storages, databases) if "servers" in top else ()
    return DRPlan(
        path=path,
        backup_schedule=schedule,
        max_dumps_per_server=max_dumps,
        retries=retries,
        retry_delay=retry_delay,
        databases=tuple(databases),
        storages=storages,
        notify=defaults.notify,
        default_storage=storages.get(defaults.storage) if defaults.storage else None,
        drill=drill,
        health=health,
        servers=servers,
        evidence=_parse_evidence(c, top["evidence"][1], storages) if "evidence" in top else None,
    )


def _parse_evidence(c: _Checker, node: yaml.Node, storages: dict[str, StorageTarget]) -> EvidencePolicy:
    fields = c.mapping(node, "evidence", _EVIDENCE_KEYS)
    for required, why in (
        ("storage", "name the storage target the receipts are kept on (Object Lock there keeps them immutable)"),
        ("key_conn_id", "name the Airflow connection of the key that signs the receipts (python -m pgdr keygen)"),
    ):
        if required not in fields:
            raise c.fail(node, f"evidence.{required}", f"missing; {why}")
    name = c.string(fields["storage"][1], "evidence.storage")
    if name not in storages:
        defined = ", ".join(sorted(storages)) or "none (add a top-level 'storage:' section)"
        raise c.fail(fields["storage"][1], "evidence.storage", f"no storage target named {name!r}; defined: {defined}")
    key_conn_id = c.string(fields["key_conn_id"][1], "evidence.key_conn_id", _CONN_ID, "an Airflow connection id")
    keep = c.duration(fields["keep"][1], "evidence.keep") if "keep" in fields else EvidencePolicy.keep
    return EvidencePolicy(storage=storages[name], key_conn_id=key_conn_id, keep=keep)


def _parse_servers(
    c: _Checker, node: yaml.Node, storages: dict[str, StorageTarget], databases: list[ProtectedDatabase]
) -> tuple[ProtectedServer, ...]:
    """Validate the ``servers:`` section: point-in-time recovery per server (cluster)."""
    if not isinstance(node, yaml.MappingNode):
        raise c.fail(node, "servers", f"expected a mapping of server names to their settings, got {_kind(node)}")
    known = sorted({db.server for db in databases})
    servers = []
    for name_node, server_node in node.value:
        name = name_node.value
        key = f"servers.{name}"
        on_server = tuple(db.name for db in databases if db.server == name)
        if not on_server:
            raise c.fail(
                name_node,
                key,
                f"no database of the plan is on a server called {name!r}. A server is named by its databases' "
                f"'server:' (their conn_id unless given): {', '.join(known)}",
            )
        if not _CONN_ID.match(name):
            raise c.fail(name_node, key, "a server name used for PITR may hold only letters, digits, '.', '_' and '-'")
        fields = c.mapping(server_node, key, _SERVER_KEYS)
        first = next(db for db in databases if db.server == name)
        conn_id = (
            c.string(fields["conn_id"][1], f"{key}.conn_id", _CONN_ID, "an Airflow connection id")
            if "conn_id" in fields
            else first.conn_id
        )
        if "pitr" not in fields:
            raise c.fail(
                server_node,
                f"{key}.pitr",
                "missing; say where the WAL archive and base backups go (pitr: {storage: ...})",
            )
        standby = _parse_policy(
            c,
            {k: v for k, v in fields.items() if k in ("max_standby_lag", "on_standby_lag")},
            key,
            _Policy(max_standby_lag=first.max_standby_lag, on_standby_lag=first.on_standby_lag),
            storages,
        )
        servers.append(
            ProtectedServer(
                name=name,
                conn_id=conn_id,
                pitr=_parse_pitr(c, fields["pitr"][1], f"{key}.pitr", storages),
                databases=on_server,
                notify=first.notify,
                line=name_node.start_mark.line + 1,
                restore=_parse_server_restore(c, fields["restore"][1], f"{key}.restore")
                if "restore" in fields
                else None,
                source_conn_id=c.string(
                    fields["source_conn_id"][1], f"{key}.source_conn_id", _CONN_ID, "an Airflow connection id"
                )
                if "source_conn_id" in fields
                else None,
                max_standby_lag=standby.max_standby_lag,
                on_standby_lag=standby.on_standby_lag,
                recovery_proof=_parse_recovery_proof(c, fields["recovery_proof"][1], f"{key}.recovery_proof")
                if "recovery_proof" in fields
                else "quick",
            )
        )
    return tuple(servers)


def _parse_recovery_proof(c: _Checker, node: yaml.Node, key: str) -> str:
    value = c.scalar(node, key)
    if value not in RECOVERY_PROOF_LEVELS:
        raise c.fail(
            node,
            key,
            "expected quick (pg_amcheck of every page, unique keys, counts, sequences, your suites) or thorough "
            "(also every row looked up in every index, and pgdr's baseline expectations: slower by about 4 s per GB "
            f"on two cores); got {value!r}",
        )
    return value


def _parse_server_restore(c: _Checker, node: yaml.Node, key: str) -> ServerRestoreTarget:
    """Validate ``servers.<name>.restore``: the queue of a worker on the new host, and the data directory there."""
    fields = c.mapping(node, key, _SERVER_RESTORE_KEYS)
    for needed in ("queue", "data_dir"):
        if needed not in fields:
            raise c.fail(
                node,
                f"{key}.{needed}",
                "missing; a whole-server recovery from the form needs the Celery queue of a worker on the new database "
                "host (queue) and the data directory there (data_dir)",
            )
    data_dir = c.string(fields["data_dir"][1], f"{key}.data_dir")
    if not data_dir.startswith("/") or "\x00" in data_dir:
        raise c.fail(fields["data_dir"][1], f"{key}.data_dir", f"must be an absolute path; got {data_dir!r}")
    port = c.integer(fields["port"][1], f"{key}.port", minimum=1) if "port" in fields else None
    if port is not None and port > 65535:
        raise c.fail(fields["port"][1], f"{key}.port", f"must be a TCP port (1-65535); got {port}")
    return ServerRestoreTarget(
        queue=c.string(fields["queue"][1], f"{key}.queue", _QUEUE, "a Celery queue name (letters, digits, ._-)"),
        data_dir=data_dir,
        port=port,
        os_user=c.string(fields["os_user"][1], f"{key}.os_user", _OS_USER, "an OS account name")
        if "os_user" in fields
        else None,
    )


def _parse_pitr(c: _Checker, node: yaml.Node, key: str, storages: dict[str, StorageTarget]) -> PitrPolicy:
    fields = c.mapping(node, key, _PITR_KEYS)
    if "storage" not in fields:
        raise c.fail(node, f"{key}.storage", "missing; name the S3 storage target of the WAL archive and base backups")
    storage_name = c.string(fields["storage"][1], f"{key}.storage")
    if storage_name not in storages:
        defined = ", ".join(sorted(storages)) or "none"
        raise c.fail(
            fields["storage"][1], f"{key}.storage", f"no storage target named {storage_name!r}; defined: {defined}"
        )
    storage = storages[storage_name]
    if storage.kind != "s3":
        raise c.fail(
            fields["storage"][1],
            f"{key}.storage",
            f"storage target {storage_name!r} is a local folder, but the WAL archiver (barman-cloud, run by the "
            "server's archive_command) writes only to S3-compatible storage. Name an s3 target (AWS, MinIO, or any "
            "endpoint set in the AWS connection's endpoint_url); `make demo` starts a local S3 endpoint for this",
        )
    values: dict[str, Any] = {"storage": storage}
    for duration_key in ("keep_window", "rpo", "archive_timeout", "partial_grace", "copy_rpo"):
        if duration_key in fields:
            values[duration_key] = c.duration(fields[duration_key][1], f"{key}.{duration_key}")
    if "wal_compression" in fields:
        node = fields["wal_compression"][1]
        value = c.scalar(node, f"{key}.wal_compression")
        if value not in WAL_COMPRESSIONS:
            raise c.fail(
                node,
                f"{key}.wal_compression",
                f"expected one of {', '.join(WAL_COMPRESSIONS)} (how barman-cloud-wal-archive compresses each WAL "
                f"segment; zstd, the default, is the fastest and stores less than gzip), got {value!r}",
            )
        values["wal_compression"] = value
    if "copies" in fields:
        values["copies"] = _parse_pitr_copies(c, fields["copies"][1], f"{key}.copies", storage, storages)
    if "full_schedule" in fields:
        values["full_schedule"] = c.string(
            fields["full_schedule"][1], f"{key}.full_schedule", what="a cron expression or preset"
        )
    if "incremental_schedule" in fields:
        inc = fields["incremental_schedule"][1]
        values["incremental_schedule"] = (
            None
            if c.scalar(inc, f"{key}.incremental_schedule") is None
            else c.string(
                inc, f"{key}.incremental_schedule", what="a cron expression or preset (or null: full base backups only)"
            )
        )
    return PitrPolicy(**values)


def _parse_pitr_copies(
    c: _Checker, node: yaml.Node, key: str, storage: StorageTarget, storages: dict[str, StorageTarget]
) -> tuple[StorageTarget, ...]:
    """The S3 targets a server's WAL archive and base backups are copied to: named once, none the archive's own."""
    names = c.string_list(node, key)
    if len(set(names)) != len(names):
        raise c.fail(node, key, "a storage target is named twice; name each copy once")
    copies = []
    for name in names:
        if name not in storages:
            raise c.fail(node, key, f"no storage target named {name!r}; defined: {', '.join(sorted(storages))}")
        target = storages[name]
        if target.kind != "s3":
            raise c.fail(
                node,
                key,
                f"storage target {name!r} is a local folder, but a recovery from a copy replays its WAL with "
                "barman-cloud-wal-restore, which reads only S3-compatible storage. Name an s3 target",
            )
        if _location(target) == _location(storage):
            raise c.fail(node, key, f"{name!r} is where the archive itself is ({target.describe()}): not a copy")
        copies.append(target)
    return tuple(copies)


def _location(t: StorageTarget) -> str:
    """Where a target keeps its objects, ending in ``/``: two targets with the same location are one."""
    return f"s3://{t.bucket}/{t.prefix}".rstrip("/") + "/" if t.kind == "s3" else str(t.path).rstrip("/") + "/"


def _check_storage_overlap(c: _Checker, storage_node: yaml.Node | None, storages: dict[str, StorageTarget]) -> None:
    """Refuse two storage targets where one lies inside the other's backups (their keys would collide)."""

    location = _location
    targets = sorted(storages.values(), key=lambda t: t.name)
    for outer in targets:
        for inner in targets:
            if (
                outer is not inner
                and location(inner).startswith(location(outer))
                and location(inner) != location(outer)
            ):
                raise c.fail(
                    storage_node,
                    f"storage.{inner.name}",
                    f"lies inside storage target {outer.name!r} ({outer.describe()}): pgdr would read its objects "
                    f"as {outer.name!r}'s and retention could delete them. Give each target a location of its own "
                    "(two targets may share one location)",
                )


_cache: dict[Path, tuple[float, DRPlan]] = {}


def plan_path() -> Path:
    """Return the plan file in force: ``$PGDR_PLAN`` or ``include/pgdr.yaml``."""
    return Path(os.environ.get(PLAN_ENV_VAR) or DEFAULT_PLAN_PATH).resolve()


def load_plan(path: Path | str | None = None) -> DRPlan:
    """Load and validate the DR plan; cached until the file changes.

    :param path: the plan file; defaults to :func:`plan_path`.
    :raises PlanError: if the file is missing or invalid.
    """
    path = Path(path).resolve() if path else plan_path()
    try:
        stat = path.stat()
        mtime = stat.st_mtime_ns
        if path in _cache and _cache[path][0] == mtime:
            return _cache[path][1]
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(
            f"The DR plan {path} does not exist. Create it (see include/pgdr.yaml) or point ${PLAN_ENV_VAR} at it."
        ) from None
    except OSError as err:
        raise PlanError(f"The DR plan {path} cannot be read: {err.strerror}") from None
    plan = parse_plan(text, path)
    _cache[path] = (mtime, plan)
    return plan


def parse_duration(text: str) -> timedelta:
    """Parse a duration such as ``30m`` or ``1h``, as the plan writes them.

    :raises PlanError: if ``text`` is not a duration.
    """
    parsed = _duration(text.strip())
    if parsed is None:
        raise PlanError(f"{_DURATION_EXPECTED}, got {text!r}")
    return parsed
