"""The evidence pack: what the evidence log (:mod:`pgdr.evidence`) proves about a period, per database and server,
in the words of the controls an auditor checks (SOC 2 A1.2/A1.3, ISO 27001 A.8.13/A.5.29/A.5.30).

It is built from the receipts alone (the full records beside the backups may be gone by retention; the receipts
stay), and from the plan for what *should* have happened (the schedules and targets):

- backups taken against the backup schedule, each missed run named by its scheduled time; backups retention
  deleted since are still listed, marked deleted;
- restore tests: count, pass rate, median and worst measured RTO against the target, each failure named;
- base backups against the PITR schedules; PITR verifications and the recovery point they achieved;
- drills with their findings and action items; incidents (restores triggered by hand) with their timelines;
- key rotations and the encryption state of the backups taken;
- the chain's verification result, and the pack's own SHA-256 (``SHA256SUMS`` beside it).

Receipts come from a bucket: a value of the wrong type is left out (``None``), never a crash; the chain's
verification result, in the pack, says whether they can be trusted at all.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import statistics
from datetime import datetime, timedelta
from typing import Any

from pgdr.evidence import receipt_time
from pgdr.messages import duration_or_na

PACK_VERSION = 1
# Each section of the pack and the controls it evidences: (framework, control, what the control asks).
CONTROLS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "backups": (
        ("SOC 2", "A1.2", "data backup processes and recovery infrastructure are in place and operating"),
        ("ISO 27001", "A.8.13", "backup copies are taken as the backup policy says"),
    ),
    "restore_tests": (
        ("SOC 2", "A1.3", "recovery plan procedures are tested"),
        ("ISO 27001", "A.8.13", "backup copies are regularly tested"),
    ),
    "pitr": (
        ("SOC 2", "A1.2", "recovery infrastructure meets the recovery point objective"),
        ("ISO 27001", "A.8.13", "backups allow recovery to the required point"),
    ),
    "drills": (
        ("SOC 2", "A1.3", "recovery plan procedures are tested"),
        ("ISO 27001", "A.5.30", "ICT readiness for business continuity is planned and tested"),
    ),
    "incidents": (
        ("ISO 27001", "A.5.29", "information security is maintained during disruption"),
        ("ISO 27001", "A.5.30", "ICT continuity: recovery within the objectives"),
    ),
    "keys": (
        ("SOC 2", "A1.2", "backups are protected"),
        ("ISO 27001", "A.8.13", "backup copies are protected (encryption, key management)"),
    ),
}
SECTION_TITLES = {
    "backups": "Backups taken against the schedule",
    "restore_tests": "Restore tests",
    "pitr": "Point-in-time recovery: base backups and verifications",
    "drills": "DR drills",
    "incidents": "Incidents: restores triggered by hand",
    "keys": "Encryption and key rotations",
}


# -- reading receipts (untrusted values) ----------------------------------------------------------------
def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value[:500] if isinstance(value, str) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class _Receipt:
    """The fields of one receipt the pack reads, each of the type expected or ``None``."""

    def __init__(self, seq: int, body: dict[str, Any]):
        self.seq = seq
        self.at = receipt_time(body.get("at"))
        self.event = _str(body.get("event"))
        self.actor = _str(body.get("actor"))
        self.result = _str(body.get("result"))
        subject = _dict(body.get("subject"))
        self.database = _str(subject.get("database"))
        self.server = _str(subject.get("server"))
        self.backup_id = _str(subject.get("backup_id"))
        self.subject = subject
        self.details = _dict(body.get("details"))
        self.record = _dict(body.get("record"))

    def base(self) -> dict[str, Any]:
        """What every listed event shows: its receipt number, time, who, and result."""
        return {"receipt": self.seq, "at": self.at.isoformat(), "actor": self.actor, "result": self.result}


def utc_bound(text: str | None, end_of_day: bool = False) -> datetime | None:
    """A period's bound as a person gives it: a UTC date (with ``end_of_day``: its whole day, for ``--to``) or time;
    ``None`` when not given. :class:`~pgdr.errors.PgdrError` when it is neither."""
    from pgdr.errors import PgdrError
    from pgdr.incident import parse_timestamp

    if not text:
        return None
    moment = parse_timestamp(text)
    if moment is None:
        raise PgdrError(f"{text!r} is not a date or time; give e.g. 2026-10-01 or 2026-10-01T12:00:00")
    if end_of_day and len(text.strip()) == 10:
        moment += timedelta(days=1) - timedelta(microseconds=1)
    return moment


# -- schedules ------------------------------------------------------------------------------------------
def scheduled_runs(crons: list[str], start: datetime, end: datetime, now: datetime) -> list[tuple[datetime, datetime]]:
    """The runs the schedules ``crons`` asked for from ``start`` to ``end`` whose interval (to the next run) has
    ended by ``now``: ``(scheduled at, next run)``. An interval still open is not yet missed."""
    from croniter import croniter

    times: set[datetime] = set()
    for cron in crons:
        it = croniter(cron, start - timedelta(microseconds=1))
        while (moment := it.get_next(datetime)) < end and len(times) < 100_000:
            times.add(moment)
    ordered = sorted(times)
    runs = []
    for i, moment in enumerate(ordered):
        following = ordered[i + 1] if i + 1 < len(ordered) else _next_of(crons, moment)
        if following <= now:
            runs.append((moment, following))
    return runs


def _next_of(crons: list[str], moment: datetime) -> datetime:
    from croniter import croniter

    return min(croniter(cron, moment).get_next(datetime) for cron in crons)


def coverage(runs: list[tuple[datetime, datetime]], taken: list[datetime]) -> list[datetime]:
    """The scheduled runs no backup in ``taken`` covers (none finished in the run's interval): the missed runs."""
    return [start for start, following in runs if not any(start <= t < following for t in taken)]


# -- the pack -------------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(values), 1) if values else None,
        "worst_s": round(max(values), 1) if values else None,
    }


