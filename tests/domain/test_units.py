"""Pure logic: key layout, retention decisions, alert wording, the backfill rule, local storage."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from pgdr.logical.backup import backfill_skip_reason
from pgdr.logical.catalog import BackupEntry, BackupManifest, PartialBackup
from pgdr.logical.retention import decide_retention
from pgdr.messages import ERROR_LIMIT, TaskFailure, failure_message, first_line, scrub_secrets, shorten
from pgdr.plan import RetentionPolicy
from pgdr.storage.backends import LocalFolderStore
from pgdr.storage.layout import BackupLayout, backup_id_time, is_backup_id, new_backup_id

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


# -- layout ---------------------------------------------------------------------------------------


def test_layout_keys_are_versioned_and_parse_back():
    layout = BackupLayout(prefix="team/pgdr/")
    backup_id = new_backup_id(datetime(2026, 11, 22, 9, 30, 5, tzinfo=UTC))
    assert backup_id.startswith("20261122T093005Z-") and is_backup_id(backup_id)
    assert backup_id_time(backup_id) == datetime(2026, 11, 22, 9, 30, 5, tzinfo=UTC)
    assert layout.manifest_key("shop", backup_id) == f"team/pgdr/v1/shop/{backup_id}/manifest.json"
    assert layout.data_key("shop", backup_id, "toc.dat") == f"team/pgdr/v1/shop/{backup_id}/data/toc.dat"
    assert layout.parse(layout.data_key("shop", backup_id, "3001.dat.gz")) == ("shop", backup_id, "data/3001.dat.gz")
    assert layout.parse("team/pgdr/v1/reports/drill.html") is None
    assert BackupLayout().manifest_key("shop", backup_id) == f"v1/shop/{backup_id}/manifest.json"
    assert new_backup_id(NOW) != new_backup_id(NOW)
    with pytest.raises(ValueError, match="not a pgdr backup id"):
        backup_id_time("latest")


# -- retention ------------------------------------------------------------------------------------


def _entry(days_old: float, status: str = "unverified", tag: str = "000000") -> BackupEntry:
    point = NOW - timedelta(days=days_old)
    backup_id = f"{point:%Y%m%dT%H%M%SZ}-{tag}"
    manifest = BackupManifest(
        backup_id=backup_id,
        database="shop",
        dbname="shop",
        recovery_point=point,
        started_at=point,
        finished_at=point,
        server_version="18.6",
        client_version="pg_dump 18.6",
        format="directory",
        compression="zstd",
        compression_level=3,
        dump_jobs=2,
        files=(),
        row_counts={},
        large_objects=0,
        storage="x",
    )
    return BackupEntry(manifest, status)


def test_manifests_say_who_compressed_and_old_ones_read_as_pgdr_0_1():
    """A manifest of pgdr 0.1 (no ``compressed_by``) must parse as files zstd-packed by pgdr, so that
    restores decompress them; a current one names pg_dump's compression and the database size."""
    from pgdr.logical.catalog import BackupFile

    legacy = replace(_entry(1).manifest, files=(BackupFile("toc.dat", "k0", 10, 8, "0" * 64),))
    raw = json.loads(legacy.to_json())
    raw.pop("compressed_by"), raw.pop("database_bytes")
    old = BackupManifest.from_json(json.dumps(raw).encode(), "old/manifest.json")
    assert old.compressed_by == "pgdr" and "by pgdr 0.1" in old.size_summary()

    files = (
        BackupFile("toc.dat", "k1", 2_000_000, 2_000_000, "a" * 64),
        BackupFile("3001.dat.gz", "k2", 1_200_000, 1_200_000, "b" * 64),
    )
    current = replace(
        legacy,
        compression="gzip:1",
        compression_level=None,
        compressed_by="pg_dump",
        database_bytes=52_000_000,
        files=files,
    )
    again = BackupManifest.from_json(current.to_json(), "new/manifest.json")
    assert again == current
    assert again.size_summary() == "3.2 MB stored (gzip:1), from a 52.0 MB database"


