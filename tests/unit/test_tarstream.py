"""The streamed base backup's tar reader: PostgreSQL's manifest checked file by file, hostile tars refused."""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from pgdr.errors import ChecksumMismatch
from pgdr.physical.tarstream import Manifest, compress_tar, read_tar, restore_tar


def _crc32c(data: bytes) -> str:
    import google_crc32c

    return struct.pack("=I", google_crc32c.value(data)).hex()


_WAL_RANGES = [{"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000120"}]


def _manifest(
    files: dict[str, bytes], algorithm: str = "CRC32C", system_identifier: int | None = None, wal_ranges=_WAL_RANGES
) -> bytes:
    listed = []
    for path, data in files.items():
        checksum = _crc32c(data) if algorithm == "CRC32C" else hashlib.sha256(data).hexdigest()
        raw = path.encode("utf-8", "surrogateescape")
        try:
            named = {"Path": raw.decode()}
        except UnicodeDecodeError:  # as PostgreSQL lists a name that is not UTF-8: its bytes in hex
            named = {"Encoded-Path": raw.hex()}
        listed.append({**named, "Size": len(data), "Checksum-Algorithm": algorithm, "Checksum": checksum})
    body = (
        '{ "PostgreSQL-Backup-Manifest-Version": 2,\n"Files": '
        + json.dumps(listed)
        + ',\n"WAL-Ranges": '
        + json.dumps(wal_ranges)
        + ",\n"
    ).encode()
    if system_identifier is not None:  # PostgreSQL 17+ (manifest version 2) names the cluster
        body = body.replace(b'"Files"', f'"System-Identifier": {system_identifier},\n"Files"'.encode(), 1)
    return body + f'"Manifest-Checksum": "{hashlib.sha256(body).hexdigest()}"}}\n'.encode()


def _tar(members: list[tuple[str, bytes | None]], manifest: bytes | None = None, kind=None, link=None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = kind or tarfile.DIRTYPE
                info.linkname = link or ""
                tar.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o600
                tar.addfile(info, io.BytesIO(data))
        if manifest is not None:
            info = tarfile.TarInfo("backup_manifest")
            info.size = len(manifest)
            tar.addfile(info, io.BytesIO(manifest))
    return out.getvalue()


FILES = {"PG_VERSION": b"18\n", "base/1/1259": bytes(range(256)) * 40, "global/pg_control": b"\x01" * 8192}


def _good() -> tuple[bytes, bytes]:
    manifest = _manifest(FILES)
    members = [("base", None), ("base/1", None), ("global", None), ("pg_wal", None)]
    return _tar(members + list(FILES.items()), manifest), manifest


def _record(size: int, sha256: str) -> SimpleNamespace:
    """What restore_tar reads of a base backup record: the stored tar's size and SHA-256."""
    return SimpleNamespace(size=size, sha256=sha256)


def test_a_good_tar_streams_compresses_and_extracts_as_postgresql_wrote_it(tmp_path):
    tar, manifest = _good()
    stored = io.BytesIO()
    got, size, sha256 = compress_tar(io.BytesIO(tar), stored, "the test backup")
    assert got.raw == manifest and set(got.files) == set(FILES) and got.wal_ranges[0]["Timeline"] == 1
    assert size == len(stored.getvalue()) and sha256 == hashlib.sha256(stored.getvalue()).hexdigest()

    entry = _record(size, sha256)
    restore_tar(io.BytesIO(stored.getvalue()), entry, Manifest(manifest, "x"), tmp_path / "out", "the test", "here")
    for name, data in FILES.items():
        assert (tmp_path / "out" / name).read_bytes() == data
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "out" / "backup_manifest").read_bytes() == manifest
    # the check alone extracts nothing; changed stored bytes fail on the record first
    restore_tar(io.BytesIO(stored.getvalue()), entry, Manifest(manifest, "x"), None, "the test", "here")
    changed = bytearray(stored.getvalue())
    changed[-5] ^= 0xFF
    with pytest.raises(ChecksumMismatch, match="does not match its base backup record"):
        restore_tar(io.BytesIO(bytes(changed)), entry, Manifest(manifest, "x"), tmp_path / "o2", "the test", "here")


