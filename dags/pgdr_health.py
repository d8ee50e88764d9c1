"""
### pgdr_health: is the DR plan holding right now? (every few minutes)

For each database in the plan: the source answers; the storage target accepts and returns a
probe object; the newest backup is younger than the RPO; the newest verified backup is younger
than the plan's `health.verify_window`. And once: enough free space where pgdr keeps its work
files. For each server under point-in-time recovery: a heartbeat row is written (the PITR
verification and the drill prove their recovery point with these), `pg_stat_archiver` must not
show a failing archiver, and the WAL archive must lag the server by no more than its RPO. Each
run sends gauges through Airflow's metrics layer (`pgdr.backup_age_seconds.<db>`,
`pgdr.verified_backup_age_seconds.<db>`, `pgdr.last_restore_seconds.<db>`,
`pgdr.last_rto_seconds.<db>`, `pgdr.last_rpo_seconds.<db>`, `pgdr.free_space_gb.workers`,
`pgdr.wal_archive_lag_seconds.<server>`, `pgdr.wal_archive_lag_bytes.<server>`,
`pgdr.archiver_failures.<server>`).

Alerts go out on a **change of state** only: a Slack message when a check starts failing and a
recovery message when it passes again. A failing check does not fail the run (the run did its
job: it checked); the message says what is wrong.

**When it fails** (a check, not the run): *source*: the database is unreachable, see the error. *storage*: the
bucket or folder cannot be written; backups will fail too. *backup_age*: backups are not running
(look at pgdr_backup). *verified_age*: verifications are failing or not running (look at
pgdr_verify_restore). *free_space*: free disk space on the workers. *archiver*: the server's archive_command fails, WAL
piles up on its disk; fix it before the disk fills. *wal_lag*: the archive is behind by more than
the RPO: the archiver is failing, slow, or `archive_timeout` is longer than the RPO. *copy_lag.<target>*: a backup
stored more than `copy_rpo` ago is not in that second copy: look at pgdr_copy's last run. *evidence_chain*: a
receipt of the evidence log was edited, deleted or forged (or cannot be read): run `python -m pgdr evidence verify`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task
from pgdr.airflow_glue.defaults import default_args
from pgdr.airflow_glue.notify import run_callbacks
from pgdr.airflow_glue.parsing import builds
from pgdr.plan import load_plan
from pgdr.tasks import call

PLAN = load_plan()


@dag(
    dag_id="pgdr_health",
    schedule=PLAN.health.schedule,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["pgdr", "health", "disaster-recovery"],
    default_args={**default_args(PLAN, execution_timeout=timedelta(minutes=4)), "retries": 1},
    **run_callbacks(),
    doc_md=__doc__,
)
def pgdr_health():
    @task(map_index_template="{{ pgdr_database }}")
    def check_database(database: str) -> list[dict]:
        """Source reachable, storage writable, backup and verified-backup ages."""
        return call("health.run_health_database", database)

    @task(map_index_template="{{ pgdr_server }}")
    def check_server(server: str) -> list[dict]:
        """PITR servers: a heartbeat, the archiver not failing, the WAL archive's lag within the RPO."""
        return call("health.run_health_server", server)

    @task
    def check_workers() -> list[dict]:
        """Free space where pgdr keeps its work files."""
        return call("health.run_health_workers")

    @task
    def check_evidence() -> list[dict]:
        """The evidence log's chain of signed receipts (plans with an evidence section), since the last run."""
        return call("health.run_health_evidence")

    @task
    def alert_on_changes(
        per_database: list[list[dict]], per_server: list[list[dict]], workers: list[dict], evidence: list[dict]
    ) -> dict:
        """One Slack message for the checks that changed state since the last run."""
        return call("health.run_health_alerts", [*per_database, *per_server, workers, evidence])

    # Only with PITR servers: a mapped task over no servers is skipped, and would skip the alerts.
    per_server = check_server.expand(server=PLAN.server_names) if PLAN.servers else []
    evidence = check_evidence() if PLAN.evidence else []  # only with an evidence log
    alert_on_changes(check_database.expand(database=PLAN.database_names), per_server, check_workers(), evidence)


if builds("pgdr_health"):  # all of them, except under pgdr's dag.test() of another DAG
    pgdr_health()
