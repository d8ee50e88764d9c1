"""Storage backends: where backup bytes live, behind one small interface.

Two backends implement :class:`BackupStore`: :class:`LocalFolderStore` (the embedded default, a
folder on disk) and :class:`S3Store` (any S3 endpoint: AWS, MinIO, moto). Keys are opaque
strings built by :mod:`pgdr.storage.layout`; a backend never invents a key.

Both backends make a single object appear atomically: a reader sees the whole object or none
of it (a local file is written under a temporary name and renamed; an S3 object is only
visible once its upload completes). A backup as a whole becomes visible when its manifest,
written last, appears.

Errors that retrying may fix (a refused connection, a timeout, a 5xx) are raised as
:class:`~pgdr.errors.StorageUnavailable`; a missing object as :class:`FileNotFoundError`.

**Object Lock.** An S3 target may be *immutable*: its bucket has S3 Object Lock enabled (and so
versioning), and pgdr writes every object with a retention (``GOVERNANCE`` or ``COMPLIANCE``) of
:attr:`ObjectLock.days`. Until that date no one, not the workers' credentials nor an attacker holding
them (nor, in compliance mode, the account's root), can delete or overwrite the version written: a
PUT to the same key adds a newer version, a DELETE without a version id only hides the object behind
a delete marker. So on such a target :meth:`S3Store.delete` deletes versions, and only once their
lock has passed; the callers ask :meth:`BackupStore.held` first and schedule instead of
trying (a refused delete is an error, never a silent success).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO, Protocol

from pgdr.errors import PermanentFailure, StorageUnavailable

CHUNK = 1 << 20
log = logging.getLogger(__name__)


def sha256_stream(stream: BinaryIO, sink=None) -> tuple[int, str]:
    """Read ``stream`` to its end in :data:`CHUNK` pieces, passing each to ``sink`` if given;
    return the number of bytes read and their SHA-256."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink(chunk)
    return size, digest.hexdigest()


LOCK_MODES = ("governance", "compliance")


@dataclass(frozen=True)
class ObjectLock:
    """The S3 Object Lock retention every object of a target is written with: ``mode`` (``governance``: a
    principal with ``s3:BypassGovernanceRetention`` may still delete; ``compliance``: no one may) for ``days``."""

    mode: str
    days: int

    def until(self, written: datetime) -> datetime:
        """Return the date an object written at ``written`` stays locked until."""
        return written + timedelta(days=self.days)

    def describe(self) -> str:
        return f"{self.mode} mode, {self.days} day{'s' if self.days != 1 else ''}"


def delete_unless_locked(
    what: str, why: str, held_until: datetime | None, delete: Callable[[], object], scheduled: dict[str, str], name: str
) -> bool:
    """Delete one backup (``delete()``) that retention no longer keeps (``why``), unless Object Lock holds it
    (``held_until``): then record it in ``scheduled`` under ``name`` with that date, try nothing, return ``False``."""
    if held_until is not None:
        log.info(
            "%s is due for deletion (%s) but under Object Lock until %s UTC: the first retention run after that "
            "deletes it.",
            what,
            why,
            f"{held_until:%Y-%m-%d %H:%M}",
        )
        scheduled[name] = held_until.isoformat()
        return False
    log.info("Deleting %s: %s.", what, why)
    delete()
    return True


@dataclass(frozen=True)
class StoredObject:
    """One object in a store: its key, size in bytes and last-modified time (UTC)."""

    key: str
    size: int
    modified: datetime