def test_a_file_name_that_is_not_utf8_is_matched_by_its_encoded_path(tmp_path):
    # PostgreSQL lists such a file (an operator's file in the data directory) as "Encoded-Path", its bytes in hex
    odd = b"notes-caf\xe9.txt".decode("utf-8", "surrogateescape")
    files = {**FILES, odd: b"left by an operator\n"}
    manifest = _manifest(files)
    assert b'"Encoded-Path": "6e6f7465732d636166e92e747874"' in manifest
    tar = _tar([("base", None), ("base/1", None), ("global", None), *files.items()], manifest)
    stored = io.BytesIO()
    got, size, sha256 = compress_tar(io.BytesIO(tar), stored, "the test backup")
    assert odd in got.files

    entry = _record(size, sha256)
    restore_tar(io.BytesIO(stored.getvalue()), entry, got, tmp_path / "out", "the test", "here")
    assert (tmp_path / "out" / odd).read_bytes() == files[odd]


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda f: {**f, "PG_VERSION": b"17\n"}, '"PG_VERSION" has checksum'),
        (lambda f: {**f, "PG_VERSION": b"18.0\n"}, '"PG_VERSION" has size 5, the manifest says 3'),
        (lambda f: {k: v for k, v in f.items() if k != "global/pg_control"}, '"global/pg_control" is in the manifest'),
        (lambda f: {**f, "base/1/99999": b"x"}, '"base/1/99999" is in the backup but not in its manifest'),
    ],
)
def test_a_file_that_differs_from_the_manifest_is_named(change, problem):
    manifest = _manifest(FILES)
    tar = _tar([("base", None), ("base/1", None), *change(FILES).items()], manifest)
    with pytest.raises(ChecksumMismatch) as rejected:
        read_tar(io.BytesIO(tar), "base backup B")
    assert "The check against PostgreSQL's manifest rejected base backup B" in str(rejected.value)
    assert problem in str(rejected.value)
    with pytest.raises(ChecksumMismatch, match=problem.replace("(", r"\(")):  # the stored manifest given: the same
        read_tar(
            io.BytesIO(_tar([("base", None), ("base/1", None), *change(FILES).items()])), "B", Manifest(manifest, "B")
        )


SYSID = 7716226975105753894
SEGMENT = "pg_wal/000000010000000000000020"  # 1 MB segments: 0/2000028 is in segment 0x20 of timeline 1


def _segment(sysid: int = SYSID, address: int = 0x2000000, size: int = 1 << 20, info: int = 0x0002) -> bytes:
    """A WAL segment as PostgreSQL starts one: its long page header (XLogLongPageHeaderData), records after it."""
    header = struct.pack("=HHIQI4xQII", 0xD118, info, 1, address, 0, sysid, size, 8192)
    return header + random.Random(address).randbytes(4096) + bytes(size - len(header) - 4096)


def _with_wal(wal: dict[str, bytes], sysid: int | None = SYSID) -> tuple[bytes, bytes]:
    """A tar as ``pg_basebackup -X fetch`` writes it: the WAL after the files, unlisted; its .done marks listed."""
    listed = {**FILES, **{f"pg_wal/archive_status/{Path(n).name}.done": b"" for n in wal if ".history" not in n}}
    manifest = _manifest(listed, system_identifier=sysid)
    members = [("base", None), ("base/1", None), ("global", None), ("pg_wal", None), ("pg_wal/archive_status", None)]
    return _tar(
        members + list(FILES.items()) + list(wal.items()) + [(k, v) for k, v in listed.items() if k not in FILES],
        manifest,
    ), manifest


