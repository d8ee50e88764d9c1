"""docker-compose.yaml: no Docker engine runs here, so the file itself is checked thoroughly.

Against the Compose Specification JSON schema (a copy of ../shared/schemas/compose-spec.json is
kept in tests/schemas so the test runs anywhere; when the shared copy is present the two must
be identical), and for what the schema cannot know: mounted and built paths exist, every
connection it defines is one the plan uses (and the reverse), images are pinned, secrets come
from .env, and services wait for healthy dependencies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
SCHEMA = ROOT / "tests" / "schemas" / "compose-spec.json"
SHARED_SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"


def _airflow_env() -> dict[str, str]:
    return COMPOSE["x-airflow-common"]["environment"]


def test_matches_the_compose_specification():
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    if SHARED_SCHEMA.exists():
        assert json.loads(SHARED_SCHEMA.read_text()) == schema, "tests/schemas is out of date with ../shared/schemas"
    jsonschema.Draft7Validator(schema).validate(COMPOSE)


def test_production_shaped_services():
    services = COMPOSE["services"]
    for name in (
        "postgres",
        "redis",
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
        "source-postgres",
        "minio",
        "minio-init",
        "mailpit",
        "flower",
    ):
        assert name in services, name
    assert _airflow_env()["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert _airflow_env()["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
    assert services["flower"]["profiles"] == ["flower"]
    assert "pools import" in " ".join(services["airflow-init"]["command"])


def test_every_mounted_or_built_path_exists():
    for name, service in COMPOSE["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").exists()
    assert (ROOT / COMPOSE["x-airflow-common"]["build"] / "Dockerfile").exists()


def test_every_connection_is_one_the_plan_uses_and_the_reverse(tmp_path):
    from pgdr.plan import load_plan

    defined = {k.removeprefix("AIRFLOW_CONN_").lower() for k in _airflow_env() if k.startswith("AIRFLOW_CONN_")}
    plan_path = _airflow_env()["PGDR_PLAN"].replace("/opt/airflow/", "")
    plan = load_plan(ROOT / plan_path)
    used = {d.conn_id for d in plan.databases} | {d.verify_conn_id for d in plan.databases}
    used |= {d.restore_conn_id for d in plan.databases if d.restore_conn_id}
    used |= {s.aws_conn_id for s in plan.storages.values() if s.aws_conn_id}
    used |= {c for c in (plan.notify.slack_conn_id, plan.notify.smtp_conn_id) if c}
    assert defined == used
    for key, value in _airflow_env().items():  # each is valid connection JSON once .env is substituted
        if key.startswith("AIRFLOW_CONN_"):
            assert "conn_type" in json.loads(re.sub(r"\$\{[A-Z_]+\}", "x", value)), key


def test_images_are_pinned_and_secrets_come_from_env():
    for name, service in COMPOSE["services"].items():
        image = service.get("image")
        if image:
            assert ":" in image and not image.endswith(":latest"), f"{name} uses an unpinned image {image}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM apache/airflow:3\.3\.2\S*$", dockerfile, re.M)
    assert "requirements.txt" in dockerfile
    text = (ROOT / "docker-compose.yaml").read_text()
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Z_]+)(?::-[^}]*)?\}", text))  # $${X} is the container's
    example = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert referenced <= example, f"not in .env.example: {referenced - example}"
    # No literal password anywhere: every password field is a ${VARIABLE}.
    for match in re.finditer(r'(PASSWORD|"password")\W*[:=]\s*"?([^",}\n]*)', text):
        value = match.group(2).strip()
        assert value == "" or value.startswith("${") or value.startswith("$${"), match.group(0)


def test_services_wait_for_healthy_dependencies():
    services = COMPOSE["services"]
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (
                    f"{name} waits for {dependency}, which has no health check"
                )
            else:
                assert rule["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("plan_file", ["pgdr.yaml", "pgdr.compose.yaml"])
def test_shipped_plans_are_valid(plan_file):
    from pgdr.plan import load_plan

    assert load_plan(ROOT / "include" / plan_file).database_names == ["shop"]


# -- the Celery harness of the tests (tests/celery_cluster.py) runs what this file describes -------


def test_the_celery_harness_and_compose_configure_airflow_alike(tmp_path):
    """Same settings but for addresses, same commands, same plan shape: fail when they drift apart."""
    from types import SimpleNamespace

    import celery_cluster as harness

    compose_env = {k: v for k, v in _airflow_env().items() if k.startswith("AIRFLOW__")}
    cluster = harness.CeleryCluster(
        tmp_path, SimpleNamespace(port=5432, airflow_password="x"), {}, tmp_path / "plan.yaml"
    )
    local = cluster.settings
    for key, value in compose_env.items():
        assert key in local, f"compose sets {key}; the Celery harness does not"
        if key not in harness.LOCAL_ADDRESSES:
            assert local[key] == str(value), f"{key}: compose {value!r}, harness {local[key]!r}"
    assert harness.LOCAL_ADDRESSES <= set(compose_env), harness.LOCAL_ADDRESSES - set(compose_env)
    extra = set(local) - set(compose_env)
    assert extra == set(harness.ADDED_HERE), f"say in ADDED_HERE why the harness sets {extra ^ set(harness.ADDED_HERE)}"
    # Executor, broker and result backend of the same kinds.
    assert local["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    for key in (
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CELERY__RESULT_BACKEND",
        "AIRFLOW__CELERY__BROKER_URL",
    ):
        assert local[key].split(":", 1)[0] == str(compose_env[key]).split(":", 1)[0], key

    # The same components, started with the same commands.
    commands = harness.compose_commands()
    assert sorted(c for name, c in commands.items() if name != "airflow-worker") == sorted(harness.COMPONENTS.values())
    assert commands["airflow-worker"] == harness.WORKER_COMMAND
    assert COMPOSE["services"]["airflow-worker"]["deploy"]["replicas"] == len(cluster.workers)
    assert "pgdr.airflow_glue.pools" in " ".join(COMPOSE["services"]["airflow-init"]["command"])

    # The plan: the compose plan's sections and settings, only storage and databases replaced.
    compose_plan = yaml.safe_load((ROOT / "include" / "pgdr.compose.yaml").read_text())
    adapted = harness.compose_shaped_plan(
        {"s3": {"type": "s3", "bucket": "b", "aws_conn_id": "pgdr_s3"}}, [{"name": "x", "conn_id": "c"}]
    )
    assert set(adapted) == set(compose_plan)
    assert {k: v for k, v in adapted["defaults"].items() if k != "storage"} == {
        k: v for k, v in compose_plan["defaults"].items() if k != "storage"
    }
    assert adapted["backup"] == compose_plan["backup"]