def test_retention_keeps_newest_n_and_young_ones():
    backups = [_entry(d) for d in (0.1, 1, 2, 3, 10, 20)]
    decision = decide_retention(backups, [], RetentionPolicy(keep_last=2, keep_days=5), NOW)
    kept = {b.backup_id for b in backups[:4]}
    assert set(decision.keep) == kept
    assert set(decision.delete) == {backups[4].backup_id, backups[5].backup_id}
    assert "10 days old" in decision.delete[backups[4].backup_id]


def test_retention_never_deletes_the_newest_verified_backup():
    backups = [_entry(0.1, "failed"), _entry(40, "verified"), _entry(50, "verified"), _entry(60)]
    decision = decide_retention(backups, [], RetentionPolicy(keep_last=1, keep_days=1), NOW)
    assert decision.keep[backups[1].backup_id] == "the newest verified backup"
    assert set(decision.delete) == {backups[2].backup_id, backups[3].backup_id}


def test_retention_removes_only_stale_partial_uploads():
    old = PartialBackup("20261120T000000Z-aaaaaa", ("k",), NOW - timedelta(days=2))
    fresh = PartialBackup("20261122T113000Z-bbbbbb", ("k",), NOW - timedelta(minutes=30))
    decision = decide_retention([], [old, fresh], RetentionPolicy(partial_grace=timedelta(hours=6)), NOW)
    assert list(decision.delete_partial) == [old.backup_id]


def test_retention_of_empty_catalog_is_a_no_op():
    decision = decide_retention([], [], RetentionPolicy(), NOW)
    assert not decision.keep and not decision.delete and not decision.delete_partial


# -- backfill rule ----------------------------------------------------------------------------------


def test_backfill_and_past_manual_runs_skip_but_late_scheduled_runs_back_up():
    reason = backfill_skip_reason("backfill", NOW - timedelta(days=3), NOW)
    assert "backfill run for 2026-11-19 12:00 UTC" in reason and "does not label a fresh dump" in reason
    assert "past logical date" in backfill_skip_reason("manual", NOW - timedelta(days=1), NOW)
    assert backfill_skip_reason("manual", NOW - timedelta(seconds=5), NOW) is None
    assert backfill_skip_reason("manual", None, NOW) is None
    # A scheduled run that starts two days late still backs up: a late backup beats none.
    assert backfill_skip_reason("scheduled", NOW - timedelta(days=2), NOW) is None


# -- alerts -----------------------------------------------------------------------------------------


def test_failure_message_names_everything_an_on_call_engineer_needs():
    failure = TaskFailure(
        dag_id="pgdr_backup",
        task_id="protect_pgdr_shop.back_up",
        run_id="scheduled__2026-11-22T09:00:00+00:00",
        database="shop",
        backup_id=None,
        error="Cannot connect to database 'shop' at db1:5432",
        try_number=4,
        max_tries=4,
        log_url="http://airflow:8080/dags/pgdr_backup/runs/x/tasks/protect_pgdr_shop.back_up",
    )
    text = failure_message(failure)
    assert (
        text.splitlines()[0]
        == ":red_circle: [pgdr] pgdr_backup for database *shop* failed in phase `protect_pgdr_shop.back_up`"
    )
    assert "Error: Cannot connect to database 'shop' at db1:5432" in text
    assert "Attempt 4 of 4: no more retries; act now." in text
    assert "Log: http://airflow:8080/dags/pgdr_backup/runs/x/tasks/protect_pgdr_shop.back_up" in text


def test_secrets_are_scrubbed_from_error_lines():
    assert scrub_secrets("postgresql://app:s3cr3t@db:5432/shop") == "postgresql://app:********@db:5432/shop"
    assert "hunter2" not in scrub_secrets("connect failed password=hunter2 host=db")
    assert first_line(RuntimeError("\n\nfirst\nsecond")) == "first"
    assert first_line(None).startswith("no error was recorded")
    assert len(first_line("x" * 1000)) == ERROR_LIMIT


def test_a_long_error_keeps_its_start_and_its_advice():
    """A long path or server message in the middle must not push 'what to do' out of the alert."""
    line = "pg_dump of database 'shop' failed: " + " ".join(["/very/long/path/segment"] * 60) + " Fix: set X."
    short = shorten(line)
    assert len(short) <= ERROR_LIMIT
    assert short.startswith("pg_dump of database 'shop' failed:") and short.endswith("Fix: set X.")
    assert "[...]" in short
    assert shorten("short and sweet") == "short and sweet"
    assert len(shorten("y" * 5000)) <= ERROR_LIMIT  # no spaces to cut at: still bounded


