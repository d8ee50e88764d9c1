"""pgdr_verify_restore with dag.test(): real restores, real corruption, real Great Expectations."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import backup_into_local_store, source_row_counts
from pgdr.records import VerificationRecord

pytestmark = pytest.mark.integration

TASKS = ["create_scratch", "restore_and_check", "validate_and_apply_privileges"]


def _scratch_databases(pg_server) -> list[str]:
    with psycopg.connect(**pg_server.dsn("postgres")) as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'pgdr\\_verify\\_%'")]


@pytest.fixture(scope="module")
def base_backup(tmp_path_factory, pg_server, airflow_db):
    """One real backup of the sample database, copied into each test's store as needed."""
    root = tmp_path_factory.mktemp("base-store")
    return root, backup_into_local_store(root, pg_server)


@pytest.fixture
def local_backup(plan, base_backup):
    """A plan on local storage holding a copy of the base backup; returns (plan, store root, backup id)."""
    p = plan()
    root = p.databases[0].storage.path
    shutil.copytree(base_backup[0] / "v1", root / "v1")
    return p, root, base_backup[1]


def _verify(run_dag, backup_id: str):
    return run_dag("pgdr_verify_restore", run_conf={"database": "shop", "backup_id": backup_id})


def _record(root, backup_id: str) -> dict:
    return json.loads((root / "v1" / "shop" / backup_id / "verification.json").read_text())


def test_backup_then_verify_on_s3(plan, run_dag, s3_server, s3_storage, pg_server, env, slack):
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    p = plan(storage=s3_storage)
    assert run_dag("pgdr_backup").states["protect_pgdr_shop.back_up[0]"] == "success"
    store, layout = open_store(p.databases[0].storage)
    catalog = BackupCatalog(store, layout, "shop")
    backup_id = catalog.latest().backup_id

    dag_run = _verify(run_dag, backup_id)
    assert all(dag_run.states[f"verify.{task}[0]"] == "success" for task in TASKS), dag_run.states
    assert dag_run.states["verify.drop_scratch[0]"] == "success"
    assert dag_run.states["verify.record_verification[0]"] == "success"

    entry = catalog.get(backup_id)
    assert entry.status == "verified"
    record = entry.verification
    assert record.integrity["rows_checked"] == sum(source_row_counts(pg_server, "shop").values())
    assert record.integrity["amcheck_ok"] is True
    assert record.validation["failed"] == 0 and record.validation["expectations"] > 40
    assert "include/gx/shop/orders.yaml" in record.validation["user_suites"]
    assert record.rto_met is True and 0 < record.restore_seconds < record.rto_target_seconds
    assert set(record.phases) == {
        "check_checksums",
        "restore_backup",
        "check_integrity",
        "validate_data",
        "apply_privileges",
    }
    # The GX results and the HTML report are stored next to the backup.
    results = json.loads(store.get_bytes(layout.validation_key("shop", backup_id, "results.json")))
    assert results["summary"]["failed"] == 0
    html = store.get_bytes(layout.validation_key("shop", backup_id, "report.html")).decode()
    assert "All expectations passed" in html and "sales.orders" in html
    # The scratch database is gone, and nothing was alerted.
    assert _scratch_databases(pg_server) == []
    assert slack.messages == []


