"""The records pgdr writes next to backups and reads back, typed; and the one rule for a restore's time.

A *verification record* (``verification.json``) says whether a backup was proven restorable:
``pgdr_verify_restore`` writes one next to a logical backup, ``pgdr_verify_pitr`` one next to a
base backup. The catalogs read them, and so do the incident planner (the expected duration of a
restore), the health checks (the last restore's duration) and the demo. They all go through
:class:`VerificationRecord`: it is built and parsed here only.

:meth:`VerificationRecord.from_json` reads every record pgdr 0.1 to 0.3 wrote (fields it does not
know are kept in ``extra`` and written back unchanged); :meth:`VerificationRecord.to_json` writes the
same fields as those versions did.

The *achieved RTO* of a restore, a verification and a drill is one rule, :func:`achieved_rto`:
from the start of its first timed phase to the end of its last, and nothing when a phase did not
finish.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

STATUSES = ("verified", "failed")
PITR_KIND = "point-in-time recovery"
# Per phase of a verify-restore, what the record keeps beside the phase's start, end and seconds.
_PHASE_DETAILS = ("download_seconds", "restore_seconds", "roles_created", "tablespaces_left_out", "extensions_created")
_INTEGRITY = ("tables_checked", "rows_checked", "sequences_checked", "amcheck_ok", "large_objects")
_PRIVILEGES = (
    "owners",
    "row_security",
    "grants",
    "default_privileges",
    "database_properties",
    "superuser_objects",
    "skipped_objects",
    "seconds",
)
# A base backup's record always lists these, also when the recovery failed before they were known.
_PITR_FIELDS = ("kind", "server", "chain", "target", "window", "recovery", "timings", "target_check", "databases")


def seconds_between(started_at: str, finished_at: str) -> float:
    """Return the seconds from one ISO time to another."""
    return (datetime.fromisoformat(finished_at) - datetime.fromisoformat(started_at)).total_seconds()


def phase_seconds(phases: Mapping[str, Mapping[str, Any] | None]) -> dict[str, float]:
    """Return the duration of every phase that ran (one with ``started_at`` and ``finished_at``)."""
    return {name: seconds_between(p["started_at"], p["finished_at"]) for name, p in phases.items() if p}


def achieved_rto(phases: Sequence[Mapping[str, Any] | None], began_at: str | None = None) -> float | None:
    """Return the seconds from the first phase's start (or ``began_at``) to the last phase's end.

    ``None`` when one of ``phases`` did not finish: a restore that did not complete achieved no RTO.
    """
    if not phases or any(not p for p in phases):
        return None
    return seconds_between(began_at or phases[0]["started_at"], phases[-1]["finished_at"])


def median(values: Iterable[float | None]) -> float | None:
    """Return the median of the known ``values``, ``None`` when none is."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