@pytest.mark.parametrize("tool", ["pg_dump", "pg_restore"])
def test_compression_advice_survives_a_long_client_path(tmp_path, monkeypatch, tool):
    """CI found this: a deep install path cut the advice off the alert. It must fit whatever the path."""
    from pgdr.errors import CompressionUnsupported, DumpFailed
    from pgdr.postgres.client import PG_BIN_ENV_VAR, PgEndpoint, tool_error

    bin_dir = tmp_path.joinpath(*["a-rather-deep-folder-name"] * 12, "bin")
    bin_dir.mkdir(parents=True)
    (bin_dir / tool).write_text("#!/bin/sh\n")
    (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv(PG_BIN_ENV_VAR, str(bin_dir))
    endpoint = PgEndpoint("db1", 5432, "app", "shop", "s3cr3t")
    stderr = f"{tool}: error: this build does not support compression with zstd\n"
    error = tool_error(endpoint, f"{tool} of database 'shop'", stderr, DumpFailed)
    assert isinstance(error, CompressionUnsupported)
    text = first_line(error)
    assert len(text) <= ERROR_LIMIT and "has no zstd compression" in text and "PGDR_PG_BIN" in text
    assert "Retrying cannot fix this." in text and "s3cr3t" not in text
    assert f"(.../a-rather-deep-folder-name/bin/{tool})" in text
    assert f"Client used: {bin_dir / tool}" in str(error)  # the task log has the whole path
    if tool == "pg_dump":
        assert "compression: gzip:1" in text
    else:  # the plan cannot help an existing zstd backup: the message must not send anyone there
        assert "compression: gzip:1" not in text and "changes new backups only" in text


# -- local storage ------------------------------------------------------------------------------------


def test_local_store_writes_atomically_lists_and_deletes(tmp_path):
    store = LocalFolderStore(tmp_path / "store")
    store.put_bytes("v1/shop/a/manifest.json", b"{}")
    (tmp_path / "store/v1/shop/a/.x.partial").write_bytes(b"in flight")
    assert [o.key for o in store.list("v1/shop/")] == ["v1/shop/a/manifest.json"]
    assert store.exists("v1/shop/a/manifest.json") and store.get_bytes("v1/shop/a/manifest.json") == b"{}"
    store.delete(["v1/shop/a/manifest.json", "v1/shop/a/missing"])
    assert not store.exists("v1/shop/a/manifest.json")
    with pytest.raises(ValueError, match="escapes the storage folder"):
        store.put_bytes("../outside", b"x")
    with pytest.raises(FileNotFoundError):
        store.get_bytes("v1/none")


# -- RPO from the catalog ---------------------------------------------------------------------------


def test_rpo_worst_gap_and_newest_verified_age():
    from pgdr.drill import rpo_metrics

    backups = [
        _entry(40, "verified", "aaaaaa"),  # before the window: its gap into the window counts
        _entry(29, "verified", "bbbbbb"),
        _entry(28.5, "unverified", "cccccc"),
        _entry(20, "failed", "dddddd"),  # a failed verification is not a successful backup
        _entry(10, "verified", "eeeeee"),
        _entry(0.5, "unverified", "ffffff"),
    ]
    rpo = rpo_metrics(backups, NOW)
    assert rpo["worst_gap_s"] == timedelta(days=18.5).total_seconds()  # 28.5 days to 10 days ago
    assert rpo["worst_gap_between"] == [backups[2].backup_id, backups[4].backup_id]
    assert rpo["newest_verified_age_s"] == timedelta(days=10).total_seconds()
    assert rpo["newest_verified"] == backups[4].backup_id
    assert rpo["newest_backup_age_s"] == timedelta(days=0.5).total_seconds()
    assert rpo["backups_in_window"] == 4


def test_rpo_of_an_empty_catalog():
    from pgdr.drill import rpo_metrics

    rpo = rpo_metrics([], NOW)
    assert rpo["newest_verified_age_s"] is None and rpo["worst_gap_s"] is None


def test_drill_verdict_turns_breaches_into_action_items():
    from pgdr.drill import evaluate

    phases = [
        {
            "name": "checksum",
            "started_at": "2026-11-22T10:00:00+00:00",
            "finished_at": "2026-11-22T10:00:01+00:00",
            "seconds": 1,
        },
        {
            "name": "validation",
            "started_at": "2026-11-22T10:00:30+00:00",
            "finished_at": "2026-11-22T10:01:00+00:00",
            "seconds": 30,
        },
    ]
    rpo = {"newest_verified_age_s": 7200.0, "worst_gap_s": 90000.0, "worst_gap_between": ["a", "b"]}
    result = evaluate("shop", 30.0, 3600.0, phases, rpo, {"rejected": False}, None, None, "x")
    assert result["status"] == "fail"
    assert result["checks"]["rto"]["achieved_s"] == 60.0 and result["checks"]["rto"]["met"] is False
    items = "\n".join(result["action_items"])
    assert "restore took 1m 00s, over the RTO of 30.0s" in items
    assert "the newest verified backup was 2h 00m old, over the RPO of 1h 00m" in items
    assert "passed between backups a and b" in items
    assert "the negative control was NOT rejected" in items


# -- identifiers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, schema, name",
    [
        ("sales.orders", "sales", "orders"),
        ("Sales.Orders", "sales", "orders"),  # unquoted names fold to lower case, as in SQL
        ('"Sales Dept"."Customer Accounts"', "Sales Dept", "Customer Accounts"),
        ('public."order"', "public", "order"),
        ('"a.b".c', "a.b", "c"),
        ('a."b.c"', "a", "b.c"),
        ('"quote""s"."ta""ble"', 'quote"s', 'ta"ble'),
        ('"-dash"."-table"', "-dash", "-table"),
        ('ünï."tëst 🎉"', "ünï", "tëst 🎉"),
        (' "%pct {x}:y" . "100% {done}:now" ', "%pct {x}:y", "100% {done}:now"),
    ],
)
def test_table_names_are_read_as_sql_writes_them_and_written_back_the_same(text, schema, name):
    from pgdr.identifiers import QualifiedName, parse_qualified_name

    parsed = parse_qualified_name(text)
    assert parsed == QualifiedName(schema, name)
    assert parse_qualified_name(str(parsed)) == parsed  # the key round-trips


