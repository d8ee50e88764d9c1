"""Which restores ask pgdr_verify_restore to prove their evidence copy (the stored dump of a moment)."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowSkipException
from pgdr.runtime import VIA_ENV_VAR
from pgdr.tasks.restore import evidence_to_verify

MOMENT = {
    "database": "shop",
    "backup_id": "20261203T101500Z-1a2b3c",
    "recovery_point": "2026-12-03T10:14:59+00:00",
    "dry_run": False,
    "pitr": {"target": "2026-12-03T10:15:00+00:00", "recovery": {"achieved_recovery_point": "2026-12-03T10:14:59"}},
}


def test_a_restored_moment_names_its_stored_copy(monkeypatch):
    monkeypatch.delenv(VIA_ENV_VAR, raising=False)
    context: dict = {}
    assert evidence_to_verify(MOMENT, context) == {"database": "shop", "backup_id": "20261203T101500Z-1a2b3c"}


@pytest.mark.parametrize(
    "plan",
    [
        {**MOMENT, "pitr": None, "backup_id": "20261202T050000Z-aaaaaa"},  # a stored backup restored: verified daily
        {**MOMENT, "dry_run": True, "pitr": {"target": "latest"}, "backup_id": None},
    ],
    ids=["stored-backup", "dry-run"],
)
def test_nothing_to_verify_without_a_dumped_moment(plan, monkeypatch):
    monkeypatch.delenv(VIA_ENV_VAR, raising=False)
    with pytest.raises(AirflowSkipException, match="no evidence copy to verify"):
        evidence_to_verify(plan, {})


def test_the_break_glass_command_says_how_to_verify_later(monkeypatch):
    """No scheduler runs in the command's throw-away Airflow: a triggered run would never run; say what to do."""
    monkeypatch.setenv(VIA_ENV_VAR, "the command line (python -m pgdr restore) as root@db2")
    with pytest.raises(AirflowSkipException) as skipped:
        evidence_to_verify(MOMENT, {})
    assert "Once Airflow is back, trigger pgdr_verify_restore with database shop and backup_id 20261203T101500Z" in str(
        skipped.value
    )


def test_the_trigger_asks_for_the_verification_of_that_copy_once():
    """The task runner creates the run from the exception; a retry finds evidence__<run id> and skips."""
    from airflow.sdk.exceptions import DagRunTriggerException
    from pgdr.tasks.restore import trigger_evidence_verification

    conf = {"database": "shop", "backup_id": "20261203T101500Z-1a2b3c"}
    with pytest.raises(DagRunTriggerException) as trigger:
        trigger_evidence_verification(conf, {"run_id": "manual__2026-12-03T10:20:00+00:00"})
    raised = trigger.value
    assert raised.trigger_dag_id == "pgdr_verify_restore"
    assert raised.dag_run_id == "evidence__manual__2026-12-03T10:20:00+00:00"
    assert raised.conf == conf and raised.conf is not conf
    assert raised.skip_when_already_exists and not raised.wait_for_completion and not raised.reset_dag_run
