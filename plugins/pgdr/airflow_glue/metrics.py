"""Gauges of the health checks through Airflow's metrics layer (StatsD or OpenTelemetry, as Airflow is configured)."""

from __future__ import annotations

from pgdr.health import CheckResult


def emit_metrics(results: list[CheckResult], extra: dict[str, float] | None = None) -> None:
    """Send gauges through Airflow's metrics layer (a no-op where metrics are off)."""
    from airflow.sdk.observability import stats

    names = {
        "backup_age": "backup_age_seconds",
        "verified_age": "verified_backup_age_seconds",
        "free_space": "free_space_gb",
        "catalog": "damaged_backups",
        "wal_lag": "wal_archive_lag_seconds",
        "archiver": "archiver_failures",
        "standby_lag": "standby_lag_seconds",
    }
    for result in results:
        if result.check in names and result.value is not None:
            stats.gauge(f"pgdr.{names[result.check]}.{result.database}", result.value)
        elif result.check.startswith("copy_lag.") and result.value is not None:  # one per copy target
            stats.gauge(f"pgdr.copy_lag_seconds.{result.database}.{result.check[9:]}", result.value)
    for name, value in (extra or {}).items():
        if value is not None:
            stats.gauge(f"pgdr.{name}", value)