def test_keys_are_quoted_exactly_where_postgresql_quotes():
    from pgdr.identifiers import legacy_table_key, table_key

    assert table_key("sales", "orders") == "sales.orders"
    assert table_key("public", "order") == 'public."order"'
    assert table_key("a.b", "c") == '"a.b".c' != table_key("a", "b.c") == 'a."b.c"'
    assert table_key("Sales Dept", 'Say "hi"') == '"Sales Dept"."Say ""hi"""'
    # manifests of pgdr 0.1/0.2 keyed tables as schema.table, unquoted
    assert legacy_table_key("sales.orders") == "sales.orders"
    assert legacy_table_key("Sales Dept.Customer Accounts") == '"Sales Dept"."Customer Accounts"'


@pytest.mark.parametrize(
    "text, problem",
    [
        ("orders", "names no schema"),
        ("a.b.c", "has 3 parts"),
        ('sales."orders', "never closed"),
        ('sales.""', "empty quoted name"),
        ("sales.", "ends with a dot"),
        ("sales.ord ers", "has ' ' after ord"),
        ("sales.ord\x00ers", "NUL"),
        ("sales." + "x" * 64, "longer than PostgreSQL's 63 bytes"),
        ("-dash.t", "where a name should start"),
    ],
)
def test_unreadable_table_names_say_how_to_write_them(text, problem):
    from pgdr.identifiers import InvalidIdentifier, parse_qualified_name

    with pytest.raises(InvalidIdentifier, match="double-quoting a part") as info:
        parse_qualified_name(text)
    assert problem in str(info.value)


def test_client_tools_get_databases_as_quoted_connection_strings():
    from pgdr.identifiers import conninfo, unicode_identifier

    assert conninfo("h", 5432, "u", "we*ird.na\"me=x -y 'q' \\") == (
        "host='h' port='5432' user='u' dbname='we*ird.na\"me=x -y \\'q\\' \\\\'"
    )
    assert unicode_identifier("a%b:{c} 🎉") == 'U&"a\\0025b\\003a\\007bc\\007d\\0020\\+01f389"'