class BackupStore(Protocol):
    """The operations pgdr needs from a storage target."""

    def describe(self, key: str = "") -> str:
        """Return a location a person can paste (``s3://bucket/key`` or a path)."""

    def put_file(self, key: str, local_path: Path) -> None:
        """Upload a local file to ``key``, replacing any object there."""

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``key``, replacing any object there."""

    def put_new(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``key`` only if no object is there, atomically (of two writers one wins);
        :class:`FileExistsError` for the other."""

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        """Write what ``stream`` yields, to its end, to ``key``, replacing any object there (no local copy)."""

    def get_bytes(self, key: str) -> bytes:
        """Return the whole object at ``key``."""

    def open_read(self, key: str) -> BinaryIO:
        """Return a readable binary stream of the object at ``key``; the caller closes it."""

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Yield every object whose key starts with ``prefix``."""

    def delete(self, keys: list[str]) -> None:
        """Delete the objects at ``keys``; missing ones are ignored. An object the store refuses to delete
        raises :class:`~pgdr.errors.PermanentFailure` naming it: nothing is reported deleted that is not."""

    def held(self, keys: list[str], now: datetime) -> dict[str, datetime]:
        """Return those of ``keys`` Object Lock keeps from being deleted at ``now``, each with the date it
        is held until (its latest locked version's); empty when all of them may be deleted."""

    def earlier_versions(self, key: str) -> list[tuple[datetime, bytes]]:
        """Return the versions of ``key`` before its current one (a versioned bucket keeps them; under Object Lock
        for its whole retention), newest first, each with the time it was written: ``[]`` where there are none."""

    def exists(self, key: str) -> bool:
        """Say whether an object is stored at ``key``."""


class LocalFolderStore:
    """A storage target that is a folder on a local (or mounted) file system."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"storage key {key!r} escapes the storage folder {self.root}")
        return path

    def _writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageUnavailable(
                f"The backup folder {self.root} cannot be created or written: {err.strerror}. Check that the disk "
                "is mounted and the Airflow worker may write there."
            ) from None

    def describe(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def _atomic_write(self, key: str, writer, create_only: bool = False) -> None:
        self._writable()
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(temp, "wb") as out:
                writer(out)
                out.flush()
                os.fsync(out.fileno())
            if create_only:
                os.link(temp, target)  # atomic, and refused (EEXIST) when the key exists
                temp.unlink()
            else:
                os.replace(temp, target)
        except FileExistsError:
            temp.unlink(missing_ok=True)
            raise FileExistsError(f"{target} already exists") from None
        except OSError as err:
            temp.unlink(missing_ok=True)
            raise StorageUnavailable(f"Writing {target} failed: {err.strerror}") from None

    def put_file(self, key: str, local_path: Path) -> None:
        def copy(out):
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)

        self._atomic_write(key, copy)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda out: out.write(data))

    def put_new(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda out: out.write(data), create_only=True)

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        self._atomic_write(key, lambda out: shutil.copyfileobj(stream, out, CHUNK))

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as stream:
            return stream.read()

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} does not exist") from None

    def list(self, prefix: str) -> Iterator[StoredObject]:
        if self.root.exists() and not self.root.is_dir():
            raise StorageUnavailable(
                f"The backup folder {self.root} is not a folder (a file is in its place): nothing in it can be listed. "
                "Check the mount and the plan's storage path."
            )
        base = self._path(prefix) if prefix.strip("/") else self.root
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if name.endswith(".partial"):
                    continue  # an upload in flight, not an object yet
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    stat = full.stat()
                    yield StoredObject(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC))

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            # Remove directories left empty, up to the store's root.
            parent = path.parent
            while parent != self.root and parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    def held(self, keys: list[str], now: datetime) -> dict[str, datetime]:
        return {}  # a folder has no Object Lock

    def earlier_versions(self, key: str) -> list[tuple[datetime, bytes]]:
        return []  # a folder keeps one version

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()


class S3Store:
    """A storage target in an S3 bucket, reached through a boto3 client.

    :param client: a boto3 S3 client (pgdr builds it from an Airflow AWS connection).
    :param bucket: the bucket name.
    :param sse: server-side encryption asked for on every write (``AES256`` or ``aws:kms``), so a
        bucket policy that refuses unencrypted writes refuses none of pgdr's; ``None``: the bucket's default.
    :param kms_key_id: the KMS key of ``aws:kms`` (``None``: the account's default key for S3).
    :param object_lock: the Object Lock retention of every write (``None``: none asked for; the bucket's default
        retention, if it has one, still applies).
    :param clock: the time a write is dated from (its lock's start); a test may give a simulated one.
    """

    def __init__(
        self,
        client,
        bucket: str,
        sse: str | None = None,
        kms_key_id: str | None = None,
        object_lock: ObjectLock | None = None,
        clock=None,
    ):
        self.client = client
        self.bucket = bucket
        self.sse = sse
        self.kms_key_id = kms_key_id
        self.object_lock = object_lock
        self.clock = clock or (lambda: datetime.now(UTC))
        self._lock_config: dict | None = None

    @property
    def write_args(self) -> dict[str, object]:
        """Return the arguments of every PUT (and of a multipart upload's creation, which its parts inherit):
        the encryption, and the Object Lock retention dated from now."""
        args: dict[str, object] = {"ServerSideEncryption": self.sse} if self.sse else {}
        if self.sse == "aws:kms" and self.kms_key_id:
            args["SSEKMSKeyId"] = self.kms_key_id
        if self.object_lock is not None:
            self.check_object_lock()
            args["ObjectLockMode"] = self.object_lock.mode.upper()
            args["ObjectLockRetainUntilDate"] = self.object_lock.until(self.clock())
        return args

    def _write(self, what: str, key: str, upload, lock_on_write: bool = True) -> None:
        """Run ``upload(extra_args)`` for ``key``; on a locked target, then make sure the version written carries
        the lock (:meth:`_confirm_lock`). ``lock_on_write`` false: the write cannot ask for it (a server-side copy)."""
        args = self.write_args
        until = args.get("ObjectLockRetainUntilDate")
        if not lock_on_write:
            args.pop("ObjectLockMode", None)
            args.pop("ObjectLockRetainUntilDate", None)
        self._call(f"{what} {self.describe(key)}", upload, args)
        if until is not None:
            self._confirm_lock(key, until)

    def _confirm_lock(self, key: str, until: datetime) -> None:
        """Prove the object just written at ``key`` is locked until ``until`` at least, and set its retention if
        not. S3 applies the lock asked for on a PUT and on a multipart upload's creation; some S3-compatible
        stores (and moto) drop it on a multipart upload, and a server-side copy cannot ask for it without the
        source's MD5. A lock assumed is no lock: one HEAD per object written, and a PutObjectRetention (which only
        ever extends a lock) when it is missing or shorter."""
        mode, found = self.retention_of(key)
        wanted = self.object_lock.mode.upper()
        # S3 keeps the date to the second; a compliance lock (a bucket's default) is at least the governance asked
        if mode in (wanted, "COMPLIANCE") and found is not None and found >= until.replace(microsecond=0):
            return
        self._call(
            f"Locking {self.describe(key)} ({self.object_lock.describe()})",
            self.client.put_object_retention,
            Bucket=self.bucket,
            Key=key,
            Retention={"Mode": wanted, "RetainUntilDate": until},
        )

    def _lock_configuration(self) -> dict:
        """The bucket's Object Lock configuration (``{}``: it has none), read once per store."""
        if self._lock_config is None:
            try:
                self._lock_config = self._call(
                    f"Reading the Object Lock configuration of s3://{self.bucket}",
                    self.client.get_object_lock_configuration,
                    Bucket=self.bucket,
                ).get("ObjectLockConfiguration", {})
            except FileNotFoundError:  # the bucket has no Object Lock configuration at all
                self._lock_config = {}
        return self._lock_config

    def check_object_lock(self) -> None:
        """Raise :class:`~pgdr.errors.PermanentFailure` unless the bucket has Object Lock enabled (asked once per
        store): a write that asks for a lock the bucket cannot keep would fail anyway, less clearly."""
        if self._lock_configuration().get("ObjectLockEnabled") != "Enabled":
            raise PermanentFailure(
                f"The DR plan asks for Object Lock ({self.object_lock.describe()}) on s3://{self.bucket}, but the "
                "bucket has Object Lock disabled, so nothing written there would be immutable. Object Lock can only "
                "be turned on for a versioned bucket: create one with it enabled (aws s3api create-bucket "
                "--object-lock-enabled-for-bucket ...) and point the storage target at it, or remove object_lock "
                "from the target in the plan."
            )

    def default_retention(self) -> ObjectLock | None:
        """The bucket's default retention: the lock S3 gives an object written without one of its own (as the
        archiver writes WAL: barman-cloud cannot ask for a lock). ``None`` when the bucket has none."""
        rule = self._lock_configuration().get("Rule", {}).get("DefaultRetention")
        if not rule or not rule.get("Mode"):
            return None
        return ObjectLock(rule["Mode"].lower(), int(rule.get("Days") or 0) + 365 * int(rule.get("Years") or 0))

    def encryption_of(self, key: str) -> tuple[str | None, str | None]:
        """Return how S3 says the object at ``key`` is encrypted (``AES256``, ``aws:kms`` or ``None``)
        and, for ``aws:kms``, under which KMS key."""
        head = self._call(f"Checking {self.describe(key)}", self.client.head_object, Bucket=self.bucket, Key=key)
        return head.get("ServerSideEncryption"), head.get("SSEKMSKeyId")

    def describe(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def _call(self, what: str, func, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return func(*args, **kwargs)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("NoSuchKey", "404", "ObjectLockConfigurationNotFoundError") or (
                status == 404 and code != "NoSuchBucket"
            ):
                raise FileNotFoundError(f"{what}: no such object") from None
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                raise FileExistsError(f"{what}: another writer created it first") from None
            if code == "NoSuchBucket":
                raise PermanentFailure(
                    f"{what}: the bucket {self.bucket!r} does not exist. Create it, or fix the bucket name in the "
                    "DR plan's storage section."
                ) from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise PermanentFailure(
                    f"{what}: access denied ({code}). Check the AWS connection's credentials and that they may read "
                    f"and write s3://{self.bucket}."
                ) from None
            raise StorageUnavailable(f"{what}: S3 answered {code or status}: {err}") from None
        except (BotoCoreError, OSError) as err:
            raise StorageUnavailable(
                f"{what}: the S3 endpoint could not be reached ({type(err).__name__}: {err}). It may be down or "
                "unreachable from this worker; the task will retry."
            ) from None

    def put_file(self, key: str, local_path: Path) -> None:
        self._write(
            "Uploading",
            key,
            lambda args: self.client.upload_file(str(local_path), self.bucket, key, ExtraArgs=args or None),
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write("Writing", key, lambda args: self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **args))

    def put_new(self, key: str, data: bytes) -> None:
        self._write(
            "Creating",
            key,
            lambda args: self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*", **args),
        )

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        self._write(
            "Uploading", key, lambda args: self.client.upload_fileobj(stream, self.bucket, key, ExtraArgs=args or None)
        )

    def copy_from(self, source: S3Store, key: str, source_key: str) -> None:
        """Copy ``source_key`` of ``source`` to ``key`` inside S3 (``CopyObject``, multipart for large objects): no
        byte passes through this worker. Only for a ``source`` reached with the same client (one account)."""
        self._write(
            f"Copying {source.describe(source_key)} to",
            key,
            lambda args: self.client.copy(
                {"Bucket": source.bucket, "Key": source_key}, self.bucket, key, ExtraArgs=args or None
            ),
            # a CopyObject asking for a lock needs the source's MD5 (none for a source uploaded in parts): the
            # lock is set right after, by _confirm_lock
            lock_on_write=False,
        )

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as stream:  # a _GuardedStream: its reads translate errors already
            return stream.read()

    def open_read(self, key: str) -> BinaryIO:
        response = self._call(f"Reading {self.describe(key)}", self.client.get_object, Bucket=self.bucket, Key=key)
        return _GuardedStream(response["Body"], self, f"Reading {self.describe(key)}")

    def list(self, prefix: str) -> Iterator[StoredObject]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(
            f"Listing {self.describe(prefix)}", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix))
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield StoredObject(item["Key"], item["Size"], item["LastModified"])

    def delete(self, keys: list[str]) -> None:
        if self.object_lock is not None:
            # A versioned bucket: deleting a key only hides it behind a delete marker. Delete its versions (and
            # markers), which frees the space, and which S3 refuses while one is locked.
            self._delete_objects([{"Key": v.key, "VersionId": v.version_id} for v in self._versions(keys)])
        else:
            self._delete_objects([{"Key": k} for k in keys])

    def _delete_objects(self, objects: list[dict]) -> None:
        for start in range(0, len(objects), 1000):
            batch = objects[start : start + 1000]
            response = self._call(
                f"Deleting {len(batch)} objects in s3://{self.bucket}",
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )
            # DeleteObjects answers 200 and lists the objects it refused (no permission, under Object Lock):
            # reporting them deleted would lie to retention and to whoever reads its log.
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise PermanentFailure(
                    f"S3 refused to delete {len(errors)} of {len(batch)} objects in s3://{self.bucket}, the first "
                    f"{first.get('Key')!r} ({first.get('Code')}: {first.get('Message')}). Nothing was lost; those "
                    "objects are still there. An object under Object Lock cannot be deleted before its retention "
                    "date; otherwise check that the AWS connection's credentials may delete there (s3:DeleteObject, "
                    "s3:DeleteObjectVersion)."
                )

    def _versions(self, keys: list[str]) -> list[ObjectVersion]:
        """Every version and delete marker of ``keys``, from one listing of their common prefix."""
        wanted = set(keys)
        if not wanted:
            return []
        return [v for v in self.versions(os.path.commonprefix(sorted(wanted))) if v.key in wanted]

    def versions(self, prefix: str) -> list[ObjectVersion]:
        """Every version and delete marker of the objects under ``prefix`` (a versioned bucket's whole history)."""
        paginator = self.client.get_paginator("list_object_versions")
        pages = self._call(
            f"Listing the versions under {self.describe(prefix)}",
            lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix)),
        )
        return [
            ObjectVersion(
                item["Key"], item["VersionId"], item["LastModified"], kind == "DeleteMarkers", item["IsLatest"]
            )
            for page in pages
            for kind in ("Versions", "DeleteMarkers")
            for item in page.get(kind, [])
        ]

    def earlier_versions(self, key: str) -> list[tuple[datetime, bytes]]:
        earlier = sorted(
            (v for v in self._versions([key]) if not v.delete_marker and not v.latest),
            key=lambda v: v.modified,
            reverse=True,
        )
        return [(v.modified, self._read_version(key, v.version_id)) for v in earlier]

    def _read_version(self, key: str, version_id: str) -> bytes:
        what = f"Reading {self.describe(key)} (version {version_id})"
        response = self._call(what, self.client.get_object, Bucket=self.bucket, Key=key, VersionId=version_id)
        with _GuardedStream(response["Body"], self, what) as stream:
            return stream.read()

    def hidden(self, prefix: str) -> list[ObjectVersion]:
        """The delete markers that hide an object under ``prefix`` (the newest version of its key): on a target
        under Object Lock pgdr never makes one (it deletes versions), so each is someone else's delete; the locked
        versions behind it are intact, and :meth:`undelete` brings them back."""
        return [v for v in self.versions(prefix) if v.delete_marker and v.latest]

    def undelete(self, markers: list[ObjectVersion]) -> None:
        """Remove delete ``markers``: the newest version behind each is the object again."""
        self._delete_objects([{"Key": m.key, "VersionId": m.version_id} for m in markers if m.delete_marker])

    def held(self, keys: list[str], now: datetime) -> dict[str, datetime]:
        if self.object_lock is None:
            return {}
        held: dict[str, datetime] = {}
        for version in self._versions(keys):
            if version.delete_marker:
                continue
            # What pgdr wrote carries the plan's lock from its write: held at least that long, no need to ask (an
            # object written without it, before the plan asked for a lock, waits as long: late, never too early).
            # Past that, ask S3 (a version written under a longer lock, or under the bucket's default retention,
            # as the archiver's WAL is), one HEAD per version.
            until = self.object_lock.until(version.modified)
            if until <= now:
                until = self.retention_of(version.key, version.version_id)[1]
            if until is not None and until > now:
                held[version.key] = max(until, held.get(version.key, until))
        return held

    def retention_of(self, key: str, version_id: str | None = None) -> tuple[str | None, datetime | None]:
        """Return the Object Lock mode (``GOVERNANCE``, ``COMPLIANCE`` or ``None``) and retain-until date of the
        object at ``key`` (of its ``version_id`` when given)."""
        extra = {"VersionId": version_id} if version_id else {}
        head = self._call(
            f"Checking {self.describe(key)}", self.client.head_object, Bucket=self.bucket, Key=key, **extra
        )
        return head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate")

    def exists(self, key: str) -> bool:
        try:
            self._call(f"Checking {self.describe(key)}", self.client.head_object, Bucket=self.bucket, Key=key)
        except FileNotFoundError:
            return False
        return True


@dataclass(frozen=True)
class ObjectVersion:
    """One version of an object in a versioned bucket, or a delete marker."""

    key: str
    version_id: str
    modified: datetime
    delete_marker: bool
    latest: bool = False  # the newest version of its key (a delete marker that is: the object looks deleted)


class _GuardedStream:
    """A response body whose read errors become :class:`StorageUnavailable`."""

    def __init__(self, body, store: S3Store, what: str):
        self._body, self._store, self._what = body, store, what

    def read(self, size: int = -1) -> bytes:
        return self._store._call(self._what, self._body.read, size if size >= 0 else None)

    def close(self) -> None:
        self._body.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
