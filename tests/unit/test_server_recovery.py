"""The rules of a whole-server recovery that need no server: the data directory's state, --delta's sync, the
system identifier of a WAL segment and the check that keeps two clusters apart."""

from __future__ import annotations

import os
import struct
from types import SimpleNamespace

import pytest


def test_a_non_empty_data_directory_is_refused_without_delta(tmp_path):
    from pgdr.physical.server_recovery import ServerRecoveryRefused, check_data_directory

    assert check_data_directory(tmp_path / "new", delta=False) == "missing"
    (tmp_path / "empty").mkdir()
    assert check_data_directory(tmp_path / "empty", delta=False) == "empty"
    (tmp_path / "empty" / "PG_VERSION").write_text("18\n")
    with pytest.raises(ServerRecoveryRefused, match="is not empty.*--delta.*Nothing was changed"):
        check_data_directory(tmp_path / "empty", delta=False)
    assert check_data_directory(tmp_path / "empty", delta=True) == "not empty"


def test_a_data_directory_a_server_runs_on_is_refused_even_with_delta(tmp_path):
    from pgdr.physical.server_recovery import ServerRecoveryRefused, check_data_directory, running_postmaster

    (tmp_path / "postmaster.pid").write_text(f"{os.getpid()}\n{tmp_path}\n")
    assert running_postmaster(tmp_path) == os.getpid()
    with pytest.raises(ServerRecoveryRefused, match=f"pid {os.getpid()}.*is running on"):
        check_data_directory(tmp_path, delta=True)
    (tmp_path / "postmaster.pid").write_text("999999999\n")  # a stale file: no such process
    assert running_postmaster(tmp_path) is None


def test_delta_keeps_equal_files_replaces_changed_ones_and_removes_strays(tmp_path):
    from pgdr.physical.server_recovery import sync_delta

    source, target = tmp_path / "backup", tmp_path / "data"
    for root in (source, target):
        (root / "base" / "5").mkdir(parents=True)
    (source / "PG_VERSION").write_text("18\n")
    (target / "PG_VERSION").write_text("18\n")
    (source / "base" / "5" / "1259").write_bytes(b"a" * 100)
    (target / "base" / "5" / "1259").write_bytes(b"b" * 100)  # same size, other bytes
    (source / "global").mkdir()
    (source / "global" / "pg_control").write_bytes(b"c" * 10)  # missing in the target
    (target / "base" / "5" / "stray").write_text("x")
    (target / "old dir").mkdir()
    counts = sync_delta(source, target)
    assert counts == {"kept": 1, "replaced": 2, "removed": 2}
    assert (target / "base" / "5" / "1259").read_bytes() == b"a" * 100
    assert (target / "global" / "pg_control").read_bytes() == b"c" * 10
    assert not (target / "base" / "5" / "stray").exists() and not (target / "old dir").exists()
    assert not (source / "global" / "pg_control").exists()  # moved in (a rename), not copied: no double space


def _segment(path, sysid: int, long_header: bool = True):
    info = 0x0002 if long_header else 0
    header = struct.pack("<HHIQI4xQII", 0xD118, info, 1, 0, 0, sysid, 16 << 20, 8192)
    path.write_bytes(header + b"\0" * 100)
    return path


def test_the_system_identifier_is_read_from_a_segments_long_header(tmp_path):
    from pgdr.physical.archive import segment_system_identifier

    assert segment_system_identifier(_segment(tmp_path / "a", 7715013712044487469)) == "7715013712044487469"
    assert segment_system_identifier(_segment(tmp_path / "b", 1, long_header=False)) is None
    (tmp_path / "c").write_bytes(b"short")
    assert segment_system_identifier(tmp_path / "c") is None


def test_an_archive_of_another_cluster_is_refused_naming_both(tmp_path):
    from pgdr.physical.recovery import ArchiveOfAnotherCluster, check_same_cluster

    newest = SimpleNamespace(
        backup_id="20261203T095336Z-1295cb", record=SimpleNamespace(system_identifier="111", server="main")
    )
    segment = SimpleNamespace(name="000000010000000000000009")
    archive = SimpleNamespace(describe=lambda: "s3://bucket/prefix/pitr-v1/wal/main")
    check_same_cluster(segment, "111", newest, archive)
    check_same_cluster(segment, None, newest, archive)
    with pytest.raises(ArchiveOfAnotherCluster, match="system identifier 222.*by 111.*own name"):
        check_same_cluster(segment, "222", newest, archive)


def test_a_base_backup_of_a_rebuilt_server_is_refused():
    from pgdr.physical.basebackup import ForeignCluster, check_same_cluster

    newest = SimpleNamespace(backup_id="b1", record=SimpleNamespace(system_identifier="111"))
    check_same_cluster(SimpleNamespace(system_identifier="111"), newest, "main", "s3://b/p")
    check_same_cluster(SimpleNamespace(system_identifier="222"), None, "main", "s3://b/p")  # the first ever
    with pytest.raises(ForeignCluster, match="another cluster .system identifier 222"):
        check_same_cluster(SimpleNamespace(system_identifier="222"), newest, "main", "s3://b/p")


def test_the_pause_needs_a_moment(tmp_path):
    from pgdr.physical.server_recovery import ServerRecoveryRefused, plan_server_recovery

    with pytest.raises(ServerRecoveryRefused, match="--pause needs a moment"):
        plan_server_recovery(SimpleNamespace(name="main"), None, None, tmp_path / "d", tmp_path, pause=True)