# -- user suites ---------------------------------------------------------------------------------------


def _suite_manifest():
    return replace(_entry(1).manifest, row_counts={'"Sales Dept"."Customer Accounts"': 3, "sales.orders": 2})


@pytest.mark.parametrize(
    "text, message",
    [
        ("- a\n- b\n", "expected a mapping with 'table' and 'expectations'"),
        ("table: sales.nope\nexpectations: [{type: expect_table_row_count_to_equal}]\n", "got 'sales.nope'"),
        ('table: "Sales Dept.Customer Accounts"\nexpectations: [{type: x}]\n', "has ' ' after"),
        ("table: sales.orders\nexpectations: [{type: expect_x, kwargs: [1, 2]}]\n", "kwargs must be a mapping"),
        ("table: sales.orders\nexpectations: [{kwargs: {}}]\n", "expectations[0] needs a 'type'"),
        ("table: sales.orders\nexpectations: []\n", "'expectations' must be a non-empty list"),
        ("table: [sales.orders\n", "is not valid YAML"),
    ],
)
def test_bad_suite_files_name_the_file_and_what_to_fix(tmp_path, monkeypatch, text, message):
    from pgdr.checks.validation import SuiteError, load_user_suites

    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "bad.yaml").write_text(text)
    monkeypatch.setenv("PGDR_GX_SUITES", str(tmp_path))
    with pytest.raises(SuiteError) as info:
        load_user_suites("shop", _suite_manifest())
    assert message in str(info.value) and "bad.yaml" in str(info.value)


def test_suites_name_quoted_tables_as_sql_does(tmp_path, monkeypatch):
    from pgdr.checks.validation import load_user_suites

    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "accounts.yaml").write_text(
        'table: \'"Sales Dept"."Customer Accounts"\'\nexpectations: [{type: expect_table_row_count_to_equal, kwargs: '
        "{value: 3}}]\n"
    )
    monkeypatch.setenv("PGDR_GX_SUITES", str(tmp_path))
    (spec,) = load_user_suites("shop", _suite_manifest())
    assert spec.table == '"Sales Dept"."Customer Accounts"'


def test_unknown_expectation_type_names_the_suite_and_the_type():
    from pgdr.checks.validation import ExpectationSpec, SuiteError, _build_expectation

    with pytest.raises(
        SuiteError, match="include/gx/shop/x.yaml: expectation 'expect_nothing_ever' on sales.orders is not valid"
    ):
        _build_expectation(ExpectationSpec("sales.orders", "expect_nothing_ever", {}, "include/gx/shop/x.yaml"), 0)


def test_a_pgdr_0_1_file_that_decompresses_past_its_size_is_cut_at_the_size(tmp_path):
    """6 KB stored that would decompress to 200 MB: refused once the output passes the manifest's
    size, with no more than that written to disk."""
    import hashlib

    import zstandard
    from pgdr.errors import ChecksumMismatch
    from pgdr.logical.catalog import BackupFile
    from pgdr.logical.restore import download_backup
    from pgdr.storage.backends import LocalFolderStore
    from pgdr.storage.layout import BackupLayout

    store, layout = LocalFolderStore(tmp_path / "store"), BackupLayout()
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * 200_000_000)
    manifest = replace(_entry(1).manifest, compressed_by="pgdr")
    key = layout.data_key("shop", manifest.backup_id, "toc.dat.zst")
    store.put_bytes(key, bomb)
    manifest = replace(manifest, files=(BackupFile("toc.dat", key, 1000, len(bomb), hashlib.sha256(bomb).hexdigest()),))
    with pytest.raises(ChecksumMismatch, match="decompresses to more than the 1000 bytes the manifest says"):
        download_backup(manifest, store, tmp_path / "dump")
    assert (tmp_path / "dump" / "toc.dat").stat().st_size <= 1000


def test_bounded_map_keeps_few_calls_waiting_and_keeps_order():
    import threading

    from pgdr.parallel import bounded_map

    waiting, most = 0, 0
    lock = threading.Lock()

    def slow(item):
        nonlocal waiting, most
        with lock:
            waiting += 1
            most = max(most, waiting)
        import time

        time.sleep(0.001)
        with lock:
            waiting -= 1
        return item * 2

    assert bounded_map(slow, range(2000), 4, "t") == [i * 2 for i in range(2000)]
    assert most <= 4