def test_a_task_opens_each_storage_target_once(plan, s3_storage, monkeypatch):
    """find_backups reads the catalog of every database of the plan: opening the S3 target (an Airflow connection
    lookup and a boto3 client) once per database cost tenths of a second each; it is opened once per task."""
    from pgdr.airflow_glue import connections

    p = plan(storage=s3_storage)
    opened, real = [], connections.open_store

    def counted(target, plan=None, pruning=False):
        opened.append((target.name, pruning))
        return real(target, plan, pruning)

    monkeypatch.setattr(connections, "open_store", counted)
    res, target = connections.resources(p), p.databases[0].storage
    store, layout = res.store(target)
    assert res.store(target) == (store, layout) and res.store(target)[0] is store
    pruner = res.store(target, pruning=True)[0]
    assert res.store(target, pruning=True)[0] is pruner
    assert opened == [(target.name, False), (target.name, True)]
    assert connections.resources(p).store(target)[0] is not store  # the next task opens its own
    assert store.exists(layout.database_prefix("shop") + "none") is False  # and it works


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_flip_byte, "content changed: SHA-256"),
        (_truncate, "truncated:"),
        (lambda path: path.unlink(), "missing: the object does not exist"),
    ],
    ids=["byte-flipped", "truncated", "missing"],
)
def test_corrupt_backup_is_refused_at_checksum_time(local_backup, run_dag, pg_server, slack, damage, expected):
    p, root, backup_id = local_backup
    manifest = json.loads((root / "v1/shop" / backup_id / "manifest.json").read_text())
    victim = max(manifest["files"], key=lambda f: f["stored_size"])
    damage(root / victim["key"])

    dag_run = _verify(run_dag, backup_id)
    assert dag_run.states["verify.restore_and_check[0]"] == "failed"
    assert dag_run.tries["verify.restore_and_check"] == 1  # retrying cannot fix corruption
    assert dag_run.states["verify.validate_and_apply_privileges[0]"] == "upstream_failed"
    assert dag_run.states["verify.drop_scratch[0]"] == "success"
    assert dag_run.states["verify.record_verification[0]"] == "failed"  # keeps the run red
    assert _scratch_databases(pg_server) == []

    record = _record(root, backup_id)
    assert record["status"] == "failed" and record["failed_phase"] == "check_checksums"
    # One alert, from the failing phase, naming the backup and the bad file.
    assert len(slack.messages) == 1
    text = slack.texts()[0]
    assert f"Backup {backup_id} of database 'shop' is corrupt and was refused" in text
    assert victim["name"] in text and expected in text
    assert "`verify.restore_and_check`" in text
    # Verification never deletes a backup, even a corrupt one.
    assert (root / "v1/shop" / backup_id / "manifest.json").exists()


def test_failing_user_suite_names_the_expectation_and_table(
    local_backup, run_dag, pg_server, slack, monkeypatch, tmp_path
):
    p, root, backup_id = local_backup
    suites = tmp_path / "gx"
    (suites / "shop").mkdir(parents=True)
    (suites / "shop" / "strict.yaml").write_text(
        "table: sales.orders\nexpectations:\n  - type: expect_column_values_to_be_in_set\n    description: only "
        "paid orders (a rule the data violates)\n    kwargs: {column: status, value_set: [paid]}\n"
    )
    monkeypatch.setenv("PGDR_GX_SUITES", str(suites))

    dag_run = _verify(run_dag, backup_id)
    assert dag_run.states["verify.validate_and_apply_privileges[0]"] == "failed"
    assert dag_run.tries["verify.validate_and_apply_privileges"] == 1
    assert dag_run.states["verify.drop_scratch[0]"] == "success"
    assert _scratch_databases(pg_server) == []
    record = _record(root, backup_id)
    assert record["status"] == "failed" and record["failed_phase"] == "validate_data"
    text = slack.texts()[-1]
    assert "1 of" in text and "expectations failed" in text
    assert "only paid orders (a rule the data violates) on table sales.orders, column status" in text
    assert "unexpected values" in text
    # The report of the failed validation is stored too, for the engineer to open.
    html = (root / "v1/shop" / backup_id / "validation/report.html").read_text()
    assert "1 expectations FAILED" in html


def test_manifest_that_lies_about_row_counts_is_caught(local_backup, run_dag, slack):
    p, root, backup_id = local_backup
    path = root / "v1/shop" / backup_id / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["row_counts"]["sales.customers"] += 1
    path.write_text(json.dumps(manifest))

    dag_run = _verify(run_dag, backup_id)
    assert dag_run.states["verify.restore_and_check[0]"] == "failed"
    assert dag_run.tries["verify.restore_and_check"] == 1
    text = slack.texts()[-1]
    assert "table sales.customers: the backup counted 10001 rows, the restored table has 10000" in text
    assert _record(root, backup_id)["failed_phase"] == "check_integrity"