def test_an_incremental_carries_its_own_wal_checked_by_name_size_and_page_header(tmp_path):
    segment, history = _segment(), b"1\t0/1FFFFF8\tno recovery target specified\n"
    tar, manifest = _with_wal({SEGMENT: segment, "pg_wal/00000002.history": history})
    stored = io.BytesIO()
    got, size, sha256 = compress_tar(io.BytesIO(tar), stored, "the incremental")
    assert got.raw == manifest and SEGMENT not in got.files

    entry = _record(size, sha256)
    restore_tar(io.BytesIO(stored.getvalue()), entry, got, tmp_path / "out", "the incremental", "here")
    assert (tmp_path / "out" / SEGMENT).read_bytes() == segment
    assert (tmp_path / "out" / "pg_wal/00000002.history").read_bytes() == history
    assert (tmp_path / "out" / "pg_wal/archive_status/000000010000000000000020.done").exists()


@pytest.mark.parametrize(
    "wal, sysid, problem",
    [
        ({"pg_wal/000000010000000000000021": _segment(address=0x2100000)}, SYSID, "is not a WAL segment of the backup"),
        ({"pg_wal/000000020000000000000020": _segment()}, SYSID, "is not a WAL segment of the backup"),
        ({SEGMENT: _segment()[: 3 << 18]}, SYSID, "which is not a WAL segment size"),
        ({SEGMENT: _segment(sysid=SYSID + 1)}, SYSID, f"first page header says system identifier {SYSID + 1}"),
        ({SEGMENT: _segment(address=0x2100000)}, SYSID, "address 2100000, where this backup's segment would say"),
        ({SEGMENT: _segment(size=1 << 24)[: 1 << 20]}, SYSID, "segment size 16777216, address"),
        ({SEGMENT: _segment(info=0)}, SYSID, "its first page header says no long page header"),
        ({SEGMENT: _segment()}, None, "its manifest names no cluster"),
        (
            {"pg_wal/notes.txt": b"an operator's\n"},
            SYSID,
            '"pg_wal/notes.txt" is in the backup but not in its manifest',
        ),
        ({"pg_wal/00000002.history": b"x" * (2 << 20)}, SYSID, "more than a timeline history file holds"),
    ],
    ids=[
        "past its range",
        "another timeline",
        "not a segment size",
        "another cluster",
        "another address",
        "another segment size",
        "no long header",
        "no cluster named",
        "not WAL",
        "history too big",
    ],
)
def test_wal_that_is_not_the_backups_own_is_refused_before_or_after_its_manifest(tmp_path, wal, sysid, problem):
    tar, manifest = _with_wal(wal, sysid)
    with pytest.raises(ChecksumMismatch, match="rejected the incremental") as rejected:  # taken: the manifest last
        compress_tar(io.BytesIO(tar), io.BytesIO(), "the incremental")
    assert problem in str(rejected.value)
    with pytest.raises(ChecksumMismatch) as rejected:  # restored: the stored manifest first
        read_tar(io.BytesIO(tar), "the incremental", Manifest(manifest, "the incremental"), tmp_path / "out")
    assert problem in str(rejected.value)


def test_a_damaged_or_foreign_manifest_is_refused():
    manifest = _manifest(FILES)
    with pytest.raises(ChecksumMismatch, match="does not match its own checksum"):
        Manifest(manifest.replace(b'"Size": 3', b'"Size": 4'), "B")
    with pytest.raises(ChecksumMismatch, match="cannot be read"):
        Manifest(b"{not json", "B")
    with pytest.raises(ChecksumMismatch, match="cannot be read"):
        Manifest(json.dumps({"Files": [{"Path": "x", "Size": -1}], "WAL-Ranges": []}).encode(), "B")
    # while a backup is taken pgdr asks for CRC32C: a manifest with another algorithm is not the one asked for
    with pytest.raises(ChecksumMismatch, match="SHA256 checksum where pgdr asked for CRC32C"):
        read_tar(io.BytesIO(_tar(list(FILES.items()), _manifest(FILES, "SHA256"))), "B")
    # the stored manifest may be SHA-256 (checked as it says)
    sha = _manifest(FILES, "SHA256")
    read_tar(io.BytesIO(_tar(list(FILES.items()))), "B", Manifest(sha, "B"))
    # a tar holding another manifest than the one stored beside it
    with pytest.raises(ChecksumMismatch, match="not the one stored beside it"):
        read_tar(io.BytesIO(_tar(list(FILES.items()), manifest)), "B", Manifest(sha, "B"))
    with pytest.raises(ChecksumMismatch, match="has no backup_manifest"):
        read_tar(io.BytesIO(_tar(list(FILES.items()))), "B")