def test_passwords_with_line_breaks_are_refused_clearly(tmp_path):
    from pgdr.errors import PermanentFailure
    from pgdr.postgres.client import PgEndpoint, passfile_env

    endpoint = PgEndpoint("h", 5432, "u", "d", "two\nlines", conn_id="pgdr_shop")
    with pytest.raises(PermanentFailure, match="'pgdr_shop' contains a line break"):
        with passfile_env(endpoint, tmp_path):
            pass


def test_client_tools_see_none_of_the_workers_secrets(tmp_path, monkeypatch):
    from pgdr.postgres.client import PgEndpoint, passfile_env

    monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3", "secret-conn")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-key")
    monkeypatch.setenv("PGPASSWORD", "secret-pg")
    with passfile_env(PgEndpoint("h", 5432, "u", "d", "pw"), tmp_path) as env:
        assert "secret" not in json.dumps(env)
        assert env["PGPASSFILE"].startswith(str(tmp_path)) and "PATH" in env


def test_negative_control_skips_empty_files():
    from pgdr.drill import control_file
    from pgdr.logical.catalog import BackupFile

    files = (
        BackupFile("3001.dat", "k1", 0, 0, "0" * 64),
        BackupFile("toc.dat", "k2", 9, 9, "1" * 64),
        BackupFile("3002.dat", "k3", 5, 5, "2" * 64),
    )
    assert control_file(files).name == "3002.dat"


def test_a_retry_finds_only_its_own_dags_backup(tmp_path):
    """pgdr_drill and pgdr_backup share scheduled run ids at 03:00 on the 1st."""
    from pgdr.logical.catalog import BackupCatalog, BackupFile
    from pgdr.storage.backends import LocalFolderStore
    from pgdr.storage.layout import BackupLayout

    store, layout = LocalFolderStore(tmp_path), BackupLayout()
    manifest = _entry(1).manifest
    key = layout.data_key("shop", manifest.backup_id, "toc.dat")
    manifest = replace(
        manifest,
        files=(BackupFile("toc.dat", key, 1, 1, "0" * 64),),
        airflow={"dag_id": "pgdr_drill", "run_id": "scheduled__2026-12-01T03:00:00+00:00"},
    )
    catalog = BackupCatalog(store, layout, "shop")
    catalog.write_manifest(manifest)
    assert catalog.find_by_run("pgdr_backup", "scheduled__2026-12-01T03:00:00+00:00") is None
    assert catalog.find_by_run("pgdr_drill", "scheduled__2026-12-01T03:00:00+00:00").backup_id == manifest.backup_id


def test_a_scan_reads_the_records_side_by_side_and_finds_what_a_scan_one_by_one_found(tmp_path):
    """A week of hourly backups is 336 records: read one after another from a bucket that is hundreds of round
    trips. They are read a few at a time (never more than CATALOG_READERS); the result is the same: complete
    backups oldest first, the damaged ones left out and named in backup order, partial uploads listed."""
    import threading
    import time

    from pgdr.logical.catalog import CATALOG_READERS, BackupCatalog, BackupFile
    from pgdr.records import VerificationRecord

    class SlowStore(LocalFolderStore):  # a bucket's round trip, counted
        reading, most = 0, 0
        lock = threading.Lock()

        def get_bytes(self, key: str) -> bytes:
            with self.lock:
                SlowStore.reading += 1
                SlowStore.most = max(SlowStore.most, SlowStore.reading)
            try:
                time.sleep(0.01)
                return super().get_bytes(key)
            finally:
                with self.lock:
                    SlowStore.reading -= 1

    store, layout = SlowStore(tmp_path), BackupLayout()
    catalog = BackupCatalog(store, layout, "shop")
    entries = [_entry(n / 24, tag=f"{n:06x}") for n in range(60)]
    for entry in entries:
        key = layout.data_key("shop", entry.backup_id, "toc.dat")
        catalog.write_manifest(replace(entry.manifest, files=(BackupFile("toc.dat", key, 10, 10, "0" * 64),)))
    verified = entries[5].manifest
    catalog.record_verification(
        VerificationRecord.from_dict({"status": "verified", "backup_id": verified.backup_id, "phases": {}})
    )
    broken, unreadable = entries[7].backup_id, entries[40].backup_id
    store.put_bytes(layout.manifest_key("shop", broken), b"{not a manifest")
    store.put_bytes(layout.verification_key("shop", unreadable), b"not json")
    partial = "20261122T115900Z-ffffff"
    store.put_bytes(layout.data_key("shop", partial, "toc.dat"), b"half")

    complete, partials = catalog.scan()

    assert [e.backup_id for e in complete] == sorted(e.backup_id for e in entries if e.backup_id != broken)
    assert {e.backup_id: e.status for e in complete}[verified.backup_id] == "verified"
    assert {e.backup_id: e.status for e in complete}[unreadable] == "unverified"
    assert [d.backup_id for d in catalog.damaged] == sorted([broken, unreadable])
    assert [p.backup_id for p in partials] == [partial]
    assert 1 < SlowStore.most <= CATALOG_READERS