def _rate(passed: int, count: int) -> float | None:
    return round(passed / count, 4) if count else None


def _backups_section(db: dict[str, Any], mine: list[_Receipt], deleted: dict[str, datetime], runs) -> dict[str, Any]:
    taken = [r for r in mine if r.event == "backup_taken" and r.result == "ok"]
    listed = []
    for r in taken:
        d = r.details
        when = deleted.get(r.backup_id or "")
        listed.append(
            {
                **r.base(),
                "backup_id": r.backup_id,
                "recovery_point": _str(d.get("recovery_point")),
                "rows": _num(d.get("rows")),
                "stored_bytes": _num(d.get("stored_bytes")),
                "encrypted_under": _str(d.get("encrypted_under")),
                "deleted_by_retention_at": when.isoformat() if when else None,
            }
        )
    missed = coverage(runs, [r.at for r in taken]) if runs is not None else []
    return {
        "schedule": db["schedule"],
        "scheduled": len(runs) if runs is not None else None,
        "taken": len(taken),
        "missed": [m.isoformat() for m in missed],
        "deleted_by_retention": sum(1 for b in listed if b["deleted_by_retention_at"]),
        "list": listed,
    }


def _restore_tests_section(db: dict[str, Any], mine: list[_Receipt]) -> dict[str, Any]:
    tests = [r for r in mine if r.event in ("backup_verified", "backup_verification_failed")]
    rows, seconds = [], []
    for r in tests:
        d = r.details
        rto = _num(d.get("restore_seconds"))
        if rto is not None and r.event == "backup_verified":
            seconds.append(rto)
        rows.append(
            {
                **r.base(),
                "backup_id": r.backup_id,
                "passed": r.event == "backup_verified",
                "failed_phase": _str(d.get("failed_phase")),
                "rto_s": rto,
                "rto_met": d.get("rto_met") if isinstance(d.get("rto_met"), bool) else None,
                "verified_from": _str(d.get("verified_from")),
            }
        )
    passed = sum(1 for t in rows if t["passed"])
    return {
        "count": len(rows),
        "passed": passed,
        "failed": len(rows) - passed,
        "pass_rate": _rate(passed, len(rows)),
        "rto_target_s": db["rto_target_s"],
        **_stats(seconds),
        "rto_met": sum(1 for t in rows if t["rto_met"]),
        "list": rows,
    }


