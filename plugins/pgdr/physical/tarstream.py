"""A base backup as one stream: pg_basebackup's tar, zstd-compressed, checked against PostgreSQL's manifest on the way.

pgdr reads ``pg_basebackup -Ft -D -`` (the tar on stdout, the ``backup_manifest`` as its last member) and, in the same
pass, compresses it with zstd (level 1: measured faster and smaller than gzip:1 and lz4 on a pgbench cluster) and
checks every file against the manifest: its size and its checksum (CRC32C, PostgreSQL's default: the server computes
it in C, where its built-in SHA-256 cost most of a base backup's time). What is stored is ``base.tar.zst`` (SHA-256 in
the record) and the manifest beside it.

A restore reads the stored bytes once: SHA-256 against the record while downloading, zstd, tar, each file written
and checked against the manifest as it goes. This is the check ``pg_verifybackup`` does (files present, none added,
sizes, checksums, the manifest's own checksum), which the embedded ``pg_verifybackup`` cannot do on a zstd tar.
Base backups stored before (``base.tar.gz``) keep their path: ``pg_verifybackup`` on the stored tar.

An incremental base backup carries its own WAL (``-X fetch``: :mod:`pgdr.physical.basebackup`): the segments from its
start to its end, under ``pg_wal/``, which PostgreSQL's manifest does not list (it lists their ``.done`` marks). Each
is accepted only if its name lies in the manifest's WAL ranges, its size is a WAL segment size, and its first page
header says it is that segment of that cluster (system identifier, segment size, page address); its records are then
checked by PostgreSQL itself (each record's CRC) when it is replayed. Timeline history files it may carry are kept.

The tar and the manifest come from a bucket: untrusted. Extraction uses tarfile's ``data`` filter (no absolute
paths, no ``..``, no links out of the directory); the manifest is parsed as data and every field checked.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pgdr.errors import ChecksumMismatch
from pgdr.identifiers import printable
from pgdr.messages import shorten
from pgdr.physical.archive import lsn_to_int, segment_number

STORED_TAR = "base.tar.zst"
ZSTD_LEVEL = 1
ZSTD_THREADS = 2  # zstd's own threads (the GIL released): 2 GB in 3.3-3.8 s instead of 4.1-4.4 s on two cores
CHUNK = 1 << 20
MANIFEST = "backup_manifest"


class _Crc32c:
    """CRC32C as PostgreSQL's manifest writes it: the 4 bytes of the value in the machine's order, in hex."""

    def __init__(self) -> None:
        import google_crc32c

        self._sum = google_crc32c.Checksum()

    def update(self, data: bytes) -> None:
        self._sum.update(data)

    def hexdigest(self) -> str:
        return struct.pack("=I", int.from_bytes(self._sum.digest(), "big")).hex()


class _NoChecksum:
    def update(self, data: bytes) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


_HASHES: dict[str, Callable[[], object]] = {
    "CRC32C": _Crc32c,
    "SHA224": hashlib.sha224,
    "SHA256": hashlib.sha256,
    "SHA384": hashlib.sha384,
    "SHA512": hashlib.sha512,
    "NONE": _NoChecksum,
}


_WAL_SEGMENT = re.compile(r"pg_wal/([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})")
_WAL_HISTORY = re.compile(r"pg_wal/[0-9A-F]{8}[.]history")
_HISTORY_MAX = 1 << 20
_LONG_HEADER = struct.Struct("=HHIQI4xQII")  # XLogLongPageHeaderData: magic, info, tli, pageaddr, rem_len, sysid,
_XLP_LONG_HEADER = 0x0002  # seg_size, blcksz (the machine's order, as PostgreSQL writes it)


class _WalHeader:
    """Not a checksum: what the first page header of a WAL segment says (the cluster, the segment size, the address)."""

    def __init__(self) -> None:
        self._head = b""

    def update(self, data: bytes) -> None:
        if len(self._head) < _LONG_HEADER.size:
            self._head += data[: _LONG_HEADER.size - len(self._head)]

    def hexdigest(self) -> str:
        if len(self._head) < _LONG_HEADER.size:
            return "no page header"
        _magic, info, _tli, pageaddr, _rem, sysid, seg_size, _blcksz = _LONG_HEADER.unpack(self._head)
        if not info & _XLP_LONG_HEADER:
            return "no long page header"
        return f"system identifier {sysid}, segment size {seg_size}, address {pageaddr:X}"


class Manifest:
    """The files of a ``backup_manifest``: path → (size, checksum algorithm, checksum); its own checksum checked."""

    def __init__(self, raw: bytes, what: str) -> None:
        self.raw = raw
        self.what = what
        at = raw.rfind(b'"Manifest-Checksum"')
        try:
            data = json.loads(raw)
            files = data["Files"]
            if not isinstance(files, list):
                raise TypeError("Files is not a list")
            self.files: dict[str, tuple[int, str, str]] = {}
            for item in files:
                algorithm = str(item.get("Checksum-Algorithm", "NONE")).upper()
                size = item["Size"]
                path = _manifest_path(item)
                if not isinstance(size, int) or isinstance(size, bool) or size < 0 or algorithm not in _HASHES:
                    raise ValueError(f"file {path!r}: size {size!r}, checksum {algorithm}")
                self.files[path] = (size, algorithm, str(item.get("Checksum", "")).lower())
            self.wal_ranges = data["WAL-Ranges"]
            self.system_identifier = str(data.get("System-Identifier", ""))
            self._wal_wanted: dict[tuple[str, int], str | None] = {}  # WAL checked by expect(), for check()
            own = str(data["Manifest-Checksum"]).lower()
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise self._damaged(f"its backup_manifest cannot be read ({_untrusted(err)})") from None
        if at < 0 or hashlib.sha256(raw[:at]).hexdigest() != own:
            raise self._damaged("its backup_manifest does not match its own checksum (Manifest-Checksum)")

    def _damaged(self, problem: str) -> ChecksumMismatch:
        return ChecksumMismatch(
            f"The check against PostgreSQL's manifest rejected {self.what}: {problem}. The base backup is damaged; "
            "no cluster was started from it. Recover from an older chain (choose a moment before this base backup "
            "is needed), and take a new full base backup."
        )

    def hasher(self, name: str):
        entry = self.files.get(name)
        if entry is None and _WAL_SEGMENT.fullmatch(name):
            return _WalHeader()
        return _HASHES[entry[1] if entry else "NONE"]()

    def _wal_file(self, name: str, size: int) -> str | None:
        """Check a WAL file of the backup that the manifest does not list (``-X fetch``): return what its first page
        header must say (None for a timeline history file), or raise. Checked once per name and size: on a restore
        both :meth:`expect` (before its bytes) and :meth:`check` (after) ask."""
        if (name, size) not in self._wal_wanted:
            self._wal_wanted[name, size] = self._check_wal_file(name, size)
        return self._wal_wanted[name, size]

    def _check_wal_file(self, name: str, size: int) -> str | None:
        if _WAL_HISTORY.fullmatch(name):
            if size > _HISTORY_MAX:
                raise self._damaged(f'"{name}" has size {size}, more than a timeline history file holds')
            return None
        match = _WAL_SEGMENT.fullmatch(name)
        if match is None:
            raise self._damaged(f'"{printable(name)}" is in the backup but not in its manifest')
        if size & (size - 1) or not (1 << 20) <= size <= (1 << 30):
            raise self._damaged(f'"{name}" has size {size}, which is not a WAL segment size')
        if int(match.group(3), 16) >= (1 << 32) // size:
            raise self._damaged(f'"{name}" is not a WAL segment name for segments of {size} bytes')
        timeline, segno = int(match.group(1), 16), segment_number(name.removeprefix("pg_wal/"), size)
        try:
            ours = any(
                wal_range.get("Timeline") == timeline
                and lsn_to_int(str(wal_range.get("Start-LSN"))) // size
                <= segno
                <= lsn_to_int(str(wal_range.get("End-LSN"))) // size
                for wal_range in self.wal_ranges
            )
        except (ValueError, TypeError, AttributeError) as err:
            raise self._damaged(f"its WAL-Ranges cannot be read ({_untrusted(err)})") from None
        if not ours:
            ranges = _untrusted(json.dumps(self.wal_ranges))
            raise self._damaged(f'"{name}" is not a WAL segment of the backup\'s WAL ranges {ranges}')
        if not self.system_identifier:
            raise self._damaged(f'it carries WAL ("{name}") but its manifest names no cluster (System-Identifier)')
        return f"system identifier {self.system_identifier}, segment size {size}, address {segno * size:X}"

    def expect(self, name: str, size: int) -> None:
        """Refuse a file the manifest does not list (other than the backup's own WAL, bounded by its WAL ranges), or of
        another size, before a byte of it is written (a forged tar cannot fill the disk with more than the manifest
        says)."""
        if name == MANIFEST:
            if size != len(self.raw):
                raise self._damaged("the backup_manifest inside the tar is not the one stored beside it")
            return
        entry = self.files.get(name)
        if entry is None:
            self._wal_file(name, size)
            return
        if size != entry[0]:
            raise self._damaged(f'"{name}" has size {size}, the manifest says {entry[0]}')

    def check(self, seen: dict[str, tuple[int, str]]) -> None:
        """Compare the files read (name → (size, checksum)) with the manifest; raise on the first difference."""
        for name, (size, checksum) in seen.items():
            if name == MANIFEST:
                continue  # the manifest itself (compared with the stored one, or parsed from it)
            if name not in self.files:  # WAL the backup carries: its first page header against its name
                wanted = self._wal_file(name, size)
                if wanted is not None and checksum != wanted:
                    raise self._damaged(
                        f'"{name}" is not the WAL segment its name says: its first page header says {checksum}, '
                        f"where this backup's segment would say {wanted}"
                    )
                continue
            self.expect(name, size)
            entry = self.files[name]
            if entry[1] != "NONE" and checksum != entry[2]:
                raise self._damaged(f'"{name}" has checksum {checksum}, the manifest says {entry[2]} ({entry[1]})')
        missing = sorted(set(self.files) - set(seen))
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise self._damaged(f'"{missing[0]}"{more} is in the manifest but not in the backup')


def _untrusted(text: object) -> str:
    """Text read from the bucket (or an error quoting it), as one short line of a message."""
    return shorten(printable(str(text)), 300)


def _manifest_path(item: dict) -> str:
    """A file's path as the tar reader names it: PostgreSQL writes a name that is not UTF-8 as ``Encoded-Path``
    (its bytes in hex), which the tar's header gives as the same bytes (read with ``surrogateescape``)."""
    if "Path" in item:
        return str(item["Path"])
    return bytes.fromhex(str(item["Encoded-Path"])).decode("utf-8", "surrogateescape")


class _Tee:
    """A readable stream that hands every byte it reads to ``sink`` first."""

    def __init__(self, source: BinaryIO, sink: Callable[[bytes], object]) -> None:
        self._source = source
        self._sink = sink

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        if data:
            self._sink(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


class _Timed:
    """A readable stream that counts the seconds its reads wait (a download's: the bucket sending the bytes)."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.seconds = 0.0

    def read(self, size: int = -1) -> bytes:
        started = time.monotonic()
        try:
            return self._source.read(size)
        finally:
            self.seconds += time.monotonic() - started


class _Reader:
    """Exact reads from a stream (a pipe or a decompressor may return less than asked)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def read(self, size: int) -> bytes:
        data = self._stream.read(size)
        if len(data) == size or not data:
            return data
        parts = [data]
        got = len(data)
        while got < size and (more := self._stream.read(size - got)):
            parts.append(more)
            got += len(more)
        return b"".join(parts)


class _Writers:
    """The extracted files written by two threads beside the reader: writing 2 GB into the page cache is most of an
    extraction's time, all of it in the kernel, and one thread kept one core on it while the other waited."""

    def __init__(self, threads: int = 2) -> None:
        import queue
        import threading

        self._queues = [queue.Queue(maxsize=32) for _ in range(threads)]  # at most 64 MB of chunks in flight
        self._errors: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._run, args=(q,), name=f"pgdr-extract-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        for thread in self._threads:
            thread.start()
        self._turn = 0
        self.waited = 0.0  # seconds the reader waited for a writer (its queue full: the disk behind)

    def _run(self, jobs) -> None:
        out = None
        while True:
            op, value, mode = jobs.get()
            if op == "stop":
                break
            if self._errors:
                continue  # drain: the reader raises the first error
            try:
                if op == "open":
                    out = open(value, "wb")  # noqa: SIM115 - closed by its "close" job, or below
                elif op == "write":
                    out.write(value)
                else:
                    out.close()
                    out = None
                    value.chmod(mode)
            except BaseException as err:  # noqa: BLE001 - handed to the reader (a full disk, a permission)
                self._errors.append(err)
        if out is not None:
            out.close()

    def file(self, target: Path, mode: int):
        """Open ``target`` on the next writer; return the function that writes its chunks, then closes it (None)."""
        jobs = self._queues[self._turn]
        self._turn = (self._turn + 1) % len(self._queues)
        self._put(jobs, ("open", target, None))

        def write(chunk: bytes | None) -> None:
            self._put(jobs, ("write", chunk, None) if chunk is not None else ("close", target, mode))

        return write

    def _put(self, jobs, job) -> None:
        if self._errors:
            raise self._errors[0]
        started = time.monotonic()
        jobs.put(job)
        self.waited += time.monotonic() - started

    def close(self, failing: bool) -> None:
        """Wait until every file is written and closed; raise a writer's error unless ``failing`` already."""
        for jobs in self._queues:
            jobs.put(("stop", None, None))
        for thread in self._threads:
            thread.join()
        if self._errors and not failing:
            raise self._errors[0]


_BLOCK = 512
_KINDS = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE)


def read_tar(
    stream: BinaryIO,
    what: str,
    manifest: Manifest | None = None,
    extract_to: Path | None = None,
    waits: dict[str, float] | None = None,
) -> Manifest:
    """Read a base backup's tar from ``stream`` to its end; check every file against the manifest, extract them into
    ``extract_to`` when given. Return the manifest.

    The tar is read here, not by :mod:`tarfile`'s stream mode (which copies every byte three times: 3.4 s of a 2 GB
    backup): PostgreSQL writes plain ustar (files, directories, symbolic links), and that is all that is accepted.
    Each header is parsed and checked by ``tarfile.TarInfo.frombuf``; what is extracted passes tarfile's ``data``
    filter (no absolute path, no ``..``, no link out of the directory).

    :param manifest: the stored ``backup_manifest``; ``None`` (while the backup is taken) uses the tar's own, its last
        member, with CRC32C (the checksum pgdr asks pg_basebackup for) computed for every file before it arrives.
    :param waits: where to add the seconds spent waiting for the disk (``disk``: the extracted files' writers behind).
    :raises ChecksumMismatch: a file missing, added, of another size or checksum; an unreadable or damaged tar.
    """
    writers = _Writers() if extract_to is not None else None
    try:
        manifest = _read_tar(_Reader(stream), what, manifest, extract_to, writers)
    except BaseException:
        if writers is not None:
            writers.close(failing=True)
        raise
    if writers is not None:
        started = time.monotonic()
        writers.close(failing=False)
        if waits is not None:
            waits["disk"] = waits.get("disk", 0.0) + writers.waited + time.monotonic() - started
    while stream.read(CHUNK):  # the second end-of-archive block and the record padding: hashed and stored too
        pass
    return manifest


def _read_tar(reader: _Reader, what: str, manifest: Manifest | None, extract_to: Path | None, writers) -> Manifest:
    seen: dict[str, tuple[int, str]] = {}
    own: bytes | None = None

    def cut(problem: str) -> ChecksumMismatch:
        return ChecksumMismatch(
            f"{what} is not a readable tar ({problem}): it was cut short or damaged. No cluster was started from it. "
            "Recover from an older chain, and take a new full base backup."
        )

    while True:
        header = reader.read(_BLOCK)
        if len(header) < _BLOCK:
            raise cut("it ends inside a header, before the end-of-archive blocks")
        if header == bytes(_BLOCK):
            break
        try:
            member = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.TarError as err:
            raise cut(f"a damaged header: {err}") from None
        if member.type not in _KINDS:
            raise cut(f"{member.name!r} is of tar type {member.type!r}, which PostgreSQL does not write")
        safe = None
        if extract_to is not None:
            try:
                safe = tarfile.data_filter(member, str(extract_to))
            except tarfile.FilterError as err:
                raise cut(f"refused to extract: {err}") from None
            if member.isdir():
                (extract_to / safe.name).mkdir(mode=0o700, parents=True, exist_ok=True)
            elif member.issym():
                (extract_to / safe.name).symlink_to(safe.linkname)
        if not member.isfile():
            continue
        if manifest is not None:
            manifest.expect(member.name, member.size)
        if manifest is not None:
            hasher = manifest.hasher(member.name)
        else:  # read before its manifest (at the tar's end): CRC32C, which pgdr asks for, or a WAL segment's header
            hasher = _WalHeader() if _WAL_SEGMENT.fullmatch(member.name) else _Crc32c()
        kept = [] if member.name == MANIFEST else None
        write = None
        if safe is not None:
            target = extract_to / safe.name
            target.parent.mkdir(parents=True, exist_ok=True)
            write = writers.file(target, safe.mode if safe.mode is not None else 0o600)
        left = member.size
        while left:
            chunk = reader.read(min(left, CHUNK))
            if not chunk:
                raise cut(f"{member.name!r} ends {left} bytes early")
            left -= len(chunk)
            hasher.update(chunk)
            if write is not None:
                write(chunk)
            if kept is not None:
                kept.append(chunk)
        if write is not None:
            write(None)
        padding = -member.size % _BLOCK
        if padding and len(reader.read(padding)) != padding:
            raise cut(f"{member.name!r} ends early")
        if kept is not None:
            own = b"".join(kept)
        seen[member.name] = (member.size, hasher.hexdigest())
    if manifest is None:
        if own is None:
            raise ChecksumMismatch(f"{what} has no backup_manifest: pg_basebackup did not finish it.")
        manifest = Manifest(own, what)
        for name, (_, algorithm, _) in manifest.files.items():
            if algorithm not in ("CRC32C", "NONE"):
                raise ChecksumMismatch(f"{what}: {name!r} has a {algorithm} checksum where pgdr asked for CRC32C.")
    elif own is not None and own != manifest.raw:
        raise manifest._damaged("the backup_manifest inside the tar is not the one stored beside it")
    manifest.check(seen)
    return manifest


def compress_tar(stream: BinaryIO, out: BinaryIO, what: str) -> tuple[Manifest, int, str]:
    """Read pg_basebackup's tar from ``stream``, write it zstd-compressed to ``out`` and check it against the manifest
    at its end. Return the manifest, the stored size and its SHA-256."""
    import zstandard

    digest = hashlib.sha256()
    stored = 0

    def write(data: bytes) -> None:
        nonlocal stored
        if data:
            digest.update(data)
            out.write(data)
            stored += len(data)

    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_THREADS).compressobj()
    manifest = read_tar(_Tee(stream, lambda data: write(compressor.compress(data))), what)
    write(compressor.flush())
    return manifest, stored, digest.hexdigest()


