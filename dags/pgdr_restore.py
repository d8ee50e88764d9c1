"""
### pgdr_restore: bring a database back during an incident, without destroying what is there

Trigger this DAG from the Airflow UI (**Trigger** button, then fill the form) or the API.
The form asks for the database, the backup (`latest-verified`, `latest`, `latest-dump`, a backup id,
or a time: on a server with a WAL archive that very second, and `latest` the end of the archive),
the mode and, for `replace`, a confirmation.

1. **plan_restore** checks the whole request and prints the restore plan (backup, recovery
   point, size, target, expected duration, what happens to the live database). Bad input fails
   here, before anything is touched. With **dry_run** the DAG stops after this.
   When the database's server has a WAL archive (`servers:` in the plan) and `backup` is a
   UTC time, the restore is **point in time**: the plan names the base backup, the WAL to
   replay, the recoverable window and the expected time; a moment outside the window fails here.
   **recover_to_moment** then recovers the server in a scratch cluster on the worker (the live
   server is not touched), dumps the database as it was at that moment and restores the dump into
   the target straight from the worker's disk, while the same files are stored as a regular backup
   (the evidence copy; no download). The phases below check it like any other restore. A retry
   after the dump was stored restores that backup instead of recovering the server again.
2. **check_checksums**: a corrupt backup is refused before any database is created.
3. **restore_backup** into a new database (`<db>_restored_<UTC time>` by default). In `replace`
   mode it is `<db>_restoring_<UTC time>` until the swap.
   Roles the backup names that the server lacks stop the restore in plan_restore, unless
   **restore_roles** is on: they are then created as they were on the source server (from the
   backup's copy of its roles), without passwords unless **restore_role_passwords** is on.
4. **check_integrity** and **validate_data**: the same checks as `pgdr_verify_restore`, as the
   non-superuser restore role.
4b. **apply_privileges**: owners, grants, default privileges, the database's settings, grants,
   comment and connection limit, event triggers and publications, as in the backup, applied by the
   server's connection (no restored code runs). Subscriptions are never restored.
5. **swap_into_place** (`replace` only, after all checks passed): sessions on the live database
   are ended, it is renamed `<db>_pre_restore_<UTC time>` (kept, never dropped, connections
   disabled) and the restored copy takes its name. A failed swap is rolled back. Never retried.
6. **write_report**: a markdown and JSON report next to the backup, and a Slack summary. With
   **incident_declared_at** (default: the trigger time) and **incident_id**, the report measures the
   incident: declared → triggered → restored → checks passed → served (the swap, or the hand-over of the
   copy), **MTTR** (declared → served) and the **data-loss window** (recovery point → the declared
   failure), and lists the post-incident review: what pgdr filled in, and the questions for the team.
7. **evidence_to_verify** and **verify_evidence_copy** (point in time, once restored): trigger
   `pgdr_verify_restore` (run id `evidence__<this run's id>`) for the moment's stored copy, so it is
   proven restorable like every scheduled backup (the daily run only takes backups whose recovery
   point lies in its interval). Skipped otherwise.

**When it fails**: the live database is unchanged unless `swap_into_place` succeeded.
- *plan_restore*: the message says what to fix in the form; trigger again.
- *check_checksums*: choose another backup (an older verified one).
- *restore_backup / check_integrity / validate_data*: the report names the phase; the live
  database was not changed. A copy that failed validation is kept for inspection.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task
from pgdr.airflow_glue.deadlines import dag_deadline
from pgdr.airflow_glue.defaults import default_args, restore_timeout
from pgdr.airflow_glue.notify import run_callbacks
from pgdr.airflow_glue.parsing import builds
from pgdr.plan import load_plan
from pgdr.tasks import call

PLAN = load_plan()
SERVERS = sorted({d.conn_id for d in PLAN.databases} | {d.verify_conn_id for d in PLAN.databases})


@dag(
    dag_id="pgdr_restore",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one restore at a time: two restores of one database must never race
    tags=["pgdr", "restore", "incident", "disaster-recovery"],
    default_args=default_args(PLAN, execution_timeout=restore_timeout(PLAN)),
    deadline=dag_deadline(PLAN, "pgdr_restore"),
    **run_callbacks(),
    params={
        "database": Param(
            PLAN.database_names[0],
            type="string",
            enum=PLAN.database_names,
            title="Database",
            description="The database to restore, as the DR plan names it.",
        ),
        "backup": Param(
            "latest-verified",
            type="string",
            title="Backup",
            description="latest-verified (the newest backup proven to restore); latest (on a server with a WAL "
            "archive: the end of the archive, newer than any dump; otherwise the newest dump); latest-dump (the "
            "newest dump); a backup id (20261122T093000Z-3fa2c1); or a UTC time (2026-11-22 09:41:00): on a server "
            "with a WAL archive, the database exactly as it was at that second; otherwise the newest backup at or "
            "before it.",
        ),
        "restore_from": Param(
            None,
            type=["null", "string"],
            enum=[
                None,
                *sorted(
                    {t.name for db in PLAN.databases for t in (db.storage, *db.copies) if db.copies}
                    | {t.name for s in PLAN.servers for t in (s.pitr.storage, *s.pitr.copies) if s.pitr.copies}
                ),
            ],
            title="Restore from",
            values_display={"null": "(the database's own storage target)"},
            description="Where to read the backup: the database's storage target (default), or one of its second "
            "copies (the plan's copies) when that target is unreachable or was lost; for mode server, one of the "
            "server's pitr.copies.",
        ),
        "mode": Param(
            "new-database",
            type="string",
            enum=["new-database", "replace", "server"],
            title="Mode",
            description="new-database: restore next to the live database under a new name (safe). "
            "replace: after all checks pass, the restored copy takes the live name; the live database is kept renamed. "
            "server: the whole server of the database is gone: recover it (every database) from its base backups and "
            "WAL onto the new host its plan names (servers.<name>.restore), to 'latest' or a UTC time.",
        ),
        # Optional fields are nullable: the UI marks a plain "string" or "array" as required.
        "confirm": Param(
            None,
            type=["null", "string"],
            title="Confirm (replace and server only)",
            description="For replace mode, type the database name to confirm; for server mode, the server's name. "
            "Otherwise leave empty.",
        ),
        "target_name": Param(
            None,
            type=["null", "string"],
            title="Target database name (new-database only)",
            description="Default: <database>_restored_<UTC time>.",
        ),
        "tables": Param(
            None,
            type=["null", "array"],
            items={"type": "string"},
            title="Tables (optional)",
            description="Restore only these tables (schema.table, one per line) into a new database.",
        ),
        "target_conn_id": Param(
            None,
            type=["null", "string"],
            enum=[None, *SERVERS],
            title="Target server (optional)",
            values_display={"null": "(the database's own server)"},
            description="Another server of the plan to restore onto (new-database mode). Default: the database's own "
            "server.",
        ),
        "restore_roles": Param(
            False,
            type="boolean",
            title="Create missing roles",
            description="Create the roles the backup names (owners, grantees) that the target server lacks, as they "
            "were on the source server (from the backup's copy of its roles; never SUPERUSER). Off: a restore that "
            "needs them stops in plan_restore and lists them.",
        ),
        "restore_role_passwords": Param(
            False,
            type="boolean",
            title="With their passwords (restore_roles only)",
            description="Give the roles created by restore_roles their password hashes from the backup, so the "
            "application's logins work with their old passwords. Off: set the passwords yourself.",
        ),
        "incident_declared_at": Param(
            None,
            type=["null", "string"],
            title="Incident declared at (UTC, optional)",
            description="When the incident was declared (2026-11-22 09:30:00): the report measures MTTR (declared to "
            "the application served again) and the data-loss window (the recovery point to this moment) from it. "
            "Default: the moment you trigger.",
        ),
        "incident_id": Param(
            None,
            type=["null", "string"],
            title="Incident id (optional)",
            description="The incident's ticket (INC-2041): in the report, its receipt and the Slack summary.",
        ),
        "dry_run": Param(False, type="boolean", title="Dry run", description="Show the restore plan and stop."),
    },
    doc_md=__doc__,
)
def pgdr_restore():
    @task(retries=0)
    def plan_restore() -> dict:
        """Validate the form, choose the backup and print the restore plan."""
        return call("restore.build_restore_plan")

    @task
    def recover_to_moment(plan: dict) -> dict:
        """Point in time: recover the server in a scratch cluster, dump the database as it was then, restore and
        store that dump at once."""
        return call("restore.run_recover_to_moment", plan)

    @task
    def check_checksums(plan: dict) -> dict:
        """Refuse a corrupt backup before creating anything."""
        return call("restore.run_check_checksums", plan)

    @task
    def restore_backup(plan: dict) -> dict:
        """Restore into the new target database."""
        return call("restore.run_restore", plan)

    @task
    def check_integrity(plan: dict) -> dict:
        """Exact row counts, pg_amcheck and sequences of the restored database."""
        return call("restore.run_check_integrity", plan)

    @task
    def validate_data(plan: dict) -> dict:
        """Great Expectations on the restored database."""
        return call("restore.run_validate", plan)

    @task
    def apply_privileges(plan: dict) -> dict:
        """Owners, grants, default privileges and the database's settings, as the server's connection."""
        return call("restore.run_apply_privileges", plan)

    # Renaming the live database is not blindly repeatable: no retries; a failure is rolled back.
    @task(retries=0)
    def swap_into_place(plan: dict) -> dict:
        """Replace mode: the restored copy takes the live name; the live database is kept renamed."""
        return call("restore.run_swap", plan)

    # Mode server: one task a server with a restore target, on the Celery queue of a worker on its new host.
    # A retry resumes the earlier try's data directory (files of the same size and SHA-256 are kept).
    @task
    def recover_server(plan: dict, server: str) -> dict:
        """Mode server: recover the whole server into its new data directory, prove it, start it there."""
        return call("restore.run_recover_server", plan, server)

    @task
    def evidence_to_verify(plan: dict) -> dict:
        """Point in time, once restored: the database and backup id of the moment's stored copy, to verify."""
        return call("restore.evidence_to_verify", plan)

    @task
    def verify_evidence_copy(evidence: dict) -> None:
        """Trigger pgdr_verify_restore (run id evidence__<this run's id>) for the evidence copy."""
        return call("restore.trigger_evidence_verification", evidence)

    # all_done: a failed restore gets its report too; the task then fails, keeping the run red.
    @task(trigger_rule="all_done", on_failure_callback=None)
    def write_report() -> dict:
        """Markdown and JSON report next to the backup, and a Slack summary."""
        return call("restore.run_report")

    planned = plan_restore()
    servers = [
        recover_server.override(task_id=f"recover_server_{server.name}", queue=server.restore.queue)(
            planned, server.name
        )
        for server in PLAN.servers
        if server.restore is not None
    ]
    plan = recover_to_moment(planned)
    checked = check_checksums(plan)
    restored = restore_backup(plan)
    integrity = check_integrity(plan)
    validated = validate_data(plan)
    privileges = apply_privileges(plan)
    swapped = swap_into_place(plan)
    report = write_report()
    checked >> restored >> integrity >> validated >> privileges >> swapped >> report
    # After a successful restore (write_report succeeded), so the verification never competes with the incident.
    evidence = evidence_to_verify(plan)
    report >> evidence
    verify_evidence_copy(evidence)
    servers >> report


if builds("pgdr_restore"):  # all of them, except under pgdr's dag.test() of another DAG
    pgdr_restore()
