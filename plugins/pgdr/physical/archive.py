"""The WAL archive: what the server's ``archive_command`` shipped, read back by pgdr.

Continuous archiving is done by the database server itself: after each WAL segment fills (or
after ``archive_timeout`` on an idle server) PostgreSQL runs ``archive_command`` for it, and only
when that command succeeds may the segment be recycled. pgdr configures that command to be
barman-cloud's ``barman-cloud-wal-archive`` (the archiver CloudNativePG uses), writing to the
plan's S3 target under ``pitr-v1/wal/<server>/wals/`` (the requested segment and up to three more
that are ready, side by side: :meth:`WalArchive.archive_command`), and a recovering cluster fetches
segments back with ``barman-cloud-wal-restore`` as its ``restore_command``. pgdr never writes into that
layout itself; it lists it (which segments exist, where a gap is, what the newest recoverable
moment is) and removes segments no retained base backup needs.

A WAL segment name is ``TTTTTTTTXXXXXXXXYYYYYYYY``: the timeline, then the segment number split
in two halves (the "log" and the segment within it). Segment numbers are consecutive on one
timeline; a missing one is a gap that recovery cannot cross.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pgdr.errors import PermanentFailure, PgdrError
from pgdr.storage.backends import BackupStore, StoredObject
from pgdr.storage.layout import PhysicalLayout

ARCHIVER_BIN_ENV_VAR = "PGDR_ARCHIVER_BIN"
_PROJECT_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_ARCHIVER_BIN = _PROJECT_ROOT / ".pgdr" / "archiver" / "bin"
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
# barman-cloud-wal-restore --parallel: each fetch from the bucket brings the requested segment and the next ones of its
# folder into the recovery's spool, which the restore_command moves from without starting barman again (~0.3 s each).
WAL_PREFETCH = 8
# PostgreSQL runs archive_command for one segment at a time, and barman-cloud-wal-archive costs ~0.4 s whatever the
# segment holds (its Python start, imports and S3 session: bench/wal_codecs.py's archive_fixed_s). The archive_command
# therefore ships the requested segment and up to ARCHIVE_AHEAD - 1 more that are ready, side by side, and leaves a
# mark for each of those it shipped (in ARCHIVED_AHEAD, inside pg_wal: never in a base backup); when PostgreSQL asks
# for one of them, the mark is checked against the segment's bytes and the destination and the call ends at once.
ARCHIVE_AHEAD = 4
ARCHIVED_AHEAD = "pg_wal/pgdr-archived-ahead"
# In a recovery's spool: the name of every file the archive held when the replay began, as PostgreSQL asks for it. The
# restore_command answers "not archived" for any other at once, where barman-cloud-wal-restore costs ~0.4 s to say so:
# the next timeline's history file asked for at the start, the segment after the end of the archive (asked for twice),
# two history files at promotion (the next timeline's, to choose a new one, and its parent's). Measured on a small
# server: 5 such calls, 1.9 s of a 3.0 s replay (and 0.4 s more for the last segment asked for again: DELIVERED).
ARCHIVED_NAMES = ".archived"
DELIVERED = ".delivered-"  # + a segment's name: in a recovery's spool, the one the restore_command delivered last
# What names a file of barman-cloud's layout as PostgreSQL asks for it (%f): a segment (compressed, or .partial, as
# barman-cloud-wal-restore delivers it), or a timeline's history file. Backup labels (segment.offset.backup) name their
# segment, which exists beside them: a name wrongly listed only costs a call to barman, never a file left out.
_ARCHIVED_NAME = re.compile(r"^(?:[0-9A-F]{24}|[0-9A-F]{8}\.history)")
_SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")


def _lz4_decompress(data: bytes) -> bytes:
    import lz4.frame

    return lz4.frame.decompress(data)


def _zstd_decompress(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(data)  # with or without the size in the frame


# What barman-cloud-wal-archive names each segment it compresses, and how pgdr reads it back (pg_waldump's input).
_DECOMPRESS = {
    ".gz": gzip.decompress,
    ".bz2": bz2.decompress,
    ".xz": lzma.decompress,
    ".lz4": _lz4_decompress,
    ".zst": _zstd_decompress,
    "": lambda data: data,
}


class ArchiverMissing(PermanentFailure):
    """barman-cloud is not installed where the server (or a scratch cluster) can run it."""


class WalGap(PermanentFailure):
    """A WAL segment is missing from the archive: recovery cannot go past it."""


class ArchiverFailing(PgdrError):
    """The server's archive_command fails: WAL piles up on the server and the archive falls behind."""