def _incidents_section(mine: list[_Receipt]) -> list[dict[str, Any]]:
    rows = []
    for r in mine:
        if r.event not in ("restore_finished", "restore_failed"):
            continue
        d, incident = r.details, _dict(r.details.get("incident"))
        rows.append(
            {
                **r.base(),
                "backup_id": r.backup_id,
                "server": r.server,
                "mode": _str(d.get("mode")),
                "triggered_by": _str(d.get("triggered_by")),
                "failed_phase": _str(d.get("failed_phase")),
                "achieved_rto_s": _num(d.get("achieved_rto_seconds")),
                "rto_target_s": _num(d.get("rto_target_seconds")),
                "recovery_point": _str(d.get("recovery_point")),
                "incident_id": _str(incident.get("id")),
                "timeline": {
                    k: _str(incident.get(k))
                    for k in ("declared_at", "triggered_at", "restored_at", "checks_passed_at", "served_at")
                },
                "mttr_s": _num(incident.get("mttr_seconds")),
                "data_loss_window_s": _num(incident.get("data_loss_window_seconds")),
            }
        )
    return rows


def _encryption_section(db: dict[str, Any], backups: dict[str, Any]) -> dict[str, Any]:
    keys = sorted({b["encrypted_under"] for b in backups["list"] if b["encrypted_under"]})
    return {
        "client_side_encryption": db["encryption"],
        "storage_encryption": db["storage_encryption"],
        "backups_encrypted": sum(1 for b in backups["list"] if b["encrypted_under"]),
        "backups_taken": backups["taken"],
        "keys_used": keys,
    }


def _server_section(server: dict[str, Any], mine: list[_Receipt], runs) -> dict[str, Any]:
    taken = [r for r in mine if r.event == "base_backup_taken" and r.result == "ok"]
    kinds = [_str(r.details.get("kind")) for r in taken]
    verifications = [r for r in mine if r.event in ("pitr_verified", "pitr_verification_failed")]
    rows, gaps = [], []
    for r in verifications:
        d = r.details
        target, achieved = receipt_time(d.get("target")), receipt_time(d.get("achieved_recovery_point"))
        gap = round((target - achieved).total_seconds(), 1) if target and achieved else None
        if gap is not None and r.event == "pitr_verified":
            gaps.append(gap)
        rows.append(
            {
                **r.base(),
                "backup_id": r.backup_id,
                "passed": r.event == "pitr_verified",
                "target": _str(d.get("target")),
                "achieved_recovery_point": _str(d.get("achieved_recovery_point")),
                "target_minus_achieved_s": gap,
                "replay_s": _num(d.get("replay_seconds")),
                "failed_phase": _str(d.get("failed_phase")),
            }
        )
    passed = sum(1 for v in rows if v["passed"])
    missed = coverage(runs, [r.at for r in taken]) if runs is not None else []
    return {
        "name": server["name"],
        "in_plan": server["in_plan"],
        "rpo_target_s": server["rpo_target_s"],
        "base_backups": {
            "schedules": server["schedules"],
            "scheduled": len(runs) if runs is not None else None,
            "taken": len(taken),
            "full": kinds.count("full"),
            "incremental": kinds.count("incremental"),
            "missed": [m.isoformat() for m in missed],
        },
        "verifications": {
            "count": len(rows),
            "passed": passed,
            "failed": len(rows) - passed,
            "pass_rate": _rate(passed, len(rows)),
            **{f"rpo_{k}": v for k, v in _stats(gaps).items()},
            "list": rows,
        },
        "incidents": _incidents_section(mine),
    }


