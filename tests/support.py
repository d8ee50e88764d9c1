"""Real local stand-ins that the tests read: a Slack webhook receiver and a faulty network path.

Nothing here mocks pgdr's collaborators: Slack messages arrive over HTTP as the provider's
notifier sends them, and the fault proxy cuts a real TCP path to a real S3 endpoint.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml


class SlackReceiver:
    """An HTTP server on 127.0.0.1 that records every JSON body posted to it."""

    def __init__(self):
        self.messages: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                try:
                    receiver.messages.append({"path": self.path, **json.loads(body)})
                except ValueError:
                    receiver.messages.append({"path": self.path, "raw": body.decode(errors="replace")})
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services/T000/B000/pgdr-test"

    def connection(self) -> str:
        """Return the AIRFLOW_CONN_ JSON of a slackwebhook connection posting here."""
        return json.dumps({"conn_type": "slackwebhook", "password": self.url})

    def texts(self) -> list[str]:
        return [m.get("text", "") for m in self.messages]

    def clear(self) -> None:
        self.messages.clear()

    def close(self) -> None:
        self.server.shutdown()


class FaultProxy:
    """A TCP proxy to ``upstream`` that can be told to fail, as a network or server outage would.

    ``cut_after(n)``: forward ``n`` more client bytes, then drop every connection and refuse
    new ones (an endpoint that goes away mid-upload); ``cut_after_download(n)`` does the same
    after ``n`` more bytes from the server (mid-download). ``heal()`` restores the path.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._budget: int | None = None
        self._download_budget: int | None = None
        self._down = False
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, n_bytes: int) -> None:
        with self._lock:
            self._budget = n_bytes

    def cut_after_download(self, n_bytes: int) -> None:
        with self._lock:
            self._download_budget = n_bytes

    def heal(self) -> None:
        with self._lock:
            self._budget, self._download_budget, self._down = None, None, False

    @property
    def is_down(self) -> bool:
        return self._down

    def _go_down(self) -> None:
        self._down = True
        for conn in list(self._conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._down:
                # An abortive close (RST): the client sees "connection reset/refused".
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    budget = "_budget" if counted else "_download_budget"
                    if getattr(self, budget) is not None:
                        setattr(self, budget, getattr(self, budget) - len(data))
                        if getattr(self, budget) < 0:
                            self._go_down()
                            return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        self._go_down()


def archiving_server(
    directory: Path,
    s3_port: int,
    bucket: str,
    prefix: str,
    server: str,
    access_key="testing-key",
    archive_timeout_s=10,
    settings: dict[str, str] | None = None,
):
    """Start an embedded PostgreSQL 18 server in ``directory`` whose archive_command is the real archiver
    (barman-cloud, run as the server's OS user) writing to ``bucket``/``prefix`` on the S3 endpoint at ``s3_port`` with
    ``access_key`` (archive_timeout ``archive_timeout_s``; more ``settings`` when given). Its ``archive`` attribute is
    the :class:`~pgdr.physical.archive.WalArchive` it writes to. Skips the test where barman-cloud is not installed,
    saying how to install it."""
    import os

    import pytest
    from pgdr.errors import PgdrError
    from pgdr.local.embedded import EmbeddedServer
    from pgdr.physical.archive import ArchiveAccess, WalArchive, archiver_bin_dir, check_archiver_runs_as_server_user
    from pgdr.storage.layout import PhysicalLayout

    try:
        bin_dir = archiver_bin_dir()
        check_archiver_runs_as_server_user(bin_dir, 65534 if os.geteuid() == 0 else None)
    except PgdrError as err:
        pytest.skip(f"{err} (make archiver installs it)")
    access = ArchiveAccess(f"http://127.0.0.1:{s3_port}", "us-east-1", access_key, "testing-secret")
    archive = WalArchive(bucket, PhysicalLayout(prefix), server, access)
    started = EmbeddedServer(
        directory,
        settings=archive.server_settings(archive_timeout_s=archive_timeout_s, bin_dir=bin_dir) | (settings or {}),
        environment=access.environment(),
    ).start()
    started.archive = archive
    return started


def append_at_once(open_log, writers: int, receipts: int) -> list[Exception]:
    """Append to an evidence log from ``writers`` threads released together, each opening the log itself
    (``open_log()``, as each task does) and appending ``receipts`` receipts of its own (database ``db<n>``, backup
    ``<i>``); return what they raised."""
    start, errors = threading.Barrier(writers), []

    def writer(n: int) -> None:
        log = open_log()
        start.wait()
        try:
            for i in range(receipts):
                log.append("backup_taken", "schedule", {"database": f"db{n}", "backup_id": str(i)}, "ok")
        except Exception as err:  # noqa: BLE001 - returned to the test
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def aws_connection(port: int, access_key: str = "testing-key") -> str:
    """Return the AIRFLOW_CONN_ JSON of an AWS connection to an S3 endpoint on 127.0.0.1:port."""
    return json.dumps(
        {
            "conn_type": "aws",
            "login": access_key,
            "password": "testing-secret",
            "extra": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"},
        }
    )


def botocore_read_recorder(read: list):
    """Return a stand-in for botocore's ``JSONFileLoader.load_file`` that appends the path of each data file it parses
    from disk to ``read``; the caller installs it (``monkeypatch.setattr``, or a plain assignment in a subprocess)."""
    import botocore.loaders

    original = botocore.loaders.JSONFileLoader.load_file

    def load_file(self, path):
        read.append(path)
        return original(self, path)

    return load_file


def write_plan(path: Path, databases: list[dict], storage: dict, **sections) -> Path:
    """Write a DR plan for a test: ``databases`` entries, ``storage`` targets, other sections."""
    plan = {
        "version": 1,
        "backup": {"schedule": "@daily", "retries": 1, "retry_delay": "1s", **sections.pop("backup", {})},
        "storage": storage,
        "defaults": {
            "notify": {"slack_conn_id": "pgdr_slack"},
            "restore_conn_id": "pgdr_restore",
            **sections.pop("defaults", {}),
        },
        "databases": databases,
        **sections,
    }
    plan["defaults"] = {k: v for k, v in plan["defaults"].items() if v is not None}  # None: leave the key out
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.1):
    """Wait until ``predicate()`` is truthy; return its value or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


class MailInbox:
    """An SMTP server (aiosmtpd) on 127.0.0.1 that keeps every message it receives."""

    def __init__(self):
        from email import message_from_bytes, policy

        from aiosmtpd.controller import Controller
        from pgdr.postgres.binaries import free_port

        inbox = self
        self.messages: list = []

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's naming
                message = message_from_bytes(envelope.content, policy=policy.default)
                inbox.messages.append(message)
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def connection(self) -> str:
        """Return the AIRFLOW_CONN_ JSON of an SMTP connection to this server (no TLS)."""
        return json.dumps(
            {
                "conn_type": "smtp",
                "host": "127.0.0.1",
                "port": self.port,
                "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "pgdr@example.com"},
            }
        )

    @staticmethod
    def body(message) -> str:
        part = message.get_body(preferencelist=("html", "plain"))
        return part.get_content() if part is not None else ""

    def close(self) -> None:
        self.controller.stop()


# -- content fingerprints: what "restored exactly" means ---------------------------------------------

_FINGERPRINT_RELATIONS = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND NOT EXISTS (
      SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
"""