def archiver_bin_dir() -> Path:
    """Return the directory of ``barman-cloud-wal-archive`` and ``-wal-restore``.

    ``$PGDR_ARCHIVER_BIN``, else ``.pgdr/archiver/bin`` in the checkout, else (a checkout the server's
    user cannot enter, where ``make archiver`` builds it) ``archiver/bin`` in ``$PGDR_SHARED_DIR``.
    """
    from pgdr.postgres.binaries import shared_dir

    path = Path(os.environ.get(ARCHIVER_BIN_ENV_VAR) or DEFAULT_ARCHIVER_BIN)
    if not os.environ.get(ARCHIVER_BIN_ENV_VAR) and not (path / "barman-cloud-wal-restore").exists():
        path = shared_dir() / "archiver" / "bin"
    tool = path / "barman-cloud-wal-restore"
    if not (tool.is_file() and os.access(tool, os.X_OK)):
        raise ArchiverMissing(
            f"barman-cloud (the WAL archiver) is not installed in {path}. Run `make archiver` (a venv with "
            "barman[cloud]==3.19.1 that every user can run), or install it and set $PGDR_ARCHIVER_BIN to its bin "
            "directory. A recovering cluster runs barman-cloud-wal-restore as its restore_command."
        )
    return path


@dataclass(frozen=True)
class ArchiverState:
    """The server's archiver as ``pg_stat_archiver`` shows it: the one place pgdr reads it."""

    archived_count: int
    last_archived_wal: str | None
    last_archived_time: datetime | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: datetime | None

    @property
    def failing(self) -> bool:
        """The last attempt failed: no segment was archived since the last failure."""
        return self.last_failed_time is not None and (
            self.last_archived_time is None or self.last_failed_time > self.last_archived_time
        )

    def new_failures(self, before: ArchiverState) -> int:
        """Return how many attempts failed since ``before``, while the archiver is still failing (else 0)."""
        return self.failed_count - before.failed_count if self.failing else 0


def wait_archived(
    conn,
    segment: str,
    before: ArchiverState,
    timeout_s: float,
    failing: Callable[[ArchiverState], str],
    late: Callable[[ArchiverState], str],
    grace_s: float = 0.0,
) -> None:
    """Poll the archiver over ``conn`` until it has archived WAL ``segment`` (or a later one).

    :param before: the archiver when the wait began: failures since then count, older ones do not.
    :param grace_s: failed attempts are tolerated this long (one a retry fixes).
    :raises ArchiverFailing: ``failing(state)`` when attempts failed since ``before`` and it still fails after
        ``grace_s``; ``late(state)`` when ``segment`` is not archived in ``timeout_s``.
    """
    started = time.monotonic()
    while True:
        state = archiver_state(conn)
        done = archived_segment(state.last_archived_wal)
        if done is not None and done >= segment:
            return
        waited = time.monotonic() - started
        if state.new_failures(before) > 0 and waited > grace_s:
            raise ArchiverFailing(failing(state))
        if waited > timeout_s:
            raise ArchiverFailing(late(state))
        time.sleep(0.25)


def archiver_state(conn) -> ArchiverState:
    """Read ``pg_stat_archiver`` over ``conn`` (a psycopg connection to the server)."""
    return ArchiverState(
        *conn.execute(
            "SELECT archived_count, last_archived_wal, last_archived_time, failed_count, last_failed_wal, "
            "last_failed_time FROM pg_stat_archiver"
        ).fetchone()
    )