def build_pack(
    receipts: list[tuple[int, dict[str, Any]]],
    plan_facts: dict[str, Any],
    since: datetime,
    until: datetime,
    now: datetime,
    chain: dict[str, Any],
    log_location: str,
) -> dict[str, Any]:
    """Return the evidence pack of ``since``..``until`` (both included) as a JSON-able dict.

    :param receipts: every receipt of the log, ``(number, body)``, in chain order (the ones before ``since`` tell
        where the log starts and which backups retention deleted).
    :param plan_facts: :func:`pgdr.airflow_glue.evidence.plan_facts`: the databases and servers, their schedules and
        targets.
    :param chain: the chain's verification: ``ok``, ``summary``, ``checked``, ``problems``.
    """
    readable = [r for seq, body in receipts if (r := _Receipt(seq, body)).at is not None and r.event]
    log_start = min((r.at for r in readable), default=None)
    in_period = [r for r in readable if since <= r.at <= until]
    # A backup deleted by retention (before the pack was made): its receipts remain, and so does its line.
    deleted: dict[str, datetime] = {}
    for r in readable:
        if r.event == "retention_deleted" and r.database:
            for backup_id in r.details.get("deleted") or []:
                if isinstance(backup_id, str):
                    deleted.setdefault(backup_id, r.at)
    window_end = min(until, now)

    def runs_of(crons: list[str]) -> list[tuple[datetime, datetime]] | None:
        """The scheduled runs in the period whose interval ends after the log's first receipt (before it, nothing
        was recorded); ``None``: nothing is scheduled (backups triggered from outside)."""
        if not crons:
            return None
        runs = scheduled_runs(crons, since, window_end, now) if since < window_end else []
        return [run for run in runs if log_start is None or run[1] > log_start]

    databases = []
    names = [d["name"] for d in plan_facts["databases"]]
    facts = {d["name"]: d for d in plan_facts["databases"]}
    for name in sorted({r.database for r in in_period if r.database} - set(names)):
        facts[name] = dict.fromkeys(("schedule", "rto_target_s", "rpo_target_s", "encryption", "storage_encryption"))
        facts[name].update(name=name, in_plan=False)  # in the receipts, no longer in the plan
        names.append(name)
    for name in names:
        db = facts[name]
        mine = [r for r in in_period if r.database == name]
        backups = _backups_section(db, mine, deleted, runs_of([db["schedule"]] if db["schedule"] else []))
        databases.append(
            {
                "name": name,
                "in_plan": db.get("in_plan", True),
                "rto_target_s": db["rto_target_s"],
                "rpo_target_s": db["rpo_target_s"],
                "backups": backups,
                "restore_tests": _restore_tests_section(db, mine),
                "incidents": _incidents_section(mine),
                "encryption": _encryption_section(db, backups),
            }
        )
    servers = []
    server_facts = {s["name"]: {**s, "in_plan": True} for s in plan_facts["servers"]}
    for name in sorted({r.server for r in in_period if r.server} - set(server_facts)):
        server_facts[name] = {"name": name, "in_plan": False, "rpo_target_s": None, "schedules": []}
    for name, server in server_facts.items():
        mine = [r for r in in_period if r.server == name]
        servers.append(_server_section(server, mine, runs_of(server["schedules"])))
    drills = [
        {
            **r.base(),
            "drill_id": _str(r.details.get("drill_id")) or _str(r.subject.get("drill")),
            "scenario": _str(r.details.get("scenario")),
            "status": _str(r.details.get("status")),
            "headline": [h for h in r.details.get("headline") or [] if isinstance(h, str)],
            "broken": [b for b in r.details.get("broken") or [] if isinstance(b, str)],
            "action_items": [a for a in r.details.get("action_items") or [] if isinstance(a, str)],
            "report": _str(r.details.get("report")),
        }
        for r in in_period
        if r.event == "drill_run"
    ]
    rotations = [
        {
            **r.base(),
            "key_connections": [k for k in r.subject.get("key_connections") or [] if isinstance(k, str)],
            "rewrapped": {conn: _num(_dict(v).get("rewrapped")) for conn, v in _dict(r.details.get("report")).items()},
            "error": _str(r.details.get("error")),
        }
        for r in in_period
        if r.event == "keys_rotated"
    ]
    retention = [
        {
            **r.base(),
            "database": r.database,
            "server": r.server,
            "deleted": [b for b in r.details.get("deleted") or [] if isinstance(b, str)],
            "wal_segments_deleted": _num(r.details.get("wal_segments_deleted")),
        }
        for r in in_period
        if r.event == "retention_deleted"
    ]
    events: dict[str, int] = {}
    for r in in_period:
        events[r.event] = events.get(r.event, 0) + 1
    return {
        "v": PACK_VERSION,
        "kind": "pgdr evidence pack",
        "plan": plan_facts.get("plan"),
        "period": {"from": since.isoformat(), "to": until.isoformat()},
        "generated_at": now.isoformat(),
        "evidence_log": log_location,
        "log_starts_at": log_start.isoformat() if log_start else None,
        "chain": chain,
        "receipts_in_period": len(in_period),
        "unreadable_receipts": len(receipts) - len(readable),
        "events": dict(sorted(events.items())),
        "controls": {
            section: [{"framework": f, "control": c, "asks": a} for f, c, a in controls]
            for section, controls in CONTROLS.items()
        },
        "databases": databases,
        "servers": servers,
        "drills": drills,
        "key_rotations": rotations,
        "retention": retention,
    }