@pytest.mark.parametrize(
    "members, kind, link, problem",
    [
        ([("../escape", b"x")], None, None, "refused to extract"),
        ([("/etc/evil", b"x")], None, None, "not in its manifest"),  # the data filter makes it etc/evil, inside
        ([("out", None)], tarfile.SYMTYPE, "/etc/passwd", "refused to extract"),
        ([("up", None)], tarfile.SYMTYPE, "../../x", "refused to extract"),
        ([("dev", None)], tarfile.CHRTYPE, None, "which PostgreSQL does not write"),
        ([("hard", None)], tarfile.LNKTYPE, "PG_VERSION", "which PostgreSQL does not write"),
    ],
)
def test_a_hostile_tar_is_refused_and_writes_nothing_outside(tmp_path, members, kind, link, problem):
    tar = _tar(list(FILES.items()) + members, _manifest(FILES), kind, link)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ChecksumMismatch, match=problem):
        read_tar(io.BytesIO(tar), "B", Manifest(_manifest(FILES), "B"), dest)
    assert not (tmp_path / "escape").exists() and not (dest / "out").exists() and not (dest / "up").exists()
    assert not Path("/etc/evil").exists()


def test_a_cut_or_garbled_tar_says_so():
    tar, manifest = _good()
    for cut in (len(tar) // 2, 700, 100):
        with pytest.raises(ChecksumMismatch, match="is not a readable tar"):
            read_tar(io.BytesIO(tar[:cut]), "B", Manifest(manifest, "B"))
    garbled = bytearray(tar)
    garbled[148:156] = b"0000000\0"  # a header's checksum
    with pytest.raises(ChecksumMismatch, match="a damaged header"):
        read_tar(io.BytesIO(bytes(garbled)), "B", Manifest(manifest, "B"))


def test_crc32c_is_written_as_postgresql_writes_it(tmp_path: Path):
    """The hex of the 4 bytes of the CRC in the machine's order (real manifests: tests/scenarios/test_pitr*.py)."""
    from pgdr.physical.tarstream import _Crc32c

    crc = _Crc32c()
    crc.update(b"123456789")
    assert crc.hexdigest() == struct.pack("=I", 0xE3069283).hex()


def _writers(threading) -> list[str]:
    """The extraction's writer threads still alive (by name: the S3 server of other tests in this process starts and
    ends threads of its own at any moment, so a count of all threads says nothing)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("pgdr-extract-")]


def test_a_file_that_cannot_be_written_fails_the_extraction_and_stops_the_writers(tmp_path):
    import threading

    tar, manifest = _good()
    dest = tmp_path / "dest"
    (dest / "PG_VERSION").mkdir(parents=True)  # a directory where the file must go
    with pytest.raises(IsADirectoryError):
        read_tar(io.BytesIO(tar), "B", Manifest(manifest, "B"), dest)
    assert _writers(threading) == []  # no writer thread left behind


def test_extraction_by_two_writers_is_exact_many_times_over_under_load(tmp_path):
    """Many files of many sizes, extracted 40 times by four extractions at once (each with its two writer threads):
    every byte where it belongs, every time, and no thread left."""
    import os
    import random
    import threading
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(7)
    files = {f"base/{i // 50}/{i}": os.urandom(rng.choice([0, 1, 511, 4096, 70000, (1 << 20) + 3])) for i in range(300)}
    manifest = _manifest(files)
    dirs = sorted({name.rsplit("/", 1)[0] for name in files} | {"base"})
    tar = _tar([(d, None) for d in dirs] + list(files.items()), manifest)

    def extract(n: int) -> None:
        dest = tmp_path / f"x{n}"
        read_tar(io.BytesIO(tar), "B", Manifest(manifest, "B"), dest)
        for name, data in files.items():
            assert (dest / name).read_bytes() == data, (n, name)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(extract, range(40)))
    assert _writers(threading) == []


def test_a_restore_says_how_long_it_waited_for_the_bucket_and_for_the_disk(tmp_path, monkeypatch):
    """A slow bucket and a slow disk each show in their own wait, so a slow restore's report says which it was."""
    import time

    import pgdr.physical.tarstream as tarstream

    rng = random.Random(3)
    files = {f"base/1/{i}": rng.randbytes(300_000) for i in range(40)}  # 12 MB that zstd cannot shrink
    manifest = _manifest(files)
    stored = io.BytesIO()
    _, size, sha256 = compress_tar(
        io.BytesIO(_tar([("base", None), ("base/1", None)] + list(files.items()), manifest)), stored, "the test backup"
    )
    entry = type("Entry", (), {"size": size, "sha256": sha256})()

    class SlowBucket(io.BytesIO):
        def read(self, size=-1):
            time.sleep(0.01)
            return super().read(size)

    waits: dict[str, float] = {}
    restore_tar(
        SlowBucket(stored.getvalue()), entry, Manifest(manifest, "x"), tmp_path / "a", "the test", "here", waits
    )
    reads = -(-size // tarstream.CHUNK)  # at least this many reads of the stored bytes, each 10 ms late
    assert waits["bucket"] >= reads * 0.01 and waits["disk"] < waits["bucket"], waits

    real_run = tarstream._Writers._run

    def slow_disk(self, jobs):  # every chunk written 20 ms late: the writers' queues fill, the reader waits
        class Late:
            def get(self):
                time.sleep(0.02)
                return jobs.get()

            def __getattr__(self, name):
                return getattr(jobs, name)

        real_run(self, Late())

    monkeypatch.setattr(tarstream._Writers, "_run", slow_disk)
    waits = {}
    restore_tar(
        io.BytesIO(stored.getvalue()), entry, Manifest(manifest, "x"), tmp_path / "b", "the test", "here", waits
    )
    assert waits["disk"] > 0.1 and waits["disk"] > 5 * waits["bucket"], waits
    for name, data in files.items():
        assert (tmp_path / "b" / name).read_bytes() == data


def test_what_a_hostile_manifest_says_reaches_the_message_as_one_short_line():
    # The manifest comes from the bucket: its WAL-Ranges (or an error quoting them) must not forge log lines or
    # push the advice out of an alert.
    forged = "0/2000028\n" + "ERROR: the on-call must run rm -rf /\n" * 200

    def refusal(ranges) -> str:
        with pytest.raises(ChecksumMismatch) as rejected:
            Manifest(_manifest({}, system_identifier=1, wal_ranges=ranges), "the incremental").expect(SEGMENT, 1 << 20)
        return str(rejected.value)

    unreadable = refusal([{"Timeline": 1, "Start-LSN": forged, "End-LSN": "0/2000120"}])
    assert "its WAL-Ranges cannot be read" in unreadable
    elsewhere = refusal([{"Timeline": 1, "Start-LSN": "0/9000028", "End-LSN": "0/9000120", "Note": forged}])
    assert "is not a WAL segment of the backup's WAL ranges" in elsewhere
    for message in (unreadable, elsewhere):
        assert "\n" not in message and len(message) < 1000 and message.endswith("take a new full base backup.")