def check_archiver_runs_as_server_user(bin_dir: Path, uid: int | None) -> None:
    """Fail, saying why, when the database server's OS user (``uid``) cannot run barman-cloud.

    ``archive_command`` runs as that user; if it cannot even start the archiver, nothing fails
    loudly: the server log repeats "archive command failed" and WAL piles up.
    """
    if uid is None:
        return
    try:
        probe = subprocess.run(
            [str(bin_dir / "barman-cloud-wal-archive"), "--version"],
            capture_output=True,
            text=True,
            user=uid,
            group=uid,
            extra_groups=[],
            env={"PATH": os.defpath, "HOME": "/tmp"},
        )
        problem = (probe.stderr or probe.stdout).strip()[:300] if probe.returncode != 0 else None
    except OSError as err:
        problem = str(err)
    if problem:
        raise ArchiverMissing(
            f"The database server's OS user (uid {uid}) cannot run {bin_dir / 'barman-cloud-wal-archive'}: "
            f"{problem}. The archiver's venv and every directory above it must be readable by that user: build it "
            "from a world-readable Python (make archiver uses /usr/bin/python3) in a directory outside /root."
        )


@dataclass(frozen=True)
class ArchiveAccess:
    """How a process reaches the S3 target: endpoint and region, and credentials for its environment only."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    def environment(self) -> dict[str, str]:
        """Return the variables the archiver reads its credentials from (never a command line or a file)."""
        env = {}
        if self.access_key:
            env["AWS_ACCESS_KEY_ID"] = self.access_key
        if self.secret_key:
            env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        if self.session_token:
            env["AWS_SESSION_TOKEN"] = self.session_token
        if self.region:
            env["AWS_DEFAULT_REGION"] = self.region
        return env


@dataclass(frozen=True)
class WalSegment:
    """One archived WAL segment (or a timeline history file) as listed in the archive."""

    name: str  # e.g. 000000010000000000000003
    key: str
    size: int
    stored_at: datetime

    @property
    def timeline(self) -> int:
        return int(self.name[:8], 16)

    def number(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
        """Return the segment's number on its timeline (consecutive segments differ by one)."""
        return segment_number(self.name, segment_size)

    @property
    def suffix(self) -> str:
        """The compression suffix barman-cloud gave the stored object (``.gz``, ``.lz4``...; ``""`` for none)."""
        return _split_key(self.key)[1]


def _split_key(key: str) -> tuple[str, str]:
    """Split an archived object's key into its file name's stem and its suffix (``.gz``...; ``""`` for none)."""
    stem, dot, suffix = key.rsplit("/", 1)[-1].partition(".")
    return stem, dot + suffix