def findings(pack: dict[str, Any]) -> list[str]:
    """What an auditor would flag in the pack, one line each (empty when every promise held)."""
    lines = []
    if not pack["chain"]["ok"]:
        lines.append(f"The evidence chain does not verify: {pack['chain']['summary']}")
    for db in pack["databases"]:
        b, t = db["backups"], db["restore_tests"]
        if b["missed"]:
            lines.append(f"{db['name']}: {len(b['missed'])} scheduled backups missed (first {_when(b['missed'][0])})")
        if t["failed"]:
            lines.append(f"{db['name']}: {t['failed']} of {t['count']} restore tests failed")
        if not t["count"] and b["taken"]:
            lines.append(f"{db['name']}: backups taken but none tested by restore in the period")
        if t["worst_s"] is not None and db["rto_target_s"] and t["worst_s"] > db["rto_target_s"]:
            lines.append(
                f"{db['name']}: the worst restore test took {duration_or_na(t['worst_s'])}, over the RTO target "
                f"{duration_or_na(db['rto_target_s'])}"
            )
        lines += _incident_findings(db["name"], db["incidents"])
    for s in pack["servers"]:
        v = s["verifications"]
        if s["base_backups"]["missed"]:
            missed = s["base_backups"]["missed"]
            lines.append(f"server {s['name']}: {len(missed)} scheduled base backups missed (first {_when(missed[0])})")
        if v["failed"]:
            lines.append(f"server {s['name']}: {v['failed']} of {v['count']} PITR verifications failed")
        lines += _incident_findings(f"server {s['name']}", s["incidents"])
    lines += [f"drill {d['drill_id']}: {item}" for d in pack["drills"] for item in (d["action_items"] or d["broken"])]
    lines += [
        f"key rotation at {_when(k['at'])} failed: {k['error']}" for k in pack["key_rotations"] if k["result"] != "ok"
    ]
    return lines


def _when(iso: str) -> str:
    """An ISO time of the pack as a person reads it: ``2026-11-12 00:00 UTC``."""
    return f"{iso[:16].replace('T', ' ')} UTC"


def _incident_findings(subject: str, incidents: list[dict[str, Any]]) -> list[str]:
    lines = []
    for i in incidents:
        if i["result"] != "ok":
            lines.append(
                f"{subject}: the incident restore at {_when(i['at'])} failed ({i['failed_phase'] or 'see report'})"
            )
        elif i["mttr_s"] is not None and i["rto_target_s"] and i["mttr_s"] > i["rto_target_s"]:
            lines.append(
                f"{subject}: incident {i['incident_id'] or _when(i['at'])} took {duration_or_na(i['mttr_s'])} to "
                f"recover (MTTR), over the RTO target {duration_or_na(i['rto_target_s'])}"
            )
    return lines


# -- files ----------------------------------------------------------------------------------------------
def pack_json(pack: dict[str, Any]) -> bytes:
    return json.dumps(pack, indent=2, sort_keys=True, ensure_ascii=False).encode()