def test_leftover_scratch_database_of_a_killed_run_is_dropped_and_nothing_else(local_backup, run_dag, pg_server):
    from pgdr.postgres.client import PgEndpoint
    from pgdr.postgres.scratch import ScratchDatabase, scratch_comment, scratch_name

    server = PgEndpoint("127.0.0.1", pg_server.port, "postgres", "postgres", pg_server.password)
    leftover = ScratchDatabase(server, scratch_name("verify", "shop", "killed-run"))
    leftover.create(scratch_comment("verify shop backup x", "scheduled__killed"))
    # A look-alike that pgdr did not create (no marker): it must survive.
    bystander = "pgdr_verify_shop_handmade"
    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {bystander}")
    try:
        p, root, backup_id = local_backup
        dag_run = _verify(run_dag, backup_id)
        assert dag_run.states["verify.record_verification[0]"] == "success"
        assert not leftover.exists()
        assert _scratch_databases(pg_server) == [bystander]
    finally:
        with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {bystander}")


def test_unknown_backup_id_fails_clearly_before_touching_anything(local_backup, run_dag, pg_server, slack):
    dag_run = _verify(run_dag, "20200101T000000Z-abcdef")
    assert dag_run.states["find_backups"] == "failed"
    text = slack.texts()[-1]
    assert "No complete backup '20200101T000000Z-abcdef' of database 'shop'" in text
    assert "Newest backups:" in text
    assert _scratch_databases(pg_server) == []


def test_interval_without_backups_skips_cleanly(local_backup, run_dag):
    dag_run = run_dag("pgdr_verify_restore", logical_date=datetime.now(UTC) - timedelta(days=30))
    assert dag_run.states["find_backups"] == "skipped"
    assert str(dag_run.state) == "success"


def test_backup_of_pgdr_0_1_zstd_by_pgdr_still_verifies(plan, run_dag, pg_server, tmp_path, slack):
    """Backups written before pg_dump did the compressing (pgdr 0.1: ``-Z0`` files that pgdr packed
    with zstd, manifests without ``compressed_by``) must stay restorable: nothing already taken is lost."""
    import hashlib

    import zstandard

    p = plan()
    root = p.databases[0].storage.path
    backup_id = backup_into_local_store(root, pg_server, compression="none")
    folder = root / "v1/shop" / backup_id
    manifest = json.loads((folder / "manifest.json").read_text())
    assert not any(f["name"].endswith((".gz", ".zst")) for f in manifest["files"])  # none: plain files
    for entry in manifest["files"]:  # rewrite it the way pgdr 0.1 stored it
        packed = zstandard.ZstdCompressor(level=3, write_checksum=True).compress((root / entry["key"]).read_bytes())
        (root / entry["key"]).write_bytes(packed)
        entry.update(stored_size=len(packed), sha256=hashlib.sha256(packed).hexdigest())
    for key in ("compressed_by", "database_bytes", "size", "stored_size"):
        manifest.pop(key)
    manifest.update(compression="zstd", compression_level=3)
    (folder / "manifest.json").write_text(json.dumps(manifest))

    dag_run = _verify(run_dag, backup_id)
    assert all(dag_run.states[f"verify.{task}[0]"] == "success" for task in TASKS), dag_run.states
    record = _record(root, backup_id)
    assert record["status"] == "verified"
    assert record["integrity"]["rows_checked"] == sum(source_row_counts(pg_server, "shop").values())
    assert slack.messages == []


