"""
### pgdr_basebackup: base backups of every server under point-in-time recovery

For each server of the plan's `servers:` section (its WAL is archived continuously by the
server's own `archive_command`, barman-cloud, into the server's S3 target):

1. **find_due**: which servers need a base backup now. A **full** one when the newest full base
   backup is older than the last tick of the server's `full_schedule`; otherwise an
   **incremental** one (only the blocks changed since the newest base backup; PostgreSQL 17+,
   `summarize_wal = on`) when the newest is older than the last tick of `incremental_schedule`.
   Triggered by hand, `kind` forces full or incremental, and `server` picks one server.
2. **take_base_backup**: `pg_basebackup` from the worker over the replication protocol (the tar
   on stdout, fast checkpoint, WAL from the archive), compressed with zstd and every file checked
   against PostgreSQL's backup manifest (size, CRC32C) as it streams, then SHA-256'd and uploaded,
   the record `backup.json` written **last**. Emits a `pgdr_base_backups` asset event, which
   triggers `pgdr_verify_pitr`.
3. **check_stored**: the bytes as stored, read again: SHA-256 against the record and every file
   against the manifest (`pg_verifybackup` for a gzip'd base backup stored before 2026-12).
4. **prune_expired**: retention by recovery window (`keep_window`): every base backup and WAL
   segment needed to recover to any moment of the window is kept, and the newest verified chain.

**SLA**: the run must finish within the tightest PITR RPO of the plan.

**When it fails**:
- *archive_command is failing*: the server cannot ship WAL; the base backup was stopped rather
  than wait forever. WAL piles up on the server's disk: fix the archiver first (its log says
  `archive command failed`), then clear the task.
- *summarize_wal*: an incremental base backup needs `summarize_wal = on` on the server; trigger
  with `kind=full` meanwhile.
- *The check against PostgreSQL's manifest rejected* (or *pg_verifybackup rejected*, for an
  older base backup): the stored copy is damaged; take a new full base backup.
- *cannot connect / refused the credentials*: the server's Airflow connection (it needs the
  REPLICATION attribute); the task retries.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import MultipleCronTriggerTimetable, Param, dag, task
from pgdr.airflow_glue.assets import BASE_BACKUP_ASSET
from pgdr.airflow_glue.deadlines import dag_deadline
from pgdr.airflow_glue.defaults import default_args
from pgdr.airflow_glue.notify import run_callbacks
from pgdr.airflow_glue.parsing import builds
from pgdr.plan import load_plan
from pgdr.tasks import call

PLAN = load_plan()
CRONS = sorted({c for s in PLAN.servers for c in (s.pitr.full_schedule, s.pitr.incremental_schedule) if c})


@dag(
    dag_id="pgdr_basebackup",
    schedule=MultipleCronTriggerTimetable(*CRONS, timezone="UTC") if CRONS else None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["pgdr", "backup", "pitr", "disaster-recovery"],
    default_args=default_args(PLAN, execution_timeout=timedelta(hours=6)),
    deadline=dag_deadline(PLAN, "pgdr_basebackup"),
    **run_callbacks(),
    params={
        "server": Param(
            None,
            type=["null", "string"],
            enum=[None, *PLAN.server_names],
            title="Server",
            values_display={"null": "(every server that is due)"},
            description="Take a base backup of this server only (default: every server that is due).",
        ),
        "kind": Param(
            "auto",
            type="string",
            enum=["auto", "full", "incremental"],
            title="Kind",
            description="auto: what the server's schedules say is due; full or incremental: take that now.",
        ),
    },
    doc_md=__doc__,
)
def pgdr_basebackup():
    @task(retries=0)
    def find_due() -> list[dict]:
        """Decide which servers get a full or an incremental base backup in this run."""
        return call("basebackup.run_find_base_backups")

    @task(outlets=[BASE_BACKUP_ASSET], map_index_template="{{ pgdr_server }}")
    def take_base_backup(job: dict) -> dict:
        """pg_basebackup, checksum and upload one server's base backup; write its record last."""
        return call("basebackup.run_base_backup", job)

    @task(map_index_template="{{ pgdr_server }}")
    def check_stored(backup: dict) -> dict:
        """The stored bytes of the new base backup, checked against its record and PostgreSQL's manifest."""
        return call("basebackup.run_check_stored", backup)

    @task(map_index_template="{{ pgdr_server }}")
    def prune_expired(backup: dict, checked: dict) -> dict:
        """Delete base backups and WAL outside the recovery window (never the newest verified chain)."""
        return call("basebackup.run_pitr_retention", backup["server"])

    backups = take_base_backup.expand(job=find_due())
    prune_expired.expand(backup=backups, checked=check_stored.expand(backup=backups))


if builds("pgdr_basebackup"):  # all of them, except under pgdr's dag.test() of another DAG
    pgdr_basebackup()
