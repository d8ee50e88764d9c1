"""Client-side encryption of backups: envelope encryption with AES-256-GCM in authenticated chunks.

Each backup gets a fresh random 256-bit *data key*. Every file of the backup is encrypted with it
before it leaves the worker; the data key itself is stored only *wrapped* (encrypted) by a
*master key* that lives in an Airflow connection (or the secrets backend behind it), never in the
plan, the bucket or a log. The manifest records which master key wraps the data key (its *key
id*) and the wrapped key, which is useless without the master key.

A file is stored as a 16-byte header followed by chunks of at most :data:`CHUNK_SIZE` bytes of
plaintext, each sealed with AES-256-GCM (the ``cryptography`` library's ``AESGCM``; no primitive
here is home-made). The construction is the STREAM one that Tink and age use: a chunk's nonce is
the file's random 7-byte prefix, the chunk's number and a flag marking the last chunk, and every
chunk is bound to its backup, database and file name as associated data. So a flipped bit, a
chunk moved or dropped, a truncated file or a file from another backup fails authentication at
the chunk it reaches, before ``pg_restore`` reads a byte of it.

The manifest of an encrypted backup also carries an HMAC (keyed from the data key) over
everything but the key wrapping, so row counts, sizes and checksums cannot be changed by someone
who can write to the bucket but holds no master key. Rotating the master key re-wraps the data
key (:func:`rewrap`) and rewrites only those fields; the data and the HMAC stay as they are.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pgdr.errors import ChecksumMismatch, PermanentFailure

SCHEME = "aes-256-gcm-stream-v1"
CHUNK_SIZE = 1 << 20  # plaintext bytes per chunk: 16 bytes of tag per MiB
TAG_SIZE = 16
MAGIC = b"PGDRAE1\n"
HEADER_SIZE = 16  # MAGIC, 7-byte nonce prefix, 1 reserved zero byte
KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class KeyUnavailable(PermanentFailure):
    """The master key a backup needs is not in its connection, or is not the key that wrapped it."""


class TamperDetected(ChecksumMismatch):
    """Encrypted bytes, or an encrypted backup's manifest, were changed after they were written."""