def restore_tar(
    stream: BinaryIO,
    record_file,
    manifest: Manifest,
    dest: Path | None,
    what: str,
    where: str,
    waits: dict[str, float] | None = None,
) -> None:
    """Read a stored ``base.tar.zst`` once: its SHA-256 and size against the record (``record_file``), every file
    checked against ``manifest`` and, with ``dest``, extracted there (the manifest beside). Into ``waits``, when given,
    the seconds of that pass spent waiting for the bucket (``bucket``) and for the disk (``disk``): where a slow
    restore's time went."""
    import zstandard

    timed = _Timed(stream)
    digest = hashlib.sha256()
    size = 0

    def count(data: bytes) -> None:
        nonlocal size
        digest.update(data)
        size += len(data)

    checked = _Tee(timed, count)
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
    try:
        with zstandard.ZstdDecompressor().stream_reader(checked, read_size=CHUNK, read_across_frames=True) as plain:
            read_tar(plain, what, manifest, dest, waits)
        checked.drain()
    except zstandard.ZstdError as err:
        checked.drain()
        check_against_record(record_file, size, digest.hexdigest(), where)  # changed bytes say so first
        raise ChecksumMismatch(
            f"{what} cannot be decompressed ({err}), though its stored bytes match its record: it was damaged "
            "before it was stored. No cluster was started from it. Recover from an older chain, and take a new "
            "full base backup."
        ) from None
    except ChecksumMismatch:
        checked.drain()
        check_against_record(record_file, size, digest.hexdigest(), where)
        raise
    check_against_record(record_file, size, digest.hexdigest(), where)
    if waits is not None:
        waits["bucket"] = waits.get("bucket", 0.0) + timed.seconds
    if dest is not None:
        (dest / MANIFEST).write_bytes(manifest.raw)


def check_against_record(entry, size: int, sha256: str, where: str) -> None:
    """Refuse stored bytes whose size or SHA-256 is not what the base backup record (``entry``) says."""
    if size != entry.size or sha256 != entry.sha256:
        raise ChecksumMismatch(
            f"{where} does not match its base backup record (size {size}, expected {entry.size}; SHA-256 "
            f"{sha256[:12]}…, expected {entry.sha256[:12]}…): the stored file changed since it was written. This "
            "base backup (and every incremental one built on it) cannot be trusted; take a new full base backup."
        )