def fingerprint(dsn: dict, relations: set[tuple[str, str]] | None = None) -> dict:
    """Return an order-independent fingerprint of a database's content, computed in SQL.

    Per table (and materialized view): the row count and an MD5 of the sorted MD5s of its rows'
    text. Also the large objects (OID and content) and every sequence's last value. Keys are
    ``(schema, name)`` tuples straight from the catalog, so no quoting rule is involved.
    """
    import psycopg
    from psycopg import sql

    result: dict = {"tables": {}}
    with psycopg.connect(**dsn) as conn:
        for schema, name in conn.execute(_FINGERPRINT_RELATIONS).fetchall():
            if relations is not None and (schema, name) not in relations:
                continue
            query = sql.SQL(
                "SELECT count(*), coalesce(md5(string_agg(h, '' ORDER BY h)), '') FROM (SELECT md5(t::text) AS h "
                "FROM ONLY {} t) rows"
            ).format(sql.Identifier(schema, name))
            result["tables"][(schema, name)] = tuple(conn.execute(query).fetchone())
        if relations is None:
            result["large_objects"] = conn.execute(
                "SELECT count(*), coalesce(md5(string_agg(oid::text || ':' || md5(lo_get(oid)), ',' ORDER BY oid)), "
                "'') FROM pg_largeobject_metadata"
            ).fetchone()
            result["sequences"] = dict(
                ((s, n), v) for s, n, v in conn.execute("SELECT schemaname, sequencename, last_value FROM pg_sequences")
            )
    return result


