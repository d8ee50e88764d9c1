"""
### pgdr_rotate_keys: move every encrypted backup to the current master key (on demand)

Client-side encryption wraps each backup's data key with a master key held in an Airflow
connection (login: key id, password: key; older keys in the extra's `previous_keys`). To rotate:

1. `python -m pgdr keygen` prints a new key. In the connection, move the current login/password
   into `previous_keys` and put the new key id and key in login/password. New backups use it
   from that moment; old ones still restore with the old key.
2. Trigger this DAG. For every encrypted database, **rewrap** opens each older backup's data key
   with its old master key (checking that nobody changed the manifest), wraps it under the current
   key and rewrites the manifest only: no data is downloaded or uploaded again.
3. **report** lists, per connection, the old key ids no retained backup needs any more. Remove
   those from `previous_keys` once your key escrow holds a copy.

**When it fails**: *rewrap*: the connection lacks an old key a backup needs (the message names
it), or a manifest fails authentication (someone changed it: that backup is not re-signed). The
backups named keep their old key, which must stay in the connection. Nothing is lost: a backup is
either wrapped by its old key or by the new one, never by none. Re-run after fixing.
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
ENCRYPTED = [db.name for db in PLAN.databases if db.encryption_key_conn_id]


@dag(
    dag_id="pgdr_rotate_keys",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["pgdr", "encryption", "disaster-recovery"],
    default_args=default_args(PLAN, execution_timeout=timedelta(hours=1)),
    **run_callbacks(),
    doc_md=__doc__,
)
def pgdr_rotate_keys():
    @task(map_index_template="{{ pgdr_database }}")
    def rewrap(database: str) -> dict:
        """Re-wrap the data key of each backup wrapped by an older master key, under the current one."""
        return call("rotate_keys.run_rewrap", database)

    @task
    def report(results: list[dict]) -> dict:
        """Per key connection: the old key ids no retained backup needs any more."""
        return call("rotate_keys.run_rotation_report", list(results))

    report(rewrap.expand(database=ENCRYPTED))


if builds("pgdr_rotate_keys"):  # all of them, except under pgdr's dag.test() of another DAG
    pgdr_rotate_keys()
