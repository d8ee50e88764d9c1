"""Exact row counts read from the dump itself, not by a second scan of the source.

``pg_dump`` writes each table's rows as ``COPY`` text, one line per row (a newline inside a value is written as
the two characters ``\\n``), ended by a line ``\\.``; in the directory format that is one file per table,
``<dump id>.dat`` (``.gz``, ``.zst`` or ``.lz4`` as pg_dump compressed it). The table of a file is found by the
catalog oid its ``TABLE DATA`` entry carries in ``pg_restore -l`` (names are never parsed from that listing:
they may hold spaces). Counting is decompression (ISA-L's inflate for gzip) and ``bytes.count``, on the worker,
one thread per file: the source server reads every table once, for ``pg_dump``.

Which tables the files answer for is known before the dump's snapshot is closed (:func:`readable_table_data`): the
others (a file compressed with ``lz4``, which no pg_dump here writes to test a reader against; a table whose data
the dump leaves out) are counted by query in the snapshot (:func:`pgdr.postgres.client.row_census`); then the
snapshot is closed and the files are counted (:func:`count_table_data`), so counting never holds the snapshot (and
the vacuum horizon) open.
A file not ended as pg_dump ends them is a damaged dump: the backup fails rather than store it.
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
try:
    import zstandard  # noqa: F401 - only whether it is there

    _HAS_ZSTD = True
except ImportError:  # pragma: no cover - a worker installed without zstandard
    _HAS_ZSTD = False


def table_data_entries(dump_dir: Path) -> dict[int, int]:
    """Return ``{dump id: table oid}`` of every ``TABLE DATA`` entry of the directory-format dump."""
    listing = subprocess.run([pg_tool("pg_restore"), "--list", str(dump_dir)], capture_output=True, text=True)
    if listing.returncode != 0:
        log.warning("pg_restore --list of the dump failed (%s); counting rows by query.", listing.stderr.strip())
        return {}
    return {int(m.group("id")): int(m.group("oid")) for m in _TABLE_DATA.finditer(listing.stdout)}


_READABLE = (".dat", ".dat.gz", ".dat.zst")  # lz4: counted by query (no pg_dump here writes it)


def _chunks(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of a data file (one of the :data:`_READABLE` suffixes), in chunks."""
    if path.name.endswith(".dat.gz"):
        return _inflated(path, lambda: _GZIP.decompressobj(zlib.MAX_WBITS | 16))
    if path.name.endswith(".dat.zst"):
        import zstandard

        return _inflated(path, lambda: zstandard.ZstdDecompressor().decompressobj())
    return _plain(path)


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


def readable_table_data(dump_dir: Path) -> dict[int, Path]:
    """Return ``{table oid: data file}`` of the tables whose rows this can count from the directory-format dump (a
    file compressed with a method this Python lacks is left out: counted by query)."""
    files = {path.name: path for path in dump_dir.iterdir()}
    readable = {}
    for dump_id, oid in table_data_entries(dump_dir).items():
        for suffix in _READABLE:
            if (path := files.get(f"{dump_id}{suffix}")) is not None:
                readable[oid] = path
                break
    if not _HAS_ZSTD:
        readable = {oid: path for oid, path in readable.items() if not path.name.endswith(".zst")}
    return readable


def count_table_data(files: dict[int, Path], workers: int) -> dict[int, int | None]:
    """Return ``{table oid: exact row count}`` of the data files (:func:`readable_table_data`), one thread a file;
    None for a file that does not end as pg_dump ends its data (cut short or damaged)."""

    def one(item: tuple[int, Path]) -> tuple[int, int | None]:
        oid, path = item
        return oid, rows_in_copy_data(_chunks(path))

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="pgdr-count-dump") as pool:
        return dict(pool.map(one, files.items()))