def load_sql(server, dbname: str, path: Path) -> None:
    """Create ``dbname`` (any name) on ``server`` afresh and run the SQL file ``path`` in it with psql."""
    import os
    import subprocess

    import psycopg
    from pgdr.identifiers import conninfo
    from pgdr.postgres.binaries import bundled_bin_dir
    from psycopg import sql

    with psycopg.connect(**server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    result = subprocess.run(
        [
            str(bundled_bin_dir() / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            str(path),
            "--dbname",
            conninfo("127.0.0.1", server.port, server.superuser, dbname),
        ],
        env={**os.environ, "PGPASSWORD": server.password},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"loading {path} into {dbname!r} failed:\n{result.stderr}")


def copy_backup_as(store, layout, manifest, backup_id: str, recovery_point, copy_data: bool = True) -> None:
    """Store a copy of the backup ``manifest`` as an older backup ``backup_id`` taken at ``recovery_point``.

    The copy's data keys are its own (a manifest that points into another backup is refused);
    with ``copy_data`` false only the manifest is written, for tests that never read the files.
    """
    import json

    data = json.loads(manifest.to_json())
    data.update(backup_id=backup_id, recovery_point=recovery_point.isoformat())
    for entry in data["files"]:
        key = layout.data_key(manifest.database, backup_id, entry["name"])
        if copy_data:
            store.put_bytes(key, store.get_bytes(entry["key"]))
        entry["key"] = key
    store.put_bytes(layout.manifest_key(manifest.database, backup_id), json.dumps(data).encode())


ACCESS_DENIED = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
)


class S3Gateway:
    """An HTTP gateway in front of the real moto server, for what moto does not enforce: each request is shown to
    :meth:`refuse`, which answers it itself (``(status, body)``) or lets it through unchanged (``None``)."""

    def __init__(self, upstream_port: int):
        import http.client

        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, status: int, data: bytes, headers=(("Content-Type", "application/xml"),)) -> None:
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path, _, query = self.path.partition("?")
                refusal = gateway.refuse(self.command, path, query, self.headers, body)
                if refusal is not None:
                    return self._answer(*refusal)
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                self._answer(response.status, response.read(), response.getheaders())
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815 - http.server's naming

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def refuse(self, method: str, path: str, query: str, headers, body: bytes) -> tuple[int, bytes] | None:
        raise NotImplementedError

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SseRequiredGateway(S3Gateway):
    """The S3 server behind a bucket policy that denies every write without server-side encryption.

    moto stores bucket policies but ignores their conditions (moto/s3/models.py, put_bucket_policy:
    "Conditions are not taken into account"), so the policy AWS users write,

        {"Effect": "Deny", "Action": "s3:PutObject",
         "Condition": {"StringNotEquals": {"s3:x-amz-server-side-encryption": "<sse>"}}}

    is enforced here instead: an HTTP gateway in front of the real moto server answers a PutObject,
    CreateMultipartUpload or CopyObject that lacks the header (or names another kind) with S3's
    403 AccessDenied, and forwards everything else unchanged. ``denied`` lists what it refused.
    """

    def __init__(self, upstream_port: int, sse: str):
        self.sse, self.denied, self.writes = sse, [], 0
        super().__init__(upstream_port)

    def refuse(self, method: str, path: str, query: str, headers, body: bytes) -> tuple[int, bytes] | None:
        is_write = (
            method == "PUT"
            and path.count("/") >= 2
            and "partNumber=" not in query
            and not query.startswith(("policy", "encryption", "tagging", "acl"))
        )
        is_write |= method == "POST" and query.startswith("uploads")
        if not is_write:
            return None
        self.writes += 1
        if headers.get("x-amz-server-side-encryption") == self.sse:
            return None
        self.denied.append(f"{method} {path}{'?' + query if query else ''}")
        return 403, ACCESS_DENIED