@dataclass(frozen=True)
class VerificationRecord:
    """One verification of one backup: of a logical backup (``database``) or a base backup (``server``)."""

    status: str  # "verified" or "failed"
    backup_id: str
    verified_at: str | None = None
    airflow: dict[str, Any] = field(default_factory=dict)
    # A logical backup's verify-restore
    database: str | None = None
    recovery_point: str | None = None
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    rto_target_seconds: float | None = None
    restored_as_superuser: bool | None = None
    warning: str | None = None
    integrity: dict[str, Any] | None = None
    privileges: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    failed_phase: str | None = None
    restore_seconds: float | None = None  # the achieved RTO
    rto_met: bool | None = None
    verified_from: str | None = None  # the copy target it was restored from (pgdr.plan copies); None: its own storage
    # A base backup's point-in-time recovery
    kind: str | None = None
    server: str | None = None
    chain: list[str] | None = None
    target: str | None = None
    window: dict[str, Any] | None = None
    recovery: dict[str, Any] | None = None
    timings: dict[str, float] | None = None
    target_check: dict[str, Any] | None = None
    databases: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fields a newer pgdr wrote: kept, written back

    @property
    def verified(self) -> bool:
        return self.status == "verified"

    @property
    def run_id(self) -> str | None:
        return (self.airflow or {}).get("run_id")

    @property
    def is_pitr(self) -> bool:
        return self.kind == PITR_KIND

    @property
    def recovery_seconds(self) -> float | None:
        """A PITR verification's time to a recovered cluster: preparing the data directory, then WAL replay."""
        if not self.recovery:
            return None
        return sum((self.timings or {}).values()) + (self.recovery.get("replay_seconds") or 0)

    @classmethod
    def from_dict(cls, data: Any) -> VerificationRecord | None:
        """Return the record ``data`` holds; ``None`` if it is not a verification record (damaged, or not ours)."""
        if (
            not isinstance(data, dict)
            or data.get("status") not in STATUSES
            or not isinstance(data.get("backup_id"), str)
        ):
            return None
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        if not isinstance(values.get("airflow"), dict):
            values["airflow"] = {}
        if not isinstance(values.get("phases"), dict):
            values["phases"] = {}
        if not isinstance(values.get("verified_from"), str):
            values["verified_from"] = None
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def from_json(cls, raw: bytes) -> VerificationRecord | None:
        """Parse a stored record; ``None`` if it is damaged (it then counts for nothing)."""
        try:
            return cls.from_dict(json.loads(raw))
        except (ValueError, UnicodeDecodeError):
            return None

    def to_dict(self) -> dict[str, Any]:
        """Return the record as pgdr writes it: the fields it has (a base backup's: all of its own), then ``extra``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                continue
            if value is not None or (self.is_pitr and f.name in _PITR_FIELDS):
                out[f.name] = value
        if self.is_pitr and not self.phases:
            out.pop("phases", None)  # a base backup's verification has no restore phases
        return {**out, **self.extra}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str).encode()


def verify_restore_record(
    *,
    database: str,
    backup_id: str,
    recovery_point: str,
    verified_at: str,
    airflow: dict[str, Any],
    phases: Mapping[str, Mapping[str, Any] | None],
    order: Sequence[str],
    rto_target_seconds: float,
    superuser_warning: str | None = None,
    verified_from: str | None = None,
) -> VerificationRecord:
    """Return the record of one verify-restore from what each of its phases returned (``None``: did not succeed).

    ``failed`` names the first phase in ``order`` that did not succeed; otherwise the achieved RTO
    runs from the first phase's start to the last one's end.
    """
    failed_phase = next((p for p in order if not phases.get(p)), None)
    timed = {
        name: {
            "started_at": value["started_at"],
            "finished_at": value["finished_at"],
            "seconds": seconds_between(value["started_at"], value["finished_at"]),
            **{k: v for k, v in value.items() if k in _PHASE_DETAILS},
        }
        for name, value in phases.items()
        if value
    }
    integrity, privileges, validation = (
        phases.get(p) for p in ("check_integrity", "apply_privileges", "validate_data")
    )
    achieved = None if failed_phase else achieved_rto([phases[p] for p in order])
    return VerificationRecord(
        status="failed" if failed_phase else "verified",
        database=database,
        backup_id=backup_id,
        recovery_point=recovery_point,
        verified_at=verified_at,
        airflow=dict(airflow),
        phases=timed,
        rto_target_seconds=rto_target_seconds,
        restored_as_superuser=True if superuser_warning else None,
        warning=superuser_warning,
        integrity={k: integrity[k] for k in _INTEGRITY} if integrity else None,
        privileges={k: privileges[k] for k in _PRIVILEGES if k in privileges} if privileges else None,
        validation={**validation["summary"], "report": validation["report"]} if validation else None,
        failed_phase=failed_phase,
        restore_seconds=achieved,
        rto_met=None if achieved is None else achieved <= rto_target_seconds,
        verified_from=verified_from,
    )


def expected_restore_seconds(records: Iterable[VerificationRecord | None]) -> float | None:
    """Return the median achieved restore time of past verify-restores, the expected time of the next restore."""
    return median(r.restore_seconds for r in records if r)


def expected_recovery_seconds(records: Iterable[VerificationRecord | None]) -> float | None:
    """Return the median time of past PITR verifications to a recovered cluster."""
    return median(r.recovery_seconds for r in records if r)
