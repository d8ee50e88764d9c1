"""The DR plan: valid plans load with the right values; every mistake gets a message that points at it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pgdr.errors import PlanError
from pgdr.plan import DEFAULT_PLAN_PATH, load_plan, parse_plan

GOOD = """\
version: 1
backup:
  schedule: "0 * * * *"
  retries: 2
storage:
  local: {type: local, path: ./backups}
  s3: {type: s3, bucket: my-bucket, prefix: /pgdr/, aws_conn_id: pgdr_s3}
defaults:
  rpo: 1h
  rto: 30m
  retention: {keep_last: 5}
  notify: {slack_conn_id: pgdr_slack}
databases:
  - name: shop
    conn_id: pgdr_shop
  - name: billing
    conn_id: pgdr_billing
    dbname: billing_prod
    storage: s3
    rpo: 15m
    retention: {keep_days: 30}
    notify: {email_to: [dba@example.com]}
"""


def _error(text: str) -> str:
    with pytest.raises(PlanError) as info:
        parse_plan(text, Path("/etc/pgdr/plan.yaml"))
    return str(info.value)


def test_good_plan_resolves_defaults_and_overrides():
    plan = parse_plan(GOOD, Path("/etc/pgdr/plan.yaml"))
    assert plan.backup_schedule == "0 * * * *" and plan.retries == 2
    shop, billing = plan.databases
    assert shop.dbname == "shop" and shop.storage.kind == "local"
    assert shop.storage.path == Path("/etc/pgdr/backups")  # relative to the plan file
    assert shop.rpo == timedelta(hours=1) and shop.rto == timedelta(minutes=30)
    assert shop.retention.keep_last == 5 and shop.retention.keep_days == 14
    assert billing.dbname == "billing_prod" and billing.rpo == timedelta(minutes=15)
    assert billing.storage.describe() == "s3://my-bucket/pgdr"
    # Overrides merge field by field into the defaults.
    assert billing.retention.keep_last == 5 and billing.retention.keep_days == 30
    assert billing.notify.slack_conn_id == "pgdr_slack" and billing.notify.email_to == ("dba@example.com",)
    assert billing.verify_conn_id == "pgdr_billing"
    assert plan.database("billing") is billing
    assert plan.notifications_for("unknown").slack_conn_id == "pgdr_slack"


@pytest.mark.parametrize(
    "given, spec",
    [
        (None, "gzip:1"),
        ("gzip", "gzip"),
        ("GZIP:9", "gzip:9"),
        ("zstd:3", "zstd:3"),
        ("lz4", "lz4"),
        ("none", "none"),
        ("0", "none"),
        ("false", "none"),
    ],
)
def test_compression_is_pg_dumps_spec_with_gzip_1_by_default(given, spec):
    text = GOOD if given is None else GOOD.replace("rpo: 15m", f"compression: {given}")
    shop, billing = parse_plan(text, Path("/etc/pgdr/plan.yaml")).databases
    assert shop.compression == "gzip:1" and billing.compression == spec


def test_shipped_plan_is_valid():
    plan = load_plan(DEFAULT_PLAN_PATH)
    assert plan.database_names == ["shop"]
    assert plan.databases[0].storage.kind == "local"


@pytest.mark.parametrize(
    "bad, expected",
    [
        # a typo in a key, with a suggestion and the line
        (
            GOOD.replace("rpo: 15m", "rop: 15m"),
            "/etc/pgdr/plan.yaml, line 20: databases[1] (billing).rop: unknown key. Did you mean 'rpo'?",
        ),
        (
            GOOD.replace("keep_last: 5", "keep_last: five"),
            "line 11: defaults.retention.keep_last: expected a whole number of at least 1, got 'five'",
        ),
        (
            GOOD.replace("rto: 30m", "rto: half an hour"),
            "line 10: defaults.rto: expected a duration such as 90s, 30m, 1h, 2d or 1w",
        ),
        (
            GOOD.replace("storage: s3\n", "storage: s4\n"),
            "line 19: databases[1] (billing).storage: no storage target named 's4'; defined: local, s3",
        ),
        (
            GOOD.replace("    conn_id: pgdr_billing\n", ""),
            "line 16: databases[1] (billing).conn_id: missing; every database needs a name and a conn_id",
        ),
        (
            GOOD.replace("name: billing", "name: shop"),
            "databases[1] (shop).name: the same name is given to two databases",
        ),
        (
            GOOD.replace("name: billing", "name: Billing-DB"),
            "databases[1] (Billing-DB).name: expected a lower-case name of letters, digits and _",
        ),
        (
            GOOD.replace("type: s3, bucket: my-bucket, ", "type: s3, "),
            "storage.s3.bucket: missing; a s3 storage target needs bucket and aws_conn_id",
        ),
        (
            GOOD.replace("{type: local, path: ./backups}", "{type: ftp, path: ./backups}"),
            "storage.local.type: expected 'local' or 's3', got 'ftp'",
        ),
        (GOOD.replace("version: 1", "version: 2"), "line 1: version: this pgdr understands plan version 1 only"),
        (GOOD.replace("retries: 2", "retries: [2]"), "line 4: backup.retries: expected a single value, got a list"),
        ("databases: []\n", "databases: expected a non-empty list of databases"),
        ("storage: {}\n", "databases: missing; list the databases to protect"),
        ("databases:\n  - name: shop\n    conn_id: [oops\n", "not valid YAML: expected ',' or ']'"),
        ("", "the plan is empty"),
        (
            GOOD.replace("rpo: 15m", "compression: brotli"),
            "line 20: databases[1] (billing).compression: expected pg_dump's compression: gzip, lz4 or zstd",
        ),
        (GOOD.replace("rto: 30m", "compression: gzip:10"), "line 10: defaults.compression: expected pg_dump's"),
        (GOOD.replace("rto: 30m", "compression: 6"), "defaults.compression: expected pg_dump's compression"),
        # names that would collide in storage keys
        (
            GOOD.replace("name: billing", "name: reports"),
            "databases[1] (reports).name: 'reports' is where pgdr keeps its own drill and health reports",
        ),
        (
            GOOD.replace(
                "s3: {type: s3, bucket: my-bucket, prefix: /pgdr/, aws_conn_id: pgdr_s3}",
                "s3: {type: s3, bucket: my-bucket, prefix: /pgdr/, aws_conn_id: pgdr_s3}\n  s3b: {type: s3, bucket: "
                "my-bucket, prefix: pgdr/v1/shop, aws_conn_id: pgdr_s3}",
            ),
            "storage.s3b: lies inside storage target 's3' (s3://my-bucket/pgdr)",
        ),
    ],
)
def test_bad_plans_name_file_line_key_and_expectation(bad, expected):
    message = _error(bad)
    assert expected in message
    assert message.startswith("/etc/pgdr/plan.yaml")


def test_missing_plan_file_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PGDR_PLAN", str(tmp_path / "nope.yaml"))
    with pytest.raises(PlanError, match="does not exist. Create it .* or point \\$PGDR_PLAN at it"):
        load_plan()


def test_unknown_database_lists_the_known_ones():
    plan = parse_plan(GOOD, Path("/p.yaml"))
    with pytest.raises(
        PlanError, match="Database 'orders' is not in the DR plan /p.yaml. The plan protects: shop, billing."
    ):
        plan.database("orders")


def test_plan_is_reloaded_when_the_file_changes(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(GOOD)
    assert load_plan(path).database_names == ["shop", "billing"]
    path.write_text(GOOD.replace("name: billing", "name: ledger") + "\n")
    assert load_plan(path).database_names == ["shop", "ledger"]


def test_storage_targets_may_share_a_location_or_sit_side_by_side():
    text = GOOD.replace(
        "s3: {type: s3, bucket: my-bucket, prefix: /pgdr/, aws_conn_id: pgdr_s3}",
        "s3: {type: s3, bucket: my-bucket, prefix: /pgdr/, aws_conn_id: pgdr_s3}\n  same: {type: s3, bucket: "
        "my-bucket, prefix: pgdr, aws_conn_id: pgdr_s3}\n  beside: {type: s3, bucket: my-bucket, prefix: pgdr2, "
        "aws_conn_id: pgdr_s3}",
    )
    assert set(parse_plan(text, Path("/etc/pgdr/plan.yaml")).storages) == {"local", "s3", "same", "beside"}


def test_encryption_and_server_side_encryption_are_read_per_target_and_database():
    text = """\