def iam_policy(name: str, bucket: str, prefix: str, server: str = "") -> dict:
    """The README's IAM policy ``docs/iam/<name>.json`` for ``bucket`` and ``prefix`` (and ``server``): the very
    document a user pastes, with its placeholders filled in."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "iam" / f"{name}.json").read_text()
    return json.loads(text.replace("BUCKET_NAME", bucket).replace("PREFIX", prefix).replace("SERVER", server))


def _iam_pattern(pattern: str):
    """IAM's wildcards (``*`` any run, ``?`` one character) as a regular expression; nothing else is special."""
    import re

    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern) + r"\Z")


def iam_allows(policy: dict, action: str, resource: str, context: dict[str, str]) -> bool:
    """Evaluate one identity policy as IAM does for one request: an explicit Deny wins, else an Allow is needed.

    Conditions: ``StringLike`` and ``StringLikeIfExists`` (the ones pgdr's policies use); a key absent from the
    request fails ``StringLike`` and passes ``StringLikeIfExists``, as in IAM.
    """

    def listed(value) -> list[str]:
        return value if isinstance(value, list) else [value]

    def holds(conditions: dict) -> bool:
        for operator, keys in conditions.items():
            if operator not in ("StringLike", "StringLikeIfExists"):
                raise ValueError(f"condition operator {operator} is not evaluated here")
            for key, patterns in keys.items():
                if key not in context:
                    if operator == "StringLike":
                        return False
                    continue
                if not any(_iam_pattern(p).match(context[key]) for p in listed(patterns)):
                    return False
        return True

    allowed = False
    for statement in listed(policy["Statement"]):
        if not any(_iam_pattern(a).match(action) for a in listed(statement["Action"])):
            continue
        if not any(_iam_pattern(r).match(resource) for r in listed(statement["Resource"])):
            continue
        if not holds(statement.get("Condition", {})):
            continue
        if statement["Effect"] == "Deny":
            return False
        allowed = True
    return allowed


