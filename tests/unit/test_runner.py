"""dag.test()'s idle polls made brisk for the break-glass command, the demo and the tests: only its own polls."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pgdr.local import runner


@pytest.fixture
def slept(monkeypatch):
    """The seconds each time.sleep call actually slept for (recorded, not slept)."""
    calls: list[float] = []
    monkeypatch.setattr(time, "sleep", calls.append)
    return calls


def _fake_dag_test():
    """A function named ``test`` in the file of Airflow's DAG.test, polling as its loop does."""
    from airflow.sdk.definitions import dag as dag_module

    namespace: dict = {}
    exec(
        compile(
            "def test(polls):\n    import time\n    for _ in range(polls):\n        time.sleep(1)\n",
            dag_module.__file__,
            "exec",
        ),
        namespace,
    )
    return namespace["test"]


def test_dag_tests_first_idle_polls_are_brisk_and_later_ones_keep_their_second(slept):
    poll = _fake_dag_test()
    with runner.brisk_dag_test_polls():
        poll(runner.BRISK_POLLS + 3)
    assert slept == [runner.BRISK_POLL_S] * runner.BRISK_POLLS + [1, 1, 1]


def test_every_other_sleep_any_thread_sleeps_as_asked_and_time_sleep_is_given_back(slept):
    recorder = time.sleep
    with runner.brisk_dag_test_polls(), runner.brisk_dag_test_polls():  # nested: given back once, at the end
        time.sleep(1)
        worker = threading.Thread(target=time.sleep, args=(2,))
        worker.start()
        worker.join()
        assert time.sleep is not recorder
    assert time.sleep is recorder
    assert slept == [1, 2]


def test_a_streak_of_idle_polls_starts_again_after_a_task_ran(slept, monkeypatch):
    poll = _fake_dag_test()
    with runner.brisk_dag_test_polls():
        poll(runner.BRISK_POLLS + 1)
        monkeypatch.setattr(runner._BriskPolls, "last_end", time.monotonic() - 5)  # a task ran for 5 s since
        poll(2)
    assert slept == [runner.BRISK_POLL_S] * runner.BRISK_POLLS + [1] + [runner.BRISK_POLL_S] * 2


def _empty_metadata_db(path) -> None:
    """A stand-in for Airflow's empty metadata database: a revision and no DAG runs."""
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num text)")
        conn.execute("INSERT INTO alembic_version VALUES ('29ce7909c52b')")
        conn.execute("CREATE TABLE dag_run (id integer)")
    conn.close()


def test_the_kept_empty_metadata_database_is_copied_checked_and_a_damaged_one_is_rebuilt(tmp_path, caplog):
    import sqlite3

    built, home = tmp_path / "built.db", tmp_path / "home"
    home.mkdir()
    template = tmp_path / "cache" / "airflow-metadata-x.sqlite"
    assert not runner._copy_template(template, home / "airflow.db")  # none kept yet: built from the models

    _empty_metadata_db(built)
    runner._keep_template(built, template)
    assert template.is_file() and not list(template.parent.glob(".*"))  # written aside, then renamed
    assert (template.parent.stat().st_mode & 0o777) == 0o700
    assert runner._copy_template(template, home / "airflow.db")
    with sqlite3.connect(home / "airflow.db") as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("29ce7909c52b",)]
    conn.close()

    for damage in (b"not a database at all", None):
        (home / "airflow.db").unlink(missing_ok=True)
        if damage:
            template.write_bytes(damage)
        else:  # a database, but one that has been used: never start an incident's restore from old runs
            _empty_metadata_db(built.with_name("used.db"))
            with sqlite3.connect(built.with_name("used.db")) as conn:
                conn.execute("INSERT INTO dag_run VALUES (1)")
            conn.close()
            template.write_bytes(built.with_name("used.db").read_bytes())
        caplog.clear()
        assert not runner._copy_template(template, home / "airflow.db")
        assert not (home / "airflow.db").exists()  # Airflow builds its own afresh; nothing half-copied stays
        assert "is not usable" in caplog.text and "building a new one" in caplog.text


def test_the_kept_metadata_database_is_per_airflow_version_in_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("PGDR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = runner.metadata_db_template()
    assert path.parent == tmp_path / "pgdr" and path.name.startswith("airflow-metadata-")
    monkeypatch.setenv("PGDR_CACHE_DIR", str(tmp_path / "mine"))
    assert runner.metadata_db_template() == tmp_path / "mine" / path.name  # the same key: the same Airflow
    for name in ("PGDR_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    assert runner.metadata_db_template() is None  # an account without a home builds it every time