storage:
  kms: {type: s3, bucket: b, aws_conn_id: pgdr_s3, sse: "aws:kms", kms_key_id: "arn:aws:kms:eu-west-1:1:key/abc"}
  s3: {type: s3, bucket: c, aws_conn_id: pgdr_s3, sse: AES256}
defaults:
  encryption: {key_conn_id: pgdr_backup_key}
databases:
  - {name: shop, conn_id: pgdr_shop}
  - {name: billing, conn_id: pgdr_shop, storage: s3, encryption: {key_conn_id: billing_key}}
  - {name: scratchpad, conn_id: pgdr_shop, encryption: none}
"""
    plan = parse_plan(text, Path("/p.yaml"))
    shop, billing, scratchpad = plan.databases
    assert (shop.storage.sse, shop.storage.kms_key_id) == ("aws:kms", "arn:aws:kms:eu-west-1:1:key/abc")
    assert (billing.storage.sse, billing.storage.kms_key_id) == ("AES256", None)
    assert shop.encryption_key_conn_id == "pgdr_backup_key"
    assert billing.encryption_key_conn_id == "billing_key"
    assert scratchpad.encryption_key_conn_id is None


@pytest.mark.parametrize(
    "storage, database, expected",
    [
        ("{type: s3, bucket: b, aws_conn_id: a, sse: aes}", "", "storage.t.sse: expected AES256 (SSE-S3) or aws:kms"),
        ("{type: s3, bucket: b, aws_conn_id: a, sse: AES256, kms_key_id: k}", "", "only used with 'sse: aws:kms'"),
        ("{type: local, path: /x, sse: AES256}", "", "a folder has no server-side encryption"),
        ("{type: local, path: /x}", ", encryption: {key: c2VjcmV0}", "encryption.key: unknown key"),
        ("{type: local, path: /x}", ", encryption: {}", "encryption.key_conn_id: missing"),
        ("{type: local, path: /x}", ", encryption: {key_conn_id: 'a b'}", "an Airflow connection id"),
        ("{type: local, path: /x, object_lock: {mode: compliance, days: 1}}", "", "a folder cannot refuse a delete"),
        ("{type: s3, bucket: b, aws_conn_id: a, object_lock: {mode: strict, days: 1}}", "", "expected governance"),
        ("{type: s3, bucket: b, aws_conn_id: a, object_lock: {mode: compliance}}", "", "object_lock.days: missing"),
        ("{type: s3, bucket: b, aws_conn_id: a, object_lock: {mode: compliance, days: 0}}", "", "at least 1"),
        ("{type: s3, bucket: b, aws_conn_id: a, object_lock: {mode: compliance, days: 1d}}", "", "whole number"),
        ("{type: s3, bucket: b, aws_conn_id: a, object_lock: {mode: governance, days: 1, until: x}}", "", "unknown"),
        ("{type: local, path: /x, prune_conn_id: p}", "", "not used by a local storage target"),
        ("{type: s3, bucket: b, aws_conn_id: a, prune_conn_id: 'a b'}", "", "an Airflow connection id"),
    ],
)
def test_encryption_mistakes_point_at_the_key(storage, database, expected):
    text = f"storage:\n  t: {storage}\ndatabases:\n  - {{name: shop, conn_id: c{database}}}\n"
    assert expected in _error(text)


def test_object_lock_is_read_per_s3_target():
    text = """\
