"""dag.test()'s idle polls made brisk for the break-glass command, the demo and the tests: only its own polls."""

from __future__ import annotations

import threading
import time

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