def pack_files(pack: dict[str, Any]) -> dict[str, bytes]:
    """The pack's files: ``pack.json`` (every number), ``pack.html`` (for people; it shows the JSON's SHA-256),
    ``chart.png``, and ``SHA256SUMS`` (``sha256sum -c`` checks them)."""
    data = pack_json(pack)
    digest = hashlib.sha256(data).hexdigest()
    chart = pack_chart(pack)
    files = {"pack.json": data, "pack.html": render_html(pack, chart, digest).encode(), "chart.png": chart}
    files["SHA256SUMS"] = "".join(f"{hashlib.sha256(b).hexdigest()}  {n}\n" for n, b in files.items()).encode()
    return files


def pack_chart(pack: dict[str, Any]) -> bytes:
    """A PNG: each database's restore tests (measured RTO against its target) and each server's PITR
    verifications (target minus the recovery point reached against its RPO), over the period."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pgdr.drill import duration_axis, figure_png, finish_panel

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), dpi=100)
    panels = (
        (
            axes[0],
            "Restore tests: RTO measured",
            [
                (d["name"], d["rto_target_s"], [(t["at"], t["rto_s"]) for t in d["restore_tests"]["list"]])
                for d in pack["databases"]
            ],
        ),
        (
            axes[1],
            "PITR verifications: target − recovered",
            [
                (
                    s["name"],
                    s["rpo_target_s"],
                    [(v["at"], v["target_minus_achieved_s"]) for v in s["verifications"]["list"]],
                )
                for s in pack["servers"]
            ],
        ),
    )
    for ax, title, series in panels:
        drawn = [
            (n, target, [(datetime.fromisoformat(a), v) for a, v in pts if v is not None]) for n, target, pts in series
        ]
        drawn = [(n, target, pts) for n, target, pts in drawn if pts]
        duration_axis(ax, [v for _, target, pts in drawn for v in (*(p[1] for p in pts), target)])
        for name, target, pts in drawn:
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)[0]
            if target:
                ax.axhline(target, color=line.get_color(), linestyle="--", linewidth=1, label=f"{name} target")
        ax.set_xlim(datetime.fromisoformat(pack["period"]["from"]), datetime.fromisoformat(pack["period"]["to"]))
        finish_panel(ax, title, "none in the period")
    fig.autofmt_xdate()
    return figure_png(fig)


def _controls_line(section: str) -> str:
    return " · ".join(f"{f} {c}" for f, c, _ in CONTROLS[section])


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate * 100:.0f} %"


def render_html(pack: dict[str, Any], chart_png: bytes, json_sha256: str) -> str:
    """Return the pack as one self-contained HTML page (the chart embedded), styled as the drill report."""
    from pgdr.drill import REPORT_CSS

    e = html.escape
    chain_ok = pack["chain"]["ok"]
    found = findings(pack)
    control_rows = "".join(
        f"<tr><td>{e(f)} {e(c)}</td><td>{e(a)}</td><td>{e(SECTION_TITLES[section])}</td></tr>"
        for section, controls in CONTROLS.items()
        for f, c, a in controls
    )

    backup_rows, test_rows, enc_rows = [], [], []
    for db in pack["databases"]:
        b, t, enc = db["backups"], db["restore_tests"], db["encryption"]
        missed = ", ".join(m[:16].replace("T", " ") for m in b["missed"][:6]) + (" …" if len(b["missed"]) > 6 else "")
        scheduled = "not scheduled" if b["scheduled"] is None else str(b["scheduled"])
        backup_rows.append(
            f"<tr><th>{e(db['name'])}</th><td>{e(str(b['schedule'] or 'none'))}</td><td>{scheduled}</td>"
            f"<td>{b['taken']}</td><td class='{'bad' if b['missed'] else 'ok'}'>{len(b['missed'])}"
            f"{'<br><small>' + e(missed) + '</small>' if missed else ''}</td><td>{b['deleted_by_retention']}</td></tr>"
        )
        worst_bad = t["worst_s"] is not None and db["rto_target_s"] and t["worst_s"] > db["rto_target_s"]
        test_rows.append(
            f"<tr><th>{e(db['name'])}</th><td>{t['count']}</td><td class='{'bad' if t['failed'] else 'ok'}'>"
            f"{_pct(t['pass_rate'])} <small>({t['passed']} of {t['count']})</small></td>"
            f"<td>{duration_or_na(t['median_s'])}</td><td class='{'bad' if worst_bad else 'ok'}'>"
            f"{duration_or_na(t['worst_s'])}</td><td>{duration_or_na(db['rto_target_s'])}</td></tr>"
        )
        enc_rows.append(
            f"<tr><th>{e(db['name'])}</th><td>{e(enc['client_side_encryption'] or 'off')}</td>"
            f"<td>{e(enc['storage_encryption'] or 'none asked')}</td><td>{enc['backups_encrypted']} of "
            f"{enc['backups_taken']}</td><td>{e(', '.join(enc['keys_used']) or '-')}</td></tr>"
        )
    failures = "".join(
        f"<li>{e(db['name'])}: backup {e(t['backup_id'] or '?')} at {e(t['at'][:19])}: failed in "
        f"{e(t['failed_phase'] or '?')}</li>"
        for db in pack["databases"]
        for t in db["restore_tests"]["list"]
        if not t["passed"]
    )
    server_rows = "".join(
        f"<tr><th>{e(s['name'])}</th><td>{s['base_backups']['taken']} <small>({s['base_backups']['full']} full, "
        f"{s['base_backups']['incremental']} incremental)</small></td>"
        f"<td class='{'bad' if s['base_backups']['missed'] else 'ok'}'>{len(s['base_backups']['missed'])}</td>"
        f"<td class='{'bad' if s['verifications']['failed'] else 'ok'}'>{_pct(s['verifications']['pass_rate'])} "
        f"<small>({s['verifications']['passed']} of {s['verifications']['count']})</small></td>"
        f"<td>{duration_or_na(s['verifications']['rpo_median_s'])}</td>"
        f"<td>{duration_or_na(s['verifications']['rpo_worst_s'])}</td><td>{duration_or_na(s['rpo_target_s'])}</td>"
        "</tr>"
        for s in pack["servers"]
    )
    incidents = [(db["name"], i) for db in pack["databases"] for i in db["incidents"]]
    incidents += [(f"server {s['name']}", i) for s in pack["servers"] for i in s["incidents"]]
    incident_rows = "".join(
        f"<tr><td>{e(i['at'][:19].replace('T', ' '))}</td><td>{e(i['incident_id'] or '-')}</td><td>{e(who)}</td>"
        f"<td class='{'ok' if i['result'] == 'ok' else 'bad'}'>{e(i['result'] or '?')}</td>"
        f"<td>{e(i['triggered_by'] or i['actor'] or '?')}</td><td>{e(i['mode'] or '-')}</td>"
        f"<td>{duration_or_na(i['mttr_s'])} <small>/ {duration_or_na(i['rto_target_s'])}</small></td>"
        f"<td>{duration_or_na(i['data_loss_window_s'])}</td></tr>"
        for who, i in incidents
    )
    drill_rows = "".join(
        f"<tr><td>{e(d['at'][:19].replace('T', ' '))}</td><td>{e(d['drill_id'] or '?')}</td>"
        f"<td class='{'ok' if d['result'] == 'ok' else 'bad'}'>{e((d['status'] or d['result'] or '?').upper())}</td>"
        f"<td>{'<br>'.join(e(h) for h in d['headline'][:4])}</td>"
        f"<td>{'<br>'.join(e(a) for a in (d['action_items'] or d['broken'])) or 'none'}</td></tr>"
        for d in pack["drills"]
    )
    rotation_rows = "".join(
        f"<tr><td>{e(k['at'][:19].replace('T', ' '))}</td><td>{e(', '.join(k['key_connections']))}</td>"
        f"<td class='{'ok' if k['result'] == 'ok' else 'bad'}'>{e(k['result'] or '?')}</td>"
        f"<td>{e(_rewrapped(k))}</td><td>{e(k['actor'] or '?')}</td></tr>"
        for k in pack["key_rotations"]
    )
    sections = [
        _section("backups", _table(BACKUP_HEADERS, backup_rows)),
        _section(
            "restore_tests",
            _table(TEST_HEADERS, test_rows) + (f"<p>Failed tests:</p><ul>{failures}</ul>" * bool(failures)),
        ),
        "<img alt='Restore tests and PITR verifications over the period against their targets' "
        f"src='data:image/png;base64,{base64.b64encode(chart_png).decode()}'>",
        _section(
            "pitr",
            _table(SERVER_HEADERS, server_rows) if server_rows else "<p>No server under point-in-time recovery.</p>",
        ),
        _section("drills", _table(DRILL_HEADERS, drill_rows) if drill_rows else "<p>No drill in the period.</p>"),
        _section(
            "incidents",
            _table(INCIDENT_HEADERS, incident_rows) if incident_rows else "<p>No incident restore in the period.</p>",
        ),
        _section(
            "keys",
            _table(KEY_HEADERS, enc_rows)
            + (_table(ROTATION_HEADERS, rotation_rows) if rotation_rows else "<p>No key rotation in the period.</p>"),
        ),
    ]
    findings_html = "".join(f"<li>{e(f)}</li>" for f in found) or "<li>None: every promise held.</li>"
    period = f"{pack['period']['from'][:10]} to {pack['period']['to'][:10]}"
    body = "\n".join(sections)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pgdr evidence pack {e(period)}</title>
<style>
{REPORT_CSS}
td {{ vertical-align: top; }} .ctl {{ font-size: .85rem; color: #5a6478; }}
code {{ font-size: .8rem; word-break: break-all; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>DR evidence pack, {e(period)}</h1>
<p class="sub">Plan {e(str(pack.get("plan") or "?"))} · evidence log {e(pack["evidence_log"])} · generated
{e(pack["generated_at"][:19])} UTC · {pack["receipts_in_period"]} receipts in the period</p>
<p class="verdict {"ok" if chain_ok else "bad"}">{e(pack["chain"]["summary"])}</p>
<p><small>SHA-256 of pack.json: <code>{json_sha256}</code> (SHA256SUMS beside this page lists every file).</small></p>
<h2>Findings</h2><ul>{findings_html}</ul>
{body}
<h2>Controls evidenced</h2>
{_table(("Control", "What it asks", "Section"), [control_rows])}
<p><small>Generated by pgdr from the signed receipts of the evidence log. pack.json beside this page has every
number and every receipt's number; <code>python -m pgdr evidence verify</code> re-checks the chain.</small></p>
</body></html>
"""