storage:
  locked: {type: s3, bucket: b, aws_conn_id: pgdr_s3, object_lock: {mode: compliance, days: 30}, prune_conn_id: p}
  open: {type: s3, bucket: c, aws_conn_id: pgdr_s3}
databases:
  - {name: shop, conn_id: pgdr_shop, storage: locked}
  - {name: billing, conn_id: pgdr_shop, storage: open}
"""
    shop, billing = parse_plan(text, Path("/p.yaml")).databases
    assert (shop.storage.object_lock.mode, shop.storage.object_lock.days) == ("compliance", 30)
    assert shop.storage.prune_conn_id == "p" and billing.storage.prune_conn_id is None
    assert shop.storage.object_lock.describe() == "compliance mode, 30 days"
    assert billing.storage.object_lock is None


COPIES = GOOD.replace(
    "  s3: {type: s3, bucket: my-bucket, prefix: /pgdr/, aws_conn_id: pgdr_s3}\n",
    "  s3: {type: s3, bucket: my-bucket, prefix: /pgdr/, aws_conn_id: pgdr_s3}\n"
    "  dr: {type: s3, bucket: my-dr-bucket, prefix: pgdr, aws_conn_id: pgdr_s3_dr}\n",
).replace("  rto: 30m\n", "  rto: 30m\n  copies: [dr]\n")


def test_copies_name_storage_targets_inherit_from_defaults_and_have_a_copy_rpo():
    shop, billing = parse_plan(COPIES, Path("/etc/pgdr/plan.yaml")).databases
    assert [t.describe() for t in shop.copies] == ["s3://my-dr-bucket/pgdr"] and shop.copy_rpo == timedelta(hours=1)
    assert [t.name for t in billing.copies] == ["dr"]
    tuned = parse_plan(COPIES.replace("    rpo: 15m\n", "    rpo: 15m\n    copy_rpo: 20m\n"), Path("/p.yaml"))
    assert tuned.databases[1].copy_rpo == timedelta(minutes=20) and tuned.databases[0].copy_rpo == timedelta(hours=1)
    assert parse_plan(GOOD, Path("/p.yaml")).databases[0].copies == ()
    assert shop.verify_copies_every == timedelta(days=7)  # each copy proven by a restore from it weekly
    weekly = parse_plan(COPIES.replace("  copies: [dr]\n", "  copies: [dr]\n  verify_copies_every: 2d\n"), Path("/p"))
    assert weekly.databases[0].verify_copies_every == timedelta(days=2)
    assert "defaults.verify_copies_every: expected a duration" in _error(
        COPIES.replace("  copies: [dr]\n", "  copies: [dr]\n  verify_copies_every: weekly\n")
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("copies: [dr]", "defaults.copies: no storage target named 'eu'; defined: dr, local, s3"),
        ("copies: [dr, dr]", "defaults.copies: a storage target is named twice"),
        ("copies: {dr: 1}", "defaults.copies: expected a list of strings"),
    ],
    ids=["unknown target", "named twice", "not a list"],
)
def test_a_wrong_copies_key_is_named(change, message):
    text = COPIES.replace("copies: [dr]", change.replace("copies: [dr]", "copies: [eu]"))
    assert message in _error(text)


def test_a_copy_in_the_databases_own_location_is_refused():
    text = COPIES.replace("    storage: s3\n", "    storage: dr\n")
    error = _error(text)
    assert (
        "databases[1] (billing).copies: 'dr' is the database's own storage location (s3://my-dr-bucket/pgdr)" in error
    )
    assert "no second copy" in error


def test_the_evidence_log_is_optional_and_each_mistake_is_named():
    assert parse_plan(GOOD, Path("/p.yaml")).evidence is None
    plan = parse_plan(GOOD + "evidence: {storage: s3, key_conn_id: pgdr_evidence_key}\n", Path("/p.yaml"))
    assert plan.evidence.storage.name == "s3" and plan.evidence.key_conn_id == "pgdr_evidence_key"
    assert plan.evidence.keep == timedelta(days=400)
    kept = parse_plan(GOOD + "evidence: {storage: local, key_conn_id: k, keep: 800d}\n", Path("/p.yaml"))
    assert kept.evidence.keep == timedelta(days=800) and kept.evidence.storage.kind == "local"
    for section, message in (
        ("evidence: {key_conn_id: k}", "evidence.storage: missing; name the storage target the receipts are kept on"),
        ("evidence: {storage: s3}", "evidence.key_conn_id: missing; name the Airflow connection of the key"),
        ("evidence: {storage: vault, key_conn_id: k}", "evidence.storage: no storage target named 'vault'"),
        ("evidence: {storage: s3, key_conn_id: 'a b'}", "evidence.key_conn_id: expected an Airflow connection id"),
        ("evidence: {storage: s3, key_conn_id: k, keep: forever}", "evidence.keep: expected a duration"),
        ("evidence: {storage: s3, key_conn_id: k, kep: 1d}", "evidence.kep: unknown key. Did you mean 'keep'?"),
    ):
        assert message in _error(GOOD + section + "\n"), section