def test_an_extension_the_server_has_not_installed_is_named_with_what_to_do():
    """pg_restore's own words (PostgreSQL 18) for an extension without a control file on the target server."""
    from pgdr.errors import PermanentFailure
    from pgdr.logical.restore import RestoreFailed
    from pgdr.postgres.client import PgEndpoint, tool_error

    stderr = (
        'pg_restore: error: could not execute query: ERROR:  extension "Ünknown" is not available\n'
        "HINT:  The extension must first be installed on the system where PostgreSQL is running.\n"
        'Command was: CREATE EXTENSION IF NOT EXISTS "Ünknown" WITH SCHEMA public;\n'
    )
    error = tool_error(
        PgEndpoint("db1", 5432, "pgdr_restore", "shop", "s3cr3t"), "pg_restore into 'x'", stderr, RestoreFailed
    )
    assert isinstance(error, PermanentFailure)
    text = str(error)
    assert "needs the extension 'Ünknown', which the server at db1:5432 has not installed" in text
    assert "Install its package there" in text and "Retrying cannot fix this." in text and "s3cr3t" not in text


def test_a_foreign_server_the_restore_role_may_not_create_says_what_to_do():
    """pg_restore's own words (PostgreSQL 18) for CREATE SERVER as a role without USAGE on the wrapper."""
    from pgdr.errors import PermanentFailure
    from pgdr.logical.restore import RestoreFailed
    from pgdr.postgres.client import PgEndpoint, tool_error

    stderr = (
        "pg_restore: error: could not execute query: ERROR:  permission denied for foreign-data wrapper postgres_fdw\n"
        "Command was: CREATE SERVER other FOREIGN DATA WRAPPER postgres_fdw OPTIONS (\n    host 'x'\n);\n"
    )
    endpoint = PgEndpoint("db1", 5432, "pgdr_restore", "shop", "s3cr3t")
    text = str(tool_error(endpoint, "pg_restore into 'x'", stderr, RestoreFailed))
    assert "foreign servers of the foreign-data wrapper 'postgres_fdw'" in text
    assert "restore_as_superuser: true" in text and "Retrying cannot fix this." in text and "s3cr3t" not in text
    assert isinstance(tool_error(endpoint, "x", stderr, RestoreFailed), PermanentFailure)


def test_an_expectation_that_errs_is_reported_by_its_errors_first_line():
    from pgdr.checks.validation import _exception_message

    sqlalchemy = (
        '(psycopg2.errors.DataCorrupted) invalid page in block 1 of relation "base/1/2"\n\n'
        '[SQL: SELECT min(id) AS "column.min" \nFROM (SELECT * FROM t) AS anon_1]\n'
        "(Background on this error at: https://sqlalche.me/e/21/2j85)"
    )
    first = '(psycopg2.errors.DataCorrupted) invalid page in block 1 of relation "base/1/2"'
    assert _exception_message({"column.min": {"exception_message": sqlalchemy}}) == first
    assert _exception_message({"raised_exception": True, "exception_message": "\n" + sqlalchemy}) == first
    assert _exception_message({"raised_exception": True, "exception_message": None}) == "error"
    assert _exception_message({"raised_exception": False}) is None and _exception_message(None) is None