BACKUP_HEADERS = ("Database", "Schedule (UTC)", "Scheduled", "Taken", "Missed", "Since deleted by retention")
TEST_HEADERS = ("Database", "Tests", "Pass rate", "Median RTO", "Worst RTO", "RTO target")
SERVER_HEADERS = (
    "Server",
    "Base backups",
    "Missed",
    "Verifications passed",
    "Target − recovered, median",
    "worst",
    "RPO target",
)
DRILL_HEADERS = ("When (UTC)", "Drill", "Result", "Findings", "Action items")
INCIDENT_HEADERS = ("When (UTC)", "Incident", "What", "Result", "Who", "Mode", "MTTR / RTO target", "Data-loss window")
KEY_HEADERS = ("Database", "Client-side encryption", "Storage encryption", "Backups encrypted", "Keys")
ROTATION_HEADERS = ("Rotated (UTC)", "Keys", "Result", "Rewrapped", "By")


def _table(headers: tuple[str, ...], rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _section(name: str, body: str) -> str:
    return (
        f"<h2>{html.escape(SECTION_TITLES[name])}</h2><p class='ctl'>Evidences {html.escape(_controls_line(name))}</p>"
        f"{body}"
    )


def _rewrapped(rotation: dict[str, Any]) -> str:
    counts = [f"{conn}: {int(n)} rewrapped" for conn, n in rotation["rewrapped"].items() if n is not None]
    return ", ".join(counts) or rotation["error"] or "-"