def _aesgcm(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


# ------------------------------------------------------------------------------------------------
# Master keys
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MasterKeys:
    """The master keys one Airflow connection holds: the current one, which wraps new data keys,
    and earlier ones, which still unwrap the data keys of older backups.

    :param current: the key id new backups use.
    :param keys: key id -> 32 bytes of key.
    :param source: where they come from, for messages (``Airflow connection 'pgdr_backup_key'``).
    """

    current: str
    keys: dict[str, bytes]
    source: str

    def __repr__(self) -> str:  # never the key bytes, not even in a traceback's locals
        return f"MasterKeys(current={self.current!r}, ids={sorted(self.keys)!r}, source={self.source!r})"

    def key(self, key_id: str, needed_by: str) -> bytes:
        """Return the master key ``key_id``, or explain which key is needed and where to put it."""
        if key_id not in self.keys:
            raise KeyUnavailable(
                f"{needed_by} is encrypted with master key id {key_id!r}, which the {self.source} does not hold (it "
                f"holds: {', '.join(sorted(self.keys))}). Put that key back into the connection's extra, under "
                f'"previous_keys": {{"{key_id}": "<base64 key>"}}, from wherever your key escrow keeps it. Nothing was '
                "restored or created."
            )
        return self.keys[key_id]


def decode_key(value: Any, key_id: str, source: str) -> bytes:
    """Decode a base64 master key, refusing anything that is not 32 bytes (never echoing it)."""
    raw = b""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except ValueError:  # binascii.Error
            raw = b""
    if len(raw) != 32:
        raise KeyUnavailable(
            f"Master key {key_id!r} in the {source} is not a base64-encoded 32-byte (AES-256) key. Generate one "
            "with `python -m pgdr keygen` and paste its value."
        )
    return raw


def master_keys_from(login: str | None, password: str | None, extra: dict[str, Any], source: str) -> MasterKeys:
    """Build :class:`MasterKeys` from a connection: ``login`` is the current key id, ``password`` its
    key (base64), ``extra["previous_keys"]`` maps older key ids to their keys."""
    key_id = (login or "").strip()
    if not KEY_ID.match(key_id):
        raise KeyUnavailable(
            f"The {source} has no usable key id in its login ({key_id[:40]!r}). Set the login to the current master "
            "key's id (letters, digits, '_.:-'; e.g. key-2026-11) and the password to the key."
        )
    keys = {key_id: decode_key(password, key_id, source)}
    previous = extra.get("previous_keys") or {}
    if not isinstance(previous, dict):
        raise KeyUnavailable(f'The {source}\'s extra "previous_keys" must map key ids to base64 keys.')
    for old_id, value in previous.items():
        if not isinstance(old_id, str) or not KEY_ID.match(old_id):
            raise KeyUnavailable(
                f'The {source}\'s extra "previous_keys" has a key id that is not one: {str(old_id)[:40]!r}.'
            )
        if old_id != key_id:
            keys[old_id] = decode_key(value, old_id, source)
    return MasterKeys(current=key_id, keys=keys, source=source)


def new_master_key() -> str:
    """Return a fresh random master key, base64-encoded (what ``python -m pgdr keygen`` prints)."""
    return base64.b64encode(os.urandom(32)).decode()


# ------------------------------------------------------------------------------------------------
# The manifest's record of encryption
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncryptionRecord:
    """How a backup's files are encrypted, as its manifest records it (no secret in it)."""

    scheme: str
    chunk_size: int
    key_conn_id: str  # the Airflow connection that holds the master key
    key_id: str  # the master key that wraps the data key
    wrapped_key: str  # base64: the data key, sealed by the master key
    wrap_nonce: str  # base64
    manifest_mac: str = ""  # hex HMAC-SHA256 of the manifest without the wrapping fields

    @classmethod
    def from_dict(cls, value: Any, invalid) -> EncryptionRecord:
        """Check an untrusted record; ``invalid(field, problem)`` makes the error to raise."""
        if not isinstance(value, dict) or set(value) != set(cls.__dataclass_fields__):
            raise invalid("encryption", f"must have exactly the fields {', '.join(cls.__dataclass_fields__)}")
        if value["scheme"] != SCHEME:
            raise invalid("encryption.scheme", f"is {str(value['scheme'])[:40]!r}; this pgdr reads {SCHEME}")
        if value["chunk_size"] != CHUNK_SIZE:
            raise invalid("encryption.chunk_size", f"must be {CHUNK_SIZE}")
        for name in ("key_conn_id", "key_id"):
            if not isinstance(value[name], str) or not KEY_ID.match(value[name]):
                raise invalid(f"encryption.{name}", "is not an id")
        for name in ("wrapped_key", "wrap_nonce"):
            if not isinstance(value[name], str) or len(value[name]) > 200:
                raise invalid(f"encryption.{name}", "is not base64")
        if not isinstance(value["manifest_mac"], str) or not re.fullmatch(r"[0-9a-f]{64}", value["manifest_mac"]):
            raise invalid("encryption.manifest_mac", "is not a SHA-256 HMAC in hex")
        return cls(**value)


def _wrap_aad(key_id: str, database: str, backup_id: str) -> bytes:
    return b"pgdr data key\x00" + "\x00".join((key_id, database, backup_id)).encode()


def wrap(keys: MasterKeys, data_key: bytes, key_conn_id: str, database: str, backup_id: str) -> EncryptionRecord:
    """Seal ``data_key`` under the current master key; return the manifest's record (no MAC yet)."""
    nonce = os.urandom(12)
    sealed = _aesgcm(keys.keys[keys.current]).encrypt(nonce, data_key, _wrap_aad(keys.current, database, backup_id))
    return EncryptionRecord(
        scheme=SCHEME,
        chunk_size=CHUNK_SIZE,
        key_conn_id=key_conn_id,
        key_id=keys.current,
        wrapped_key=base64.b64encode(sealed).decode(),
        wrap_nonce=base64.b64encode(nonce).decode(),
    )


def unwrap(keys: MasterKeys, record: EncryptionRecord, database: str, backup_id: str) -> bytes:
    """Return the data key of a backup, or say which master key is missing or wrong."""
    from cryptography.exceptions import InvalidTag

    what = f"Backup {backup_id} of database {database!r}"
    master = keys.key(record.key_id, what)
    try:
        sealed, nonce = base64.b64decode(record.wrapped_key), base64.b64decode(record.wrap_nonce)
        data_key = _aesgcm(master).decrypt(nonce, sealed, _wrap_aad(record.key_id, database, backup_id))
    except (InvalidTag, ValueError):
        data_key = b""
    if len(data_key) != 32:
        raise KeyUnavailable(
            f"{what} is encrypted with master key id {record.key_id!r}, but the key the {keys.source} holds under "
            "that id does not open it: it is another key with the same id, or the backup's manifest was changed. "
            f"Restore the original key {record.key_id!r} into the connection (from your key escrow). Nothing was "
            "restored or created."
        )
    return data_key


def rewrap(keys: MasterKeys, record: EncryptionRecord, database: str, backup_id: str) -> EncryptionRecord:
    """Return ``record`` with its data key sealed under the current master key (the MAC is unchanged)."""
    data_key = unwrap(keys, record, database, backup_id)
    fresh = wrap(keys, data_key, record.key_conn_id, database, backup_id)
    return replace(fresh, manifest_mac=record.manifest_mac)


_UNMACED = ("key_id", "wrapped_key", "wrap_nonce", "manifest_mac")
# What the HMAC of scheme v1 covers: every field a manifest had when the scheme was made, named here
# once and for all, so that a later pgdr that adds a field still authenticates the manifests written
# before it (a field added later is not covered by v1; a v2 scheme would cover it).
MAC_FIELDS_V1 = (
    "airflow",
    "backup_id",
    "client_version",
    "compressed_by",
    "compression",
    "compression_level",
    "database",
    "database_bytes",
    "dbname",
    "dump_jobs",
    "encryption",
    "files",
    "finished_at",
    "format",
    "large_objects",
    "manifest_format",
    "recovery_point",
    "row_counts",
    "sequences",
    "server_version",
    "size",
    "started_at",
    "storage",
    "stored_size",
)


def manifest_mac(data_key: bytes, manifest_json: dict[str, Any]) -> str:
    """Return the HMAC-SHA256 of a manifest (as a JSON-ready dict): :data:`MAC_FIELDS_V1`, without the key wrapping."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    body = {name: manifest_json[name] for name in MAC_FIELDS_V1}
    body["encryption"] = {k: v for k, v in (body["encryption"] or {}).items() if k not in _UNMACED}
    mac_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"pgdr manifest mac v1").derive(data_key)
    return hmac.new(mac_key, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def unlock_backup(manifest, keys: MasterKeys) -> bytes:
    """Return the data key of an encrypted backup's ``manifest``, after checking the manifest's HMAC.

    :raises KeyUnavailable: the master key is missing or is not the one that wrapped the data key.
    :raises TamperDetected: the manifest was changed after it was written.
    """
    record = manifest.encryption
    data_key = unwrap(keys, record, manifest.database, manifest.backup_id)
    if not hmac.compare_digest(manifest_mac(data_key, manifest.to_dict()), record.manifest_mac):
        raise TamperDetected(
            f"The manifest of backup {manifest.backup_id} of database {manifest.database!r} fails authentication: "
            "its contents (files, sizes, checksums, row counts) were changed after the backup was written, by "
            "someone or something that can write to the storage but does not hold the master key. pgdr does not "
            "use this backup. Restore another one, and find out what changed the storage."
        )
    return data_key


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def _chunk_aad(header: bytes, context: bytes) -> bytes:
    return header + context


def file_context(database: str, backup_id: str, name: str) -> bytes:
    """Return what every chunk of one file is bound to: its database, backup and file name."""
    return "\x00".join(("pgdr file", database, backup_id, name)).encode()


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= 1 << 32:
        raise ValueError("a file of more than 4 PiB cannot be encrypted in one stream")
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def sealed_size(plain_size: int) -> int:
    """Return the stored size of a file of ``plain_size`` bytes once encrypted."""
    chunks = max(1, -(-plain_size // CHUNK_SIZE))
    return HEADER_SIZE + plain_size + chunks * TAG_SIZE


def encrypt_file(source: Path, target: Path, data_key: bytes, context: bytes) -> tuple[int, str, int]:
    """Encrypt ``source`` into ``target``; return the stored size, the stored bytes' SHA-256 and the
    plaintext size. The last chunk is marked as such (an empty file is one empty, marked chunk)."""
    aead = _aesgcm(data_key)
    prefix = os.urandom(7)
    header = MAGIC + prefix + b"\x00"
    aad = _chunk_aad(header, context)
    digest = hashlib.sha256(header)
    stored, plain, index = HEADER_SIZE, 0, 0
    with open(source, "rb") as src, open(target, "wb") as out:
        out.write(header)
        chunk = src.read(CHUNK_SIZE)
        while True:
            following = src.read(CHUNK_SIZE) if len(chunk) == CHUNK_SIZE else b""
            sealed = aead.encrypt(_nonce(prefix, index, not following), chunk, aad)
            out.write(sealed)
            digest.update(sealed)
            stored += len(sealed)
            plain += len(chunk)
            index += 1
            if not following:
                break
            chunk = following
    return stored, digest.hexdigest(), plain


class ChunkDecryptor:
    """A sink for the stored bytes of one encrypted file that passes on authenticated plaintext.

    Feed it the stored bytes in pieces of any size (:meth:`write`); each chunk is decrypted, and
    so authenticated, as soon as it is complete, then handed to ``out`` (or dropped, to only
    authenticate). :meth:`finish` checks the file ended with its last chunk.

    :raises TamperDetected: at the first chunk that is not what was encrypted.
    """

    def __init__(self, data_key: bytes, context: bytes, where: str, out=None):
        self._aead = _aesgcm(data_key)
        self._context, self._where, self._out = context, where, out
        self._buffer = bytearray()
        self._header: bytes | None = None
        self._index = 0
        self.plain_bytes = 0

    def _fail(self, problem: str) -> TamperDetected:
        return TamperDetected(
            f"{self._where} fails authentication: {problem}. The encrypted object was changed after it was written "
            "(or belongs to another backup). Retrying cannot fix this; restore another backup and find out what "
            "changed the storage."
        )

    def _open(self, sealed: bytes | memoryview, last: bool) -> None:
        from cryptography.exceptions import InvalidTag

        try:
            plain = self._aead.decrypt(_nonce(self._header[8:15], self._index, last), sealed, self._aad)
        except InvalidTag:
            where = "its last chunk" if last else f"chunk {self._index}"
            raise self._fail(f"{where} (of {CHUNK_SIZE} bytes each) does not match its authentication tag") from None
        self._index += 1
        self.plain_bytes += len(plain)
        if self._out is not None:
            self._out(plain)

    def write(self, data: bytes) -> int:
        self._buffer += data
        if self._header is None:
            if len(self._buffer) < HEADER_SIZE:
                return len(data)
            self._header = bytes(self._buffer[:HEADER_SIZE])
            del self._buffer[:HEADER_SIZE]
            if self._header[:8] != MAGIC or self._header[15] != 0:
                raise self._fail("it does not start with pgdr's encryption header")
            self._aad = _chunk_aad(self._header, self._context)
        full = CHUNK_SIZE + TAG_SIZE
        # A full chunk is only known not to be the last one once a byte after it has arrived.
        consumed = 0
        view = memoryview(self._buffer)
        while len(self._buffer) - consumed > full:
            self._open(view[consumed : consumed + full], last=False)
            consumed += full
        view.release()
        if consumed:
            del self._buffer[:consumed]
        return len(data)

    def finish(self) -> None:
        """Open the last chunk; refuse a file that ends early."""
        if self._header is None or len(self._buffer) < TAG_SIZE:
            raise self._fail("it ends before its last chunk (truncated)")
        self._open(self._buffer, last=True)
        self._buffer = bytearray()
