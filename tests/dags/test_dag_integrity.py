"""Every DAG imports cleanly, is configured as the house style requires, and does no I/O at parse time."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pgdr.local.runner import DAGS_FOLDER

DAG_FILES = sorted(DAGS_FOLDER.glob("*.py"))
EXPECTED_DAGS = {
    "pgdr_backup",
    "pgdr_verify_restore",
    "pgdr_restore",
    "pgdr_drill",
    "pgdr_health",
    "pgdr_basebackup",
    "pgdr_verify_pitr",
    "pgdr_rotate_keys",
    "pgdr_copy",
    "pgdr_evidence",
}


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_FOLDER))


def test_every_dag_file_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert EXPECTED_DAGS <= set(dagbag.dag_ids)


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_one_dag_per_file_named_after_it(dagbag, path):
    ids = [d for d, dag in dagbag.dags.items() if Path(dag.fileloc).name == path.name]
    assert ids == [path.stem]


@pytest.mark.parametrize("dag_id", sorted(EXPECTED_DAGS))
def test_dag_configuration(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert "pgdr" in dag.tags
    assert dag.doc_md and "When it fails" in dag.doc_md
    assert dag.start_date.tzinfo is not None
    assert dag.catchup is False
    for task in dag.tasks:
        assert task.owner == "pgdr", task.task_id
        # Deciding what to do, and renaming live databases, are not retried blindly.
        if task.task_id not in (
            "find_backups",
            "plan_restore",
            "swap_into_place",
            "select_databases",
            "find_due",
            "find_servers",
        ):
            assert task.retries >= 1, task.task_id
        assert task.retry_exponential_backoff, task.task_id
        assert task.execution_timeout is not None, task.task_id
        if not task.task_id.endswith(("record_verification", "write_report", "measure", "publish_report")):
            assert task.on_failure_callback, task.task_id


def test_backup_dag_structure(dagbag):
    from pgdr.airflow_glue.assets import BACKUP_ASSET

    dag = dagbag.dags["pgdr_backup"]
    assert set(dag.task_dict) == {"protect_pgdr_shop.back_up", "protect_pgdr_shop.prune_expired"}
    assert dag.task_dict["protect_pgdr_shop.back_up"].pool == "pgdr_pgdr_shop"  # the source server's pool
    assert dag.task_dict["protect_pgdr_shop.back_up"].downstream_task_ids == {"protect_pgdr_shop.prune_expired"}
    assert BACKUP_ASSET in dag.task_dict["protect_pgdr_shop.back_up"].outlets


def test_verify_restore_dag_structure(dagbag):
    from pgdr.airflow_glue.assets import BACKUP_ASSET

    dag = dagbag.dags["pgdr_verify_restore"]
    assert BACKUP_ASSET.name in str(dag.timetable.asset_condition)  # triggered by every backup event
    t = dag.task_dict
    assert t["verify.create_scratch"].is_setup and t["verify.drop_scratch"].is_teardown
    assert not t["verify.create_scratch"].upstream_task_ids - {"verify.find_backups", "find_backups"}
    assert {"verify.restore_and_check", "verify.validate_and_apply_privileges"} <= t[
        "verify.create_scratch"
    ].downstream_task_ids
    assert "verify.validate_and_apply_privileges" in t["verify.restore_and_check"].downstream_task_ids
    assert t["verify.validate_and_apply_privileges"].downstream_task_ids == {"verify.drop_scratch"}
    assert t["verify.record_verification"].trigger_rule == "all_done"
    # Every phase the record names is found in a task of the group (the first three in one).
    from pgdr.logical.catalog import VERIFICATION_PHASES
    from pgdr.tasks.verify import PHASE_XCOMS

    assert set(PHASE_XCOMS) == set(VERIFICATION_PHASES)
    assert {f"verify.{task}" for task, _key in PHASE_XCOMS.values()} <= set(t)
    assert len([n for n in t if n.startswith("verify.")]) == 5  # was 8: a task costs seconds on a loaded worker
    assert dag.max_active_runs == 1
    assert set(dag.params) == {"database", "backup_id", "verify_from"}


def test_restore_dag_form_and_structure(dagbag):
    dag = dagbag.dags["pgdr_restore"]
    assert dag.schedule is None and dag.max_active_runs == 1
    assert set(dag.params) == {
        "database",
        "backup",
        "mode",
        "confirm",
        "target_name",
        "tables",
        "target_conn_id",
        "restore_roles",
        "restore_role_passwords",
        "restore_from",
        "incident_declared_at",
        "incident_id",
        "dry_run",
    }
    for name in dag.params:
        param = dag.params.get_param(name)
        assert param.schema.get("title") and param.description, name
    assert dag.params.get_param("mode").schema["enum"] == ["new-database", "replace", "server"]
    assert dag.params["backup"] == "latest-verified" and dag.params["mode"] == "new-database"
    order = [
        "plan_restore",
        "recover_to_moment",
        "check_checksums",
        "restore_backup",
        "check_integrity",
        "validate_data",
        "apply_privileges",
        "swap_into_place",
        "write_report",
        "evidence_to_verify",
        "verify_evidence_copy",
    ]
    for upstream, downstream in zip(order, order[1:], strict=False):
        assert downstream in dag.task_dict[upstream].downstream_task_ids, (upstream, downstream)
    assert dag.task_dict["swap_into_place"].retries == 0
    assert dag.task_dict["write_report"].trigger_rule == "all_done"
    # The moment's evidence copy is verified after a successful restore only (all_success after write_report).
    assert dag.task_dict["evidence_to_verify"].trigger_rule == "all_success"


def test_a_server_with_a_restore_target_gets_a_recovery_task_on_its_hosts_queue(tmp_path, monkeypatch):
    """Mode server: the recovery of a server runs on the Celery queue of a worker on its new host."""
    from pgdr.local.runner import load_dag
    from support import write_plan

    plan = write_plan(
        tmp_path / "plan.yaml",
        [{"name": "shop", "conn_id": "pgdr_shop", "server": "main"}],
        {"s3": {"type": "s3", "bucket": "b", "prefix": "p", "aws_conn_id": "pgdr_s3"}},
        servers={"main": {"pitr": {"storage": "s3"}, "restore": {"queue": "pgdr-db-new", "data_dir": "/srv/pg"}}},
    )
    monkeypatch.setenv("PGDR_PLAN", str(plan))
    dag = load_dag("pgdr_restore")
    task = dag.task_dict["recover_server_main"]
    assert task.queue == "pgdr-db-new" and task.retries >= 1  # a retry resumes its own directory
    assert "plan_restore" in task.upstream_task_ids and "write_report" in task.downstream_task_ids
    assert [t for t in dag.task_dict if t.startswith("recover_server_")] == ["recover_server_main"]


def test_every_dag_alerts_once_per_run(dagbag):
    from pgdr.airflow_glue.notify import RunFailureNotifier, RunRecoveryNotifier, TaskFailureJournal

    for dag_id in EXPECTED_DAGS:
        dag = dagbag.dags[dag_id]
        failure, success = (
            c[0] if isinstance(c, list) else c for c in (dag.on_failure_callback, dag.on_success_callback)
        )
        assert isinstance(failure, RunFailureNotifier) and isinstance(success, RunRecoveryNotifier), dag_id
        for task in dag.tasks:
            callbacks = (
                task.on_failure_callback if isinstance(task.on_failure_callback, list) else [task.on_failure_callback]
            )
            assert callbacks in ([None], []) or any(isinstance(c, TaskFailureJournal) for c in callbacks), (
                dag_id,
                task.task_id,
            )


def test_deadlines_come_from_the_plan_when_enabled(monkeypatch):
    """Under a real scheduler every DAG but the health check carries Deadline Alerts from the plan."""
    from datetime import timedelta

    from pgdr.airflow_glue.deadlines import deadline_alerts
    from pgdr.plan import load_plan

    plan = load_plan()
    monkeypatch.setenv("PGDR_DEADLINES", "on")
    alerts = deadline_alerts(plan, "pgdr_verify_restore", timedelta(minutes=30), "RTO", "shop")
    assert [a.interval for a in alerts] == [timedelta(minutes=24), timedelta(minutes=30), timedelta(minutes=30)]
    assert [a.callback.path for a in alerts] == [
        "pgdr.airflow_glue.notify.deadline_warning",
        "pgdr.airflow_glue.notify.deadline_missed_slack",
        "pgdr.airflow_glue.notify.deadline_missed_email",
    ]
    assert alerts[2].callback.kwargs["email_to"] == ["oncall@example.com"]
    assert alerts[0].callback.kwargs["target"] == "RTO 30m"
    monkeypatch.setenv("PGDR_DEADLINES", "off")
    assert deadline_alerts(plan, "pgdr_verify_restore", timedelta(minutes=30), "RTO", "shop") == []


def test_drill_and_health_structure(dagbag):
    drill = dagbag.dags["pgdr_drill"]
    assert drill.schedule == "0 3 1 * *"
    assert drill.task_dict["rehearse.create_scratch"].is_setup and drill.task_dict["rehearse.drop_scratch"].is_teardown
    assert drill.task_dict["rehearse.measure"].trigger_rule == "all_done"
    assert drill.task_dict["publish_report"].trigger_rule == "all_done"
    assert set(drill.params) == {"databases", "scenario"}
    health = dagbag.dags["pgdr_health"]
    assert health.schedule == "*/5 * * * *"
    assert set(health.task_dict) == {
        "check_database",
        "check_server",
        "check_workers",
        "alert_on_changes",
    }  # the shipped plan has a PITR server


def test_one_pool_per_source_server(tmp_path, monkeypatch):
    """Fifty databases on two servers: two mapped groups, two pools sized from the plan."""
    from pgdr.airflow_glue.pools import required_pools
    from pgdr.local.runner import load_dag
    from pgdr.plan import load_plan

    dbs = "".join(f"  - {{name: a{i}, conn_id: srv_a}}\n" for i in range(30))
    dbs += "".join(f"  - {{name: b{i}, conn_id: srv_b_db{i}, server: srv_b}}\n" for i in range(20))
    plan = tmp_path / "fleet.yaml"
    plan.write_text(
        f"backup: {{max_dumps_per_server: 3}}\nstorage: {{l: {{type: local, path: {tmp_path}}}}}\ndatabases:\n{dbs}"
    )
    monkeypatch.setenv("PGDR_PLAN", str(plan))
    dag = load_dag("pgdr_backup")
    assert dag.task_dict["protect_srv_a.back_up"].pool == "pgdr_srv_a"
    assert dag.task_dict["protect_srv_b.back_up"].pool == "pgdr_srv_b"
    pools = required_pools(load_plan())
    assert {name: p["slots"] for name, p in pools.items()} == {"pgdr_srv_a": 3, "pgdr_srv_b": 3}


def test_dag_files_do_no_network_io_at_parse_time(tmp_path, monkeypatch):
    """Parse every DAG file with sockets blocked and a plan whose connections do not exist."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "storage: {s3: {type: s3, bucket: b, aws_conn_id: missing_aws}}\ndatabases: [{name: shop, conn_id: "
        "missing_conn}]\n"
    )
    monkeypatch.setenv("PGDR_PLAN", str(plan))

    def refuse(*args, **kwargs):
        raise AssertionError(f"network I/O at parse time: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    from pgdr.local.runner import load_dag

    for path in DAG_FILES:
        assert load_dag(path.stem).dag_id == path.stem


def test_dag_files_do_not_import_heavy_libraries_at_parse_time():
    """GX, boto3 and psycopg cost seconds to import; DAG files leave them to the tasks. TriggerDagRunOperator's
    module (and the standard provider's operators it pulls in) tripled pgdr_restore's parse time: a task raises
    DagRunTriggerException instead (pgdr.tasks.restore.trigger_evidence_verification)."""
    code = (
        f"import sys, runpy, glob\nfor f in sorted(glob.glob({str(DAGS_FOLDER / '*.py')!r})): "
        "runpy.run_path(f)\nheavy = [m for m in ('great_expectations', 'boto3', 'psycopg', 'matplotlib', "
        "'airflow.providers.standard.operators.trigger_dagrun') if m in sys.modules]\nprint(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_invalid_plan_becomes_an_import_error_naming_file_line_and_key(tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    plan = tmp_path / "plan.yaml"
    plan.write_text("storage: {local: {type: local, path: /tmp/x}}\ndatabases:\n  - name: shop\n    conn_idd: x\n")
    monkeypatch.setenv("PGDR_PLAN", str(plan))
    bag = DagBag(dag_folder=str(DAGS_FOLDER / "pgdr_backup.py"))
    (error,) = bag.import_errors.values()
    assert f"{plan}, line 4: databases[0] (shop).conn_idd: unknown key. Did you mean 'conn_id'?" in error


def test_deadline_callbacks_stored_by_pgdr_0_2_still_import():
    """Deadline Alerts of runs created by pgdr 0.2 name ``pgdr.notify.*``; the triggerer must still find them."""
    import importlib

    from pgdr.airflow_glue import notify

    legacy = importlib.import_module("pgdr.notify")
    for name in ("deadline_warning", "deadline_missed_slack", "deadline_missed_email"):
        assert getattr(legacy, name) is getattr(notify, name)


def test_pitr_dags_structure(dagbag):
    from pgdr.airflow_glue.assets import BASE_BACKUP_ASSET

    backup = dagbag.dags["pgdr_basebackup"]
    assert set(backup.params) == {"server", "kind"}
    assert backup.params.get_param("kind").schema["enum"] == ["auto", "full", "incremental"]
    assert BASE_BACKUP_ASSET in backup.task_dict["take_base_backup"].outlets
    assert backup.task_dict["take_base_backup"].downstream_task_ids == {"check_stored", "prune_expired"}
    verify = dagbag.dags["pgdr_verify_pitr"]
    assert verify.task_dict["verify.recover_cluster"].is_setup and verify.task_dict["verify.stop_cluster"].is_teardown
    assert verify.task_dict["verify.record_verification"].trigger_rule == "all_done"
    assert "verify.check_databases" in verify.task_dict["verify.check_recovery_target"].downstream_task_ids


def test_an_empty_choice_in_a_form_is_labelled_not_shown_as_null(dagbag):
    """The trigger form shows an enum's values as text: None would read 'null' without a label."""
    for dag_id in EXPECTED_DAGS:
        dag = dagbag.dags[dag_id]
        for name in dag.params:
            schema = dag.params.get_param(name).schema
            if None in (schema.get("enum") or []):
                label = (schema.get("values_display") or {}).get("null")
                assert label and "null" not in label, (dag_id, name)


def test_under_pgdrs_dag_test_a_parse_builds_only_the_dags_being_tested(dagbag):
    """dag.test() parses the whole folder and stores every DAG on each call; under pgdr's runner the DAG files of the
    DAGs not being tested build nothing (a tenth of the CPU of an in-process run), and every other parse builds all."""
    from airflow.dag_processing.dagbag import DagBag
    from pgdr.airflow_glue.parsing import only_building

    def built() -> set[str]:
        bag = DagBag(dag_folder=str(DAGS_FOLDER))
        assert bag.import_errors == {}
        return set(bag.dag_ids)

    with only_building("pgdr_restore"):  # and the DAG its verify_evidence_copy triggers
        assert built() == {"pgdr_restore", "pgdr_verify_restore"}
        with only_building("pgdr_backup"):  # another thread's dag.test() of another DAG, meanwhile
            assert built() == {"pgdr_restore", "pgdr_verify_restore", "pgdr_backup"}
        with only_building("pgdr_verify_restore"):  # tested itself meanwhile: still built when that one ends
            pass
        assert built() == {"pgdr_restore", "pgdr_verify_restore"}
    with pytest.raises(RuntimeError), only_building("pgdr_health"):
        raise RuntimeError("a failed dag.test()")
    assert built() == set(dagbag.dag_ids)  # afterwards, all of them again


def test_every_dag_a_task_triggers_is_built_beside_the_dag_that_triggers_it():
    """A task that triggers a DAG (a ``trigger_dag_id`` in pgdr's code) fails under dag.test() unless the triggered
    DAG was written to the metadata database with the one tested: parsing.TRIGGERS must name every such pair."""
    import re

    from pgdr.airflow_glue.parsing import TRIGGERS

    triggered = set()
    for path in (DAGS_FOLDER.parent / "plugins" / "pgdr").rglob("*.py"):
        triggered |= set(re.findall(r"""["']trigger_dag_id["']\s*:\s*["'](\w+)["']""", path.read_text()))
        triggered |= set(re.findall(r"""trigger_dag_id\s*=\s*["'](\w+)["']""", path.read_text()))
    assert triggered == {"pgdr_verify_restore"}
    assert triggered == {name for names in TRIGGERS.values() for name in names}
    restore_dag = (DAGS_FOLDER / "pgdr_restore.py").read_text()
    assert "trigger_evidence_verification" in restore_dag  # the task that triggers it is pgdr_restore's


def test_the_dags_being_tested_stay_counted_right_under_many_threads():
    import random
    import threading

    from pgdr.airflow_glue import parsing

    wrong = []

    def run(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            dag_id = rng.choice(["pgdr_backup", "pgdr_restore", "pgdr_health"])
            with parsing.only_building(dag_id):
                if not parsing.builds(dag_id) or parsing.builds("pgdr_drill"):
                    wrong.append(dag_id)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    assert parsing.builds("pgdr_drill") and not parsing._testing  # nothing left counted


def test_a_dag_test_stores_the_dags_it_triggers_as_the_plan_in_force_builds_them_now(plan, tmp_path):
    """dag.test() of pgdr_restore writes the folder's DAGs to the metadata database (Airflow's sync_bag_to_db, as here)
    and its verify_evidence_copy then triggers pgdr_verify_restore as stored there. Airflow skips writing a DAG stored
    less than [core] min_serialized_dag_update_interval ago (30 s by default): a restore run within 30 s of one under
    another plan had its evidence verification refused ("'shop' is not one of [None, 'app']", found in a test run).
    pgdr's private Airflow sets the interval to 0: the stored DAG is the plan in force's at once."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.utils.session import create_session
    from pgdr.airflow_glue.parsing import only_building
    from pgdr.local.runner import local_airflow_env

    assert local_airflow_env(tmp_path / "airflow")["AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL"] == "0"
    manager = DagBundlesManager()
    with create_session() as session:
        manager.sync_bundles_to_db(session=session)
    (bundle,) = [b for b in manager.get_all_dag_bundles() if Path(b.path) == DAGS_FOLDER]
    for name in ("app", "shop", "app"):  # one plan after another, seconds apart
        plan(databases=[{"name": name, "conn_id": "pgdr_shop"}])
        with only_building("pgdr_restore"):
            bag = BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name)
            sync_bag_to_db(bag, bundle.name, bundle.version)
        stored = SerializedDagModel.get("pgdr_verify_restore").dag
        assert stored.params.get_param("database").schema["enum"] == [None, name]