def segment_number(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """Return the segment number of the WAL file ``name``."""
    match = _SEGMENT.match(name)
    if not match:
        raise ValueError(f"{name!r} is not a WAL segment name")
    return int(match.group(2), 16) * (0x100000000 // segment_size) + int(match.group(3), 16)


def archived_segment(name: str | None) -> str | None:
    """Return the WAL segment that ``pg_stat_archiver.last_archived_wal`` vouches for, or ``None``.

    That column also names backup history files (``<segment>.<offset>.backup``), which are archived
    after their segment, and timeline history files (``00000002.history``), which name none.
    """
    if not name or not _SEGMENT.match(name[:24]):
        return None
    return name[:24]


def segment_name(timeline: int, number: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """Return the WAL file name of segment ``number`` on ``timeline``."""
    per_log = 0x100000000 // segment_size
    return f"{timeline:08X}{number // per_log:08X}{number % per_log:08X}"


def lsn_to_int(lsn: str) -> int:
    """Return the LSN ``'0/3000028'`` as a byte position."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def segment_of_lsn(timeline: int, lsn: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """Return the name of the WAL segment holding ``lsn`` on ``timeline``."""
    return segment_name(timeline, lsn_to_int(lsn) // segment_size, segment_size)


@dataclass(frozen=True)
class Gap:
    """The first WAL segment missing after ``start`` (:func:`first_gap`)."""

    missing: str  # the missing segment's name (``start`` itself when ``reachable`` is None)
    reachable: WalSegment | None  # the last segment before it (None: ``start`` is missing)
    after: int  # how many later segments exist past the gap, on that timeline


def first_gap(segments: list[WalSegment], start: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> Gap | None:
    """Return the first segment missing on ``start``'s timeline from ``start`` to the newest one, or ``None``."""
    timeline = int(start[:8], 16)
    on_timeline = {s.number(segment_size): s for s in segments if s.timeline == timeline}
    first = segment_number(start, segment_size)
    if first not in on_timeline:
        return Gap(start, None, sum(1 for n in on_timeline if n > first))
    newest = max(on_timeline)
    number = first
    while number < newest:
        if number + 1 not in on_timeline:
            return Gap(segment_name(timeline, number + 1, segment_size), on_timeline[number], newest - number - 1)
        number += 1
    return None


def newest_on_timeline(segments: list[WalSegment], start: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> WalSegment:
    """Return the newest segment on ``start``'s timeline (which holds ``start``)."""
    timeline = int(start[:8], 16)
    return max((s for s in segments if s.timeline == timeline), key=lambda s: s.number(segment_size))


@dataclass(frozen=True)
class WalArchive:
    """The WAL archive of one server in an S3 target, in barman-cloud's layout.

    :param bucket: the S3 bucket.
    :param layout: where pgdr's PITR objects live in it.
    :param server: the server's name in the plan (barman-cloud's ``SERVER_NAME``).
    :param access: endpoint, region and credentials for processes that run barman-cloud.
    :param sse: the storage target's server-side encryption, which barman-cloud asks for on each segment.
    :param kms_key_id: its KMS key, with ``sse="aws:kms"``.
    """

    bucket: str
    layout: PhysicalLayout
    server: str
    access: ArchiveAccess = field(default_factory=ArchiveAccess)
    sse: str | None = None
    kms_key_id: str | None = None
    compression: str = "zstd"  # the plan's pitr.wal_compression: barman-cloud-wal-archive's --<compression>

    @property
    def url(self) -> str:
        """Return the destination barman-cloud is given (``s3://bucket/prefix/pitr-v1/wal``)."""
        return f"s3://{self.bucket}/{self.layout.wal_archive_prefix()}"

    def describe(self) -> str:
        return f"{self.url}/{self.server}"

    def _endpoint_args(self) -> str:
        return f" --endpoint-url {shlex.quote(self.access.endpoint_url)}" if self.access.endpoint_url else ""

    def _encryption_args(self) -> str:
        if not self.sse:
            return ""
        kms = f" --sse-kms-key-id {shlex.quote(self.kms_key_id)}" if self.sse == "aws:kms" and self.kms_key_id else ""
        return f" --encryption {shlex.quote(self.sse)}{kms}"

    def archive_command(self, bin_dir: Path | None = None, ahead: int = ARCHIVE_AHEAD) -> str:
        """Return the server's ``archive_command``: compress each segment (:attr:`compression`) into the archive,
        the requested one and up to ``ahead - 1`` more that are ready (PostgreSQL's ``archive_status``), each by its
        own barman-cloud-wal-archive, side by side; the call's status is the requested segment's.

        A segment shipped ahead gets a mark: the ``cksum`` of the barman command (the destination: a mark left by
        another command, e.g. before the operator changed the archive's prefix, is never trusted) and of the segment,
        written only after barman succeeded. When PostgreSQL then asks for it, a mark that matches ends the call at
        once (it is removed); any other is removed and the segment archived again. A segment shipped ahead that
        failed has no mark: it is archived when PostgreSQL asks. Run from anywhere but a data directory (no
        ``pg_wal/archive_status``), the command ships the one segment. No quote or backslash: the README gives it to
        the DBA as it is, for postgresql.conf.
        """
        tool = (bin_dir or archiver_bin_dir()) / "barman-cloud-wal-archive"
        barman = (
            f"{shlex.quote(str(tool))}{self._endpoint_args()}{self._encryption_args()} "
            f"--{self.compression} "
            f"{shlex.quote(self.url)} {shlex.quote(self.server)}"
        )
        if ahead <= 1:
            return f"{barman} %p"
        marks = ARCHIVED_AHEAD
        return (
            f'set -- {barman}; d=$(echo "$@" | cksum); '
            f'if [ -f {marks}/%f ] && [ "$(cat {marks}/%f)" = "$d $(cksum < %p)" ]; then rm -f {marks}/%f; exit 0; '
            f"fi; rm -f {marks}/%f; if [ -d pg_wal/archive_status ] && mkdir -p {marks}; then for r in $(ls "
            f'pg_wal/archive_status | grep -E "^[0-9A-F]{{24}}[.]ready$" | sort | sed -n "/^%f[.]ready$/,$ p" | tail '
            f'-n +2 | head -n {int(ahead) - 1}); do n=$(basename $r .ready); ("$@" pg_wal/$n > /dev/null 2>&1 && echo '
            f'"$d $(cksum < pg_wal/$n)" > {marks}/$n.tmp && mv -f {marks}/$n.tmp {marks}/$n) & done; '
            'fi; "$@" %p; status=$?; wait; exit $status'
        )

    def restore_command(
        self, spool: Path, bin_dir: Path | None = None, segment_size: int = DEFAULT_SEGMENT_SIZE
    ) -> str:
        """Return a recovering cluster's ``restore_command``, fetching ahead into ``spool``.

        ``spool`` is a directory of this recovery's own, writable by the server's OS user. A segment already
        there is moved into place by the shell, and barman-cloud-wal-restore, started only for the others, brings the
        next :data:`WAL_PREFETCH` segments into it in parallel (barman's ``--parallel`` and ``--spool-dir``; the same
        move it makes itself, without a Python start per segment). A spooled file of the wrong size (a prefetch cut
        short) is removed and fetched again; one that cannot be moved stops the recovery (exit 255: PostgreSQL's
        FATAL) rather than ending it early as though the archive had ended there. A file the archive did not hold
        when the replay began (not in the spool's :data:`ARCHIVED_NAMES`, written by the recovery from
        :meth:`archived_names`) is answered "not archived" without barman; without that list, barman answers.

        The segment delivered last stays linked in the spool (``.delivered-<name>``): PostgreSQL asks for it again
        once redo is done (it re-reads the last record), and gets a copy without barman. The link is the file
        PostgreSQL keeps in pg_wal, unchanged: a segment is only recycled once replay has passed it.
        """
        tool = (bin_dir or archiver_bin_dir()) / "barman-cloud-wal-restore"
        where = f"{shlex.quote(self.url)} {shlex.quote(self.server)} %f %p"
        folder = shlex.quote(str(spool))
        spooled, delivered = f"{folder}/%f", f"{folder}/{DELIVERED}%f"
        keep = f"rm -f {folder}/{DELIVERED}*; ln"  # + the file delivered and its link: the last one only
        listed = shlex.quote(str(spool / ARCHIVED_NAMES))
        return (
            f'if [ -f {spooled} ] && [ "$(wc -c < {spooled})" -eq {int(segment_size)} ]; then {keep} {spooled} '
            f"{delivered} 2>/dev/null; mv -f {spooled} %p || exit 255; "
            f"elif [ -f {delivered} ]; then cp {delivered} %p || exit 255; "
            # not in the archive's names listed when the replay began: "not archived" (only grep's "no match", 1)
            f"elif [ -f {listed} ] && {{ grep -qxF %f {listed}; [ $? -eq 1 ]; }}; then exit 1; "
            f"else rm -f {spooled}; {shlex.quote(str(tool))}{self._endpoint_args()} --parallel "
            f"{WAL_PREFETCH} --spool-dir {folder} {where} || exit $?; {keep} %p {delivered} 2>/dev/null; exit 0; fi"
        )

    def archived_names(self, store: BackupStore) -> list[str]:
        """Return the name of every file the archive holds, as a recovering server asks for it (``%f``): each
        segment (without its compression suffix; a ``.partial`` one as the segment, which barman-cloud-wal-restore
        delivers for it) and each timeline history file. A recovery's spool keeps them (:data:`ARCHIVED_NAMES`).
        """
        names = set()
        for obj in store.list(self.layout.wal_segments_prefix(self.server)):
            found = _ARCHIVED_NAME.match(obj.key.rsplit("/", 1)[-1])
            if found:
                names.add(found.group(0))
        return sorted(names)

    def server_settings(self, archive_timeout_s: int = 60, bin_dir: Path | None = None) -> dict[str, str]:
        """Return the ``postgresql.conf`` settings of a server whose WAL this archive holds."""
        return {
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": self.archive_command(bin_dir),
            "archive_timeout": f"{int(archive_timeout_s)}s",
            "summarize_wal": "on",  # incremental base backups (PostgreSQL 17+)
        }

    # -- reading the archive ---------------------------------------------------------------------
    def segments(self, store: BackupStore, listed: Iterable[StoredObject] | None = None) -> list[WalSegment]:
        """Return every archived WAL segment, oldest first (history and backup-label files left out).

        :param listed: the objects under the archive's prefix when already listed (else ``store`` lists them).
        """
        found = []
        for obj in store.list(self.layout.wal_segments_prefix(self.server)) if listed is None else listed:
            stem, suffix = _split_key(obj.key)
            if _SEGMENT.match(stem) and suffix in _DECOMPRESS:
                found.append(WalSegment(stem, obj.key, obj.size, obj.modified))
        return sorted(found, key=lambda s: s.name)

    def check_continuous(
        self, segments: list[WalSegment], start: str, segment_size: int = DEFAULT_SEGMENT_SIZE
    ) -> WalSegment:
        """Return the newest segment reachable from ``start`` without a gap, on ``start``'s timeline.

        :raises WalGap: when ``start`` itself is missing, or a segment is missing before the newest one.
        """
        gap = first_gap(segments, start, segment_size)
        if gap is None:
            return newest_on_timeline(segments, start, segment_size)
        if gap.reachable is None:
            raise WalGap(
                f"WAL segment {start} is missing from the archive {self.describe()}: no recovery from the base "
                "backups that need it is possible. Check the server's archive_command (pg_stat_archiver) and take "
                "a new full base backup."
            )
        raise WalGap(
            f"WAL segment {gap.missing} is missing from the archive {self.describe()} (segments up to "
            f"{gap.reachable.name} are there, and {gap.after} later ones after the gap). Recovery "
            "from this base backup can reach only moments before that segment; the recovery window from "
            f"{gap.reachable.stored_at:%Y-%m-%d %H:%M:%S} UTC onwards is lost until a new full base backup is "
            "taken. Take one now (trigger pgdr_basebackup with kind=full)."
        )

    def fetch_segment(self, store: BackupStore, segment: WalSegment, dest: Path) -> Path:
        """Download and decompress one archived segment to ``dest`` (for ``pg_waldump``)."""
        with store.open_read(segment.key) as stream:
            raw = stream.read()
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / segment.name
        path.write_bytes(_DECOMPRESS[segment.suffix](raw))
        return path


def segment_system_identifier(segment_file: Path) -> str | None:
    """Return the system identifier of the cluster that wrote a WAL segment (its first page's long header), or
    ``None`` when the file does not start with one.

    The long header is the standard page header (magic, info, timeline, page address, remaining
    length: 24 bytes aligned) followed by the 64-bit system identifier, in the writer's byte order
    (little-endian on every platform PostgreSQL 18 builds for here).
    """
    import struct

    with segment_file.open("rb") as stream:
        head = stream.read(40)
    if len(head) < 40:
        return None
    _magic, info = struct.unpack_from("<HH", head, 0)
    if not info & 0x0002:  # XLP_LONG_HEADER
        return None
    return str(struct.unpack_from("<Q", head, 24)[0])


_COMMIT = re.compile(
    r"desc: (?:COMMIT|ABORT)(?:_PREPARED)? (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) (?:UTC|[+-]\d\d)"
)


def last_commit_time(waldump: str, segment_file: Path) -> datetime | None:
    """Return the time of the last transaction end recorded in one WAL segment, or ``None``.

    That is the newest moment a recovery from the archive can reach exactly: a recovery target
    must lie before it, since recovery stops at the first commit after its target.
    """
    result = subprocess.run(
        [waldump, "--rmgr=Transaction", str(segment_file)],
        capture_output=True,
        text=True,
        env={"TZ": "UTC", "PATH": os.defpath},
    )
    times = _COMMIT.findall(result.stdout)
    if not times:
        return None
    stamp = times[-1]
    fmt = "%Y-%m-%d %H:%M:%S.%f" if "." in stamp else "%Y-%m-%d %H:%M:%S"
    return datetime.strptime(stamp, fmt).replace(tzinfo=UTC)
