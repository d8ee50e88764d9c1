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
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Protocol

from pgdr.errors import PermanentFailure, StorageUnavailable

CHUNK = 1 << 20


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

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        """Write what ``stream`` yields, to its end, to ``key``, replacing any object there (no local copy)."""

    def get_bytes(self, key: str) -> bytes:
        """Return the whole object at ``key``."""

    def open_read(self, key: str) -> BinaryIO:
        """Return a readable binary stream of the object at ``key``; the caller closes it."""

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Yield every object whose key starts with ``prefix``."""

    def delete(self, keys: list[str]) -> None:
        """Delete the objects at ``keys``; missing ones are ignored."""

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

    def _atomic_write(self, key: str, writer) -> None:
        self._writable()
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(temp, "wb") as out:
                writer(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, target)
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

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()


class S3Store:
    """A storage target in an S3 bucket, reached through a boto3 client.

    :param client: a boto3 S3 client (pgdr builds it from an Airflow AWS connection).
    :param bucket: the bucket name.
    :param sse: server-side encryption asked for on every write (``AES256`` or ``aws:kms``), so a
        bucket policy that refuses unencrypted writes refuses none of pgdr's; ``None``: the bucket's default.
    :param kms_key_id: the KMS key of ``aws:kms`` (``None``: the account's default key for S3).
    """

    def __init__(self, client, bucket: str, sse: str | None = None, kms_key_id: str | None = None):
        self.client = client
        self.bucket = bucket
        self.sse = sse
        self.kms_key_id = kms_key_id

    @property
    def write_args(self) -> dict[str, str]:
        """Return the encryption arguments of every PUT (and of a multipart upload's creation, which
        its parts inherit)."""
        args = {"ServerSideEncryption": self.sse} if self.sse else {}
        if self.sse == "aws:kms" and self.kms_key_id:
            args["SSEKMSKeyId"] = self.kms_key_id
        return args

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
            if code in ("NoSuchKey", "404") or (status == 404 and code != "NoSuchBucket"):
                raise FileNotFoundError(f"{what}: no such object") from None
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
        self._call(
            f"Uploading {self.describe(key)}",
            self.client.upload_file,
            str(local_path),
            self.bucket,
            key,
            ExtraArgs=self.write_args or None,
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(
            f"Writing {self.describe(key)}",
            self.client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=data,
            **self.write_args,
        )

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        self._call(
            f"Uploading {self.describe(key)}",
            self.client.upload_fileobj,
            stream,
            self.bucket,
            key,
            ExtraArgs=self.write_args or None,
        )

    def copy_from(self, source: S3Store, key: str, source_key: str) -> None:
        """Copy ``source_key`` of ``source`` to ``key`` inside S3 (``CopyObject``, multipart for large objects): no
        byte passes through this worker. Only for a ``source`` reached with the same client (one account)."""
        self._call(
            f"Copying {source.describe(source_key)} to {self.describe(key)}",
            self.client.copy,
            {"Bucket": source.bucket, "Key": source_key},
            self.bucket,
            key,
            ExtraArgs=self.write_args or None,
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
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self._call(
                f"Deleting {len(batch)} objects in s3://{self.bucket}",
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )

    def exists(self, key: str) -> bool:
        try:
            self._call(f"Checking {self.describe(key)}", self.client.head_object, Bucket=self.bucket, Key=key)
        except FileNotFoundError:
            return False
        return True


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