def test_backup_id_that_is_a_path_is_refused(local_backup, run_dag, pg_server, slack):
    _p, _root, backup_id = local_backup
    dag_run = _verify(run_dag, f"../billing/{backup_id}")
    assert dag_run.states["find_backups"] == "failed" and dag_run.tries["find_backups"] == 1
    assert f"'../billing/{backup_id}' is not a pgdr backup id" in slack.texts()[-1]
    assert _scratch_databases(pg_server) == []


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda m: m["files"][0].update(key="v1/billing/20200101T000000Z-abcdef/data/toc.dat"),
            "files[0].key is 'v1/billing/20200101T000000Z-abcdef/data/toc.dat', outside this backup's own data folder",
        ),
        (
            lambda m: m["files"][0].update(name="../../dags/x.py"),
            "files[0].name is '../../dags/x.py', not the name of a file pg_dump writes",
        ),
        (lambda m: m["files"][0].update(name="/opt/airflow/dags/x.py"), "files[0].name is '/opt/airflow/dags/x.py'"),
        (lambda m: m["files"][0].update(size=-1), "files[0].size is -1, not a whole number from 0"),
        (lambda m: m["files"][0].update(stored_size=10**19), "files[0].stored_size is 10000000000000000000"),
        (
            lambda m: m["row_counts"].update({"sales.orders": "30000"}),
            "row_counts['sales.orders'] is '30000', not a whole number",
        ),
        (lambda m: m["row_counts"].update({"sales.orders": 1.5}), "row_counts['sales.orders'] is 1.5"),
        (lambda m: m.pop("recovery_point"), "recovery_point is missing"),
        (
            lambda m: m.update(backup_id="20200101T000000Z-abcdef"),
            "backup_id is '20200101T000000Z-abcdef', but the manifest is stored as backup",
        ),
        (lambda m: m.update(files="toc.dat"), "files must be a non-empty list"),
    ],
    ids=[
        "key-outside-prefix",
        "name-with-dots",
        "absolute-name",
        "negative-size",
        "absurd-size",
        "count-not-int",
        "count-float",
        "missing-field",
        "other-backup-id",
        "files-not-a-list",
    ],
)
def test_manifest_edited_in_the_bucket_is_refused_before_anything_is_read(
    local_backup, run_dag, pg_server, slack, edit, message
):
    _p, root, backup_id = local_backup
    path = root / "v1" / "shop" / backup_id / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    dag_run = _verify(run_dag, backup_id)
    assert dag_run.states["find_backups"] == "failed" and dag_run.tries["find_backups"] == 1
    (alert,) = slack.texts()
    assert message in alert and "is damaged or not a pgdr manifest" in alert, alert
    assert _scratch_databases(pg_server) == []
    assert not (root / "v1" / "shop" / backup_id / "verification.json").exists()


def test_an_asset_triggered_run_also_takes_backups_whose_events_airflow_dropped(local_backup):
    """Airflow 3.3 can drop asset events of a burst (apache/airflow#56050): the run catches them up."""
    from types import SimpleNamespace

    from pgdr.logical.catalog import BackupCatalog
    from pgdr.storage.backends import LocalFolderStore
    from pgdr.storage.layout import BackupLayout
    from pgdr.tasks.verify import resolve_verification_targets
    from support import copy_backup_as

    plan, root, real_id = local_backup
    store, layout = LocalFolderStore(root), BackupLayout()
    catalog = BackupCatalog(store, layout, "shop")
    real = catalog.get(real_id)
    now = datetime.now(UTC)
    ids = {
        name: f"{(now - age):%Y%m%dT%H%M%S}Z-{name}"
        for name, age in [
            ("aaaaa1", timedelta(days=3)),
            ("bbbbb2", timedelta(hours=3)),
            ("ccccc3", timedelta(hours=2)),
            ("ddddd4", timedelta(minutes=5)),
            ("eeeee5", timedelta(minutes=4)),
        ]
    }
    for backup_id in ids.values():
        copy_backup_as(
            store,
            layout,
            real.manifest,
            backup_id,
            datetime.strptime(backup_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC),
            copy_data=False,
        )
    catalog.record_verification(VerificationRecord.from_dict({"backup_id": ids["ccccc3"], "status": "verified"}))
    shutil.rmtree(root / "v1" / "shop" / real_id)  # only the copies: their ages decide

    event = SimpleNamespace(extra={"database": "shop", "backup_id": ids["eeeee5"]})
    context = {"params": {}, "triggering_asset_events": {"pgdr_backups": [event]}}
    targets = resolve_verification_targets(context)
    # The event's backup, and the one taken after the newest verified one whose event never came;
    # not the one older than the verified one, nor one older than a day.
    assert sorted(t["backup_id"] for t in targets) == sorted([ids["ddddd4"], ids["eeeee5"]])
    # The next run, from the caught-up backup's own (late) event, does not verify it again.
    from pgdr.logical.catalog import BackupCatalog as Catalog

    Catalog(store, layout, "shop").record_verification(
        VerificationRecord.from_dict({"backup_id": ids["ddddd4"], "status": "verified", "airflow": {"run_id": "r1"}})
    )
    Catalog(store, layout, "shop").record_verification(
        VerificationRecord.from_dict({"backup_id": ids["eeeee5"], "status": "verified", "airflow": {"run_id": "r1"}})
    )
    late = SimpleNamespace(extra={"database": "shop", "backup_id": ids["ddddd4"]})
    from airflow.sdk.exceptions import AirflowSkipException

    with pytest.raises(AirflowSkipException, match="verified already"):
        resolve_verification_targets({"params": {}, "triggering_asset_events": {"pgdr_backups": [late]}})
