"""Exact row counts read from the dump itself, not by a second scan of the source.

``pg_dump`` writes each table's rows as ``COPY`` text, one line per row (a newline inside a value is written as
the two characters ``\\n``), ended by a line ``\\.``; in the directory format that is one file per table,
``<dump id>.dat`` (``.gz``, ``.zst`` or ``.lz4`` as pg_dump compressed it). The table of a file is found by the
catalog oid its ``TABLE DATA`` entry carries in ``pg_restore -l`` (names are never parsed from that listing:
they may hold spaces). Counting is decompression (ISA-L's inflate for gzip) and ``bytes.count``, on the worker,
one thread per file: the source server reads every table once, for ``pg_dump``.

Where the dump cannot answer, :func:`pgdr.postgres.client.count_rows` counts by query, in the same snapshot: a
file compressed with a method this Python lacks (``lz4``), or one not ended as pg_dump ends them.
"""

from __future__ import annotations

import logging
import re
import subprocess
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pgdr.postgres.binaries import pg_tool

log = logging.getLogger(__name__)

_TABLE_DATA = re.compile(r"^(?P<id>\d+); \d+ (?P<oid>\d+) TABLE DATA ", re.MULTILINE)
_END_OF_COPY = b"\\."
_CHUNK = 1 << 20

try:  # ISA-L's inflate, twice as fast as zlib's (requirements.txt has it; zlib where it is missing)
    from isal import isal_zlib as _GZIP
except ImportError:  # pragma: no cover - a worker installed without isal
    _GZIP = zlib


def table_data_entries(dump_dir: Path) -> dict[int, int]:
    """Return ``{dump id: table oid}`` of every ``TABLE DATA`` entry of the directory-format dump."""
    listing = subprocess.run([pg_tool("pg_restore"), "--list", str(dump_dir)], capture_output=True, text=True)
    if listing.returncode != 0:
        log.warning("pg_restore --list of the dump failed (%s); counting rows by query.", listing.stderr.strip())
        return {}
    return {int(m.group("id")): int(m.group("oid")) for m in _TABLE_DATA.finditer(listing.stdout)}


def _chunks(path: Path) -> Iterator[bytes] | None:
    """The decompressed bytes of a data file, in chunks; None when this Python cannot read its compression."""
    name = path.name
    if name.endswith(".dat"):
        return _plain(path)
    if name.endswith(".dat.gz"):
        return _inflated(path, lambda: _GZIP.decompressobj(zlib.MAX_WBITS | 16))
    if name.endswith(".dat.zst"):
        try:
            import zstandard
        except ImportError:
            return None
        return _inflated(path, lambda: zstandard.ZstdDecompressor().decompressobj())
    return None


def _plain(path: Path) -> Iterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK):
            yield chunk


def _inflated(path: Path, decompressor) -> Iterator[bytes]:
    """Decompress ``path`` chunk by chunk; gzip members one after the other (as concatenated files hold) too."""
    inflate = decompressor()
    for chunk in _plain(path):
        while chunk:
            yield inflate.decompress(chunk)
            chunk = getattr(inflate, "unused_data", b"")
            if chunk:  # a next gzip member
                inflate = decompressor()
    rest = inflate.flush() if hasattr(inflate, "flush") else b""
    if rest:
        yield rest


def rows_in_copy_data(chunks: Iterator[bytes]) -> int | None:
    """Count the rows of COPY text: lines before the ``\\.`` line that ends it; None if it does not end so."""
    newlines, tail = 0, b""
    for chunk in chunks:
        newlines += chunk.count(b"\n")
        tail = (tail + chunk[-64:])[-64:]
    body = tail.rstrip(b"\n")
    if not (body == _END_OF_COPY or body.endswith(b"\n" + _END_OF_COPY)):
        return None
    return newlines - (len(tail) - len(body))  # the newlines from the "\." line's own on are no rows


def _data_file(dump_dir: Path, dump_id: int) -> Path | None:
    for suffix in (".dat.gz", ".dat", ".dat.zst", ".dat.lz4"):
        path = dump_dir / f"{dump_id}{suffix}"
        if path.is_file():
            return path
    return None


def count_dump_rows(dump_dir: Path, workers: int) -> dict[int, int]:
    """Return ``{table oid: exact row count}`` for every table whose data the dump holds and this can read."""
    entries = table_data_entries(dump_dir)

    def one(item: tuple[int, int]) -> tuple[int, int | None]:
        dump_id, oid = item
        path = _data_file(dump_dir, dump_id)
        chunks = _chunks(path) if path is not None else None
        return oid, (rows_in_copy_data(chunks) if chunks is not None else None)

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="pgdr-count-dump") as pool:
        counted = dict(pool.map(one, entries.items()))
    unread = sorted(oid for oid, rows in counted.items() if rows is None)
    if unread:
        log.info(
            "%d table(s) counted by query: their dump files could not be read here (oids %s).", len(unread), unread
        )
    return {oid: rows for oid, rows in counted.items() if rows is not None}