def s3_request_actions(method: str, path: str, query: str, headers, body: bytes) -> list[tuple[str, str, dict]]:
    """What IAM authorizes for one path-style S3 request: ``(action, resource ARN, condition context)`` each.

    A DeleteObjects request is one authorization per object, as in S3 (which refuses each object it may not delete
    and deletes the others).
    """
    import xml.etree.ElementTree as ET
    from urllib.parse import parse_qs, unquote

    params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
    bucket, _, key = unquote(path).lstrip("/").partition("/")
    bucket_arn, object_arn = f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/{key}"
    listing = {"s3:prefix": params["prefix"]} if "prefix" in params else {}
    if not key:
        if method == "POST" and "delete" in params:
            actions = []
            for item in ET.fromstring(body).iter():
                if item.tag.endswith("Object"):
                    name = next(c.text for c in item if c.tag.endswith("Key"))
                    versioned = any(c.tag.endswith("VersionId") for c in item)
                    action = "s3:DeleteObjectVersion" if versioned else "s3:DeleteObject"
                    actions.append((action, f"{bucket_arn}/{name}", {}))
            return actions
        by_query = {
            "versions": "s3:ListBucketVersions",
            "object-lock": "s3:GetBucketObjectLockConfiguration"
            if method == "GET"
            else "s3:PutBucketObjectLockConfiguration",
            "lifecycle": "s3:GetLifecycleConfiguration" if method == "GET" else "s3:PutLifecycleConfiguration",
            "location": "s3:GetBucketLocation",
        }
        for name, action in by_query.items():
            if name in params:
                return [(action, bucket_arn, listing if name == "versions" else {})]
        if method in ("GET", "HEAD"):
            return [("s3:ListBucket", bucket_arn, listing)]
        return [
            ({"PUT": "s3:CreateBucket", "DELETE": "s3:DeleteBucket"}.get(method, f"s3:{method}Bucket"), bucket_arn, {})
        ]
    if "retention" in params:
        return [("s3:GetObjectRetention" if method == "GET" else "s3:PutObjectRetention", object_arn, {})]
    if method in ("GET", "HEAD"):
        return [("s3:GetObjectVersion" if "versionId" in params else "s3:GetObject", object_arn, {})]
    if method == "DELETE":
        if "uploadId" in params:
            return [("s3:AbortMultipartUpload", object_arn, {})]
        return [("s3:DeleteObjectVersion" if "versionId" in params else "s3:DeleteObject", object_arn, {})]
    actions = [("s3:PutObject", object_arn, {})]  # PUT, a part, or POST ?uploads / ?uploadId
    source = headers.get("x-amz-copy-source")
    if source:
        source_path, _, source_query = unquote(source).partition("?")
        read = "s3:GetObjectVersion" if "versionId=" in source_query else "s3:GetObject"
        actions.append((read, f"arn:aws:s3:::{source_path.lstrip('/')}", {}))
    return actions


class IamGateway(S3Gateway):
    """The S3 server behind IAM: every request is authorized by the identity policy of its access key, as AWS does.

    moto does not evaluate IAM policies unless told to, and then only for its own users; so the README's policy
    documents (``docs/iam``) are enforced here, in front of the real moto server: a request its key's policy does not
    allow gets S3's 403 AccessDenied (a DeleteObjects one per-object errors, as S3 answers), anything else is
    forwarded unchanged. ``denied`` lists ``(access key, action, resource)`` of each refusal.
    """

    def __init__(self, upstream_port: int, policies: dict[str, dict]):
        self.policies, self.denied = policies, []
        super().__init__(upstream_port)

    def refuse(self, method: str, path: str, query: str, headers, body: bytes) -> tuple[int, bytes] | None:
        import re
        from html import escape

        found = re.search(r"Credential=([^/]+)/", headers.get("Authorization", ""))
        access_key = found.group(1) if found else ""
        policy = self.policies.get(access_key, {"Statement": []})
        refused = [
            (action, resource)
            for action, resource, context in s3_request_actions(method, path, query, headers, body)
            if not iam_allows(policy, action, resource, context)
        ]
        if not refused:
            return None
        self.denied += [(access_key, *r) for r in refused]
        if method == "POST" and "delete" in query:
            # S3 would delete the permitted objects of the batch; here none is when one is refused (pgdr's policies
            # grant a prefix whole or not at all, so a batch is one or the other)
            errors = "".join(
                f"<Error><Key>{escape(r.partition(':::')[2].partition('/')[2])}</Key>"
                "<Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
                for _, r in refused
            )
            return 200, f"<?xml version='1.0' encoding='UTF-8'?><DeleteResult>{errors}</DeleteResult>".encode()
        return 403, ACCESS_DENIED


def xcom_of(dag_run, task_id: str):
    """Return what ``task_id`` of ``dag_run`` (a ``dag.test()`` run) returned, from the metadata database."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        value = (
            session.query(XComModel.value)
            .filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id, key="return_value")
            .scalar()
        )
    return json.loads(value) if isinstance(value, str) else value
