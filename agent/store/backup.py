"""The agent's state backup file: ``accelguard state export`` writes it, ``state import`` reads
and checks it here, then restores it with agent/store/restore.py.

The file (format version 1; integers big-endian):

    MAGIC               b"accelguard state backup\\n" (24 bytes)
    manifest length     4 bytes, at most MAX_MANIFEST_BYTES
    manifest            I-JSON (agent/runtime/inputs.py): format version, node id and public key,
                        agent version, export time; for each member its size and SHA-256, for
                        the journal its schema version and creation time
    journal             a consistent copy of agent.db (SQLite, one file, rollback-journal mode)
    identity, optional  the node's key files as JSON, sealed with AES-256-GCM under a key that
                        scrypt derives from a passphrase; the associated data binds it to this
                        file's node and journal
    trailer             SHA-256 of every byte before it

The magic, the length and the manifest's ``format_version`` keep their place in every version;
a reader refuses a version it does not know.

Invariants:

* Export never writes to the journal and never waits for the agent: the copy is taken with
  SQLite's online backup API on a read-only connection of its own, one read transaction's view
  (what the agent had committed at one instant, every table of agent.db together).
* The node's private keys never leave it in clear: only sealed under a passphrase.
* Reading changes nothing until the whole file was read, hashed and checked: sizes within the
  bounds below, every hash, integrity_check, a schema version not newer than this agent's
  migrations, a schema this agent made (the same tables, columns and indexes; no stranger's
  trigger or view). Every refusal is one ValidationError line. The journal is copied into a
  private staging directory only, which :meth:`CheckedBackup.discard` removes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import struct
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Final

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from agent.errors import StoreError, ValidationError
from agent.runtime.files import publish_file
from agent.runtime.inputs import JsonLimits, parse_json
from agent.store.records import LIVE_LEASE_STATES

MAGIC: Final = b"accelguard state backup\n"
FORMAT_VERSION: Final = 1
_LENGTH: Final = struct.Struct(">I")
_TRAILER_BYTES: Final = 32

# Bounds on a file from anywhere: a real journal is a few MB (its outbox at most 256 MiB).
MAX_MANIFEST_BYTES: Final = 64 << 10
MAX_JOURNAL_BYTES: Final = 4 << 30
MAX_IDENTITY_BYTES: Final = 1 << 20
MAX_IDENTITY_FILE_BYTES: Final = 64 << 10
MANIFEST_LIMITS: Final = JsonLimits(MAX_MANIFEST_BYTES, max_depth=4, max_items=128)
IDENTITY_LIMITS: Final = JsonLimits(MAX_IDENTITY_BYTES * 2, max_depth=2, max_items=16)
_MAX_TEXT: Final = 4096
_CHUNK: Final = 1 << 20

# The identity members, by role; the CLI maps each to this node's path (agent/cli/state.py).
IDENTITY_FILES: Final = ("node_key", "tls_key", "tls_certificate", "ca", "command_key",
                         "enrollment")  # fmt: skip

# scrypt at 128 MiB and about a second per guess; a file may ask for at most 1 GiB.
SCRYPT_N: Final = 1 << 17
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
_MAX_SCRYPT_BYTES: Final = 1 << 30
MIN_PASSPHRASE_CHARS: Final = 12


@dataclass(frozen=True)
class SealedIdentity:
    size: int
    sha256: str
    salt: bytes
    nonce: bytes
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P


@dataclass(frozen=True)
class Manifest:
    node_id: str
    node_public_key: str  # PEM, "" when the node had no key yet
    agent_version: str
    exported_at: float
    journal_size: int
    journal_sha256: str
    journal_schema_version: int
    journal_created_at: float | None
    partitions: int = 0
    live_leases: int = 0
    certificates: int = 0
    identity: SealedIdentity | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        identity = self.identity
        return {
            "format_version": self.format_version,
            "node_id": self.node_id,
            "node_public_key": self.node_public_key,
            "agent_version": self.agent_version,
            "exported_at": self.exported_at,
            "journal": {
                "size": self.journal_size, "sha256": self.journal_sha256,
                "schema_version": self.journal_schema_version,
                "created_at": self.journal_created_at, "partitions": self.partitions,
                "live_leases": self.live_leases, "certificates": self.certificates,
            },
            "identity": None if identity is None else {
                "size": identity.size, "sha256": identity.sha256,
                "kdf": {"name": "scrypt", "salt": identity.salt.hex(), "n": identity.n,
                        "r": identity.r, "p": identity.p},
                "cipher": {"name": "AES-256-GCM", "nonce": identity.nonce.hex()},
            },
        }  # fmt: skip

    def associated_data(self) -> bytes:
        """What the sealed identity is bound to: this file's node and journal."""
        bound = [FORMAT_VERSION, self.node_id, self.node_public_key, self.exported_at,
                 self.journal_sha256]  # fmt: skip
        return json.dumps(bound, separators=(",", ":")).encode()


def utc(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


# -- export ---------------------------------------------------------------------------------------


def export_state(
    journal: Path,
    out: Path,
    *,
    node_id: str,
    node_public_key: str,
    agent_version: str,
    identity: Mapping[str, bytes] | None = None,
    passphrase: bytes | None = None,
    force: bool = False,
) -> Manifest:
    """Write the backup of ``journal`` (and, sealed, ``identity``) to ``out`` atomically, 0600.

    ``out`` is never replaced unless ``force``: the new file is linked into place, so one that
    appeared meanwhile still refuses."""
    if (out.exists() or out.is_symlink()) and not force:
        raise ValidationError(f"{out} exists: pass --force to replace it")
    if not journal.exists():
        raise StoreError(f"no journal at {journal}: nothing to export")
    if identity is not None and not passphrase:
        raise ValidationError("an export with the node identity needs a passphrase")
    try:
        scratch = Path(_private_directory(out.parent, ".accelguard-export-"))
    except OSError as error:
        raise StoreError(f"cannot write in {out.parent}: {error.strerror}") from error
    try:
        snapshot = scratch / "agent.db"
        facts = _snapshot(journal, snapshot)
        size, digest = _hash_file(snapshot)
        manifest = Manifest(
            node_id=node_id, node_public_key=node_public_key, agent_version=agent_version,
            exported_at=time.time(), journal_size=size, journal_sha256=digest, **facts,
        )  # fmt: skip
        sealed = b""
        if identity is not None and passphrase:
            sealed, manifest = _seal(identity, passphrase, manifest)
        _write_container(out, manifest, snapshot, sealed, force=force)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def _private_directory(parent: Path, prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix, dir=parent)  # mode 0700


def _snapshot(journal: Path, snapshot: Path) -> dict[str, Any]:
    """One read transaction's copy of the journal, checked, in rollback-journal mode."""
    try:
        source = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=30)
        try:
            target = sqlite3.connect(snapshot, isolation_level=None)
            try:
                source.backup(target)
                target.execute("PRAGMA journal_mode=DELETE")
                check_integrity(target)
                return _facts(target)
            finally:
                target.close()
        finally:
            source.close()
    except sqlite3.Error as error:
        raise StoreError(f"cannot copy the journal {journal}: {error}") from error


def _facts(db: sqlite3.Connection) -> dict[str, Any]:
    tables = table_names(db)
    created = None
    if "meta" in tables:
        row = db.execute("SELECT value FROM meta WHERE key = 'journal_created_at'").fetchone()
        with contextlib.suppress(TypeError, ValueError):
            created = float(row[0])

    def count(table: str, where: str = "") -> int:
        if table not in tables:
            return 0
        return int(db.execute(f"SELECT COUNT(*) FROM {table} {where}").fetchone()[0])  # noqa: S608 - constants

    return {
        "journal_schema_version": int(db.execute("PRAGMA user_version").fetchone()[0]),
        "journal_created_at": created,
        "partitions": count("partitions"),
        "live_leases": count("leases", f"WHERE state IN {live_leases_sql()}"),
        "certificates": count("certificates"),
    }


def _seal(
    identity: Mapping[str, bytes], passphrase: bytes, manifest: Manifest
) -> tuple[bytes, Manifest]:
    unknown = set(identity) - set(IDENTITY_FILES)
    if unknown or "node_key" not in identity:
        raise ValidationError(f"identity members must include node_key, not {sorted(unknown)}")
    salt, nonce = os.urandom(16), os.urandom(12)
    document = {name: base64.b64encode(data).decode() for name, data in sorted(identity.items())}
    plaintext = json.dumps(document, sort_keys=True).encode()
    key = _derive(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    sealed = AESGCM(key).encrypt(nonce, plaintext, manifest.associated_data())
    if len(sealed) > MAX_IDENTITY_BYTES:
        raise ValidationError(f"the identity files are over {MAX_IDENTITY_BYTES} bytes")
    info = SealedIdentity(len(sealed), hashlib.sha256(sealed).hexdigest(), salt, nonce)
    return sealed, replace(manifest, identity=info)


def _derive(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def _write_container(
    out: Path, manifest: Manifest, snapshot: Path, sealed: bytes, *, force: bool
) -> None:
    header = json.dumps(manifest.to_json(), sort_keys=True, separators=(",", ":")).encode()

    def write(stream: BinaryIO) -> None:
        digest = hashlib.sha256()
        with snapshot.open("rb") as journal:
            for piece in (MAGIC, _LENGTH.pack(len(header)), header):
                stream.write(piece)
                digest.update(piece)
            while chunk := journal.read(_CHUNK):
                stream.write(chunk)
                digest.update(chunk)
        stream.write(sealed)
        digest.update(sealed)
        stream.write(digest.digest())

    try:
        publish_file(out, write, mode=0o600, replace=force)
    except FileExistsError:
        raise ValidationError(f"{out} exists: pass --force to replace it") from None
    except OSError as error:
        raise StoreError(f"cannot write {out}: {error.strerror}") from error


# -- reading and checking a file ------------------------------------------------------------------


@dataclass
class CheckedBackup:
    """A file whose container passed every check (agent/store/restore.py ``open_backup`` then
    checks its journal); the journal copied into ``staging`` (removed by :meth:`discard`), the
    identity still sealed."""

    source: Path
    manifest: Manifest
    staging: Path
    sealed_identity: bytes = b""

    @property
    def journal(self) -> Path:
        return self.staging / "agent.db"

    def open_identity(self, passphrase: bytes) -> dict[str, bytes]:
        sealed = self.manifest.identity
        if sealed is None:
            return {}
        key = _derive(passphrase, sealed.salt, sealed.n, sealed.r, sealed.p)
        try:
            plaintext = AESGCM(key).decrypt(
                sealed.nonce, self.sealed_identity, self.manifest.associated_data()
            )
        except InvalidTag:
            raise ValidationError(
                f"{self.source}: wrong passphrase (or the identity in the file was altered): "
                "nothing was changed"
            ) from None
        document = parse_json(plaintext, IDENTITY_LIMITS, f"{self.source} identity")
        if not isinstance(document, dict) or not set(document) <= set(IDENTITY_FILES):
            raise ValidationError(f"{self.source}: the identity names unknown files")
        files: dict[str, bytes] = {}
        for name, text in document.items():
            try:
                files[name] = base64.b64decode(
                    text if isinstance(text, str) else "-", validate=True
                )
            except ValueError:
                raise ValidationError(
                    f"{self.source}: identity file {name} is not base64"
                ) from None
            if len(files[name]) > MAX_IDENTITY_FILE_BYTES:
                raise ValidationError(f"{self.source}: identity file {name} is too large")
        if _public_pem(files.get("node_key", b"")) != self.manifest.node_public_key:
            raise ValidationError(
                f"{self.source}: the node key in the identity is not the node key the manifest "
                "names: nothing was changed"
            )
        return files

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _public_pem(pem: bytes) -> str:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return ""
    if not isinstance(key, Ed25519PrivateKey):
        return ""
    encoding, layout = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(encoding, layout).decode("ascii")


def read_container(path: Path, staging_parent: Path) -> CheckedBackup:
    """Read and hash the whole file and check its manifest; the journal lands in a new private
    directory under ``staging_parent`` (the journal's file system: the commit is a rename).
    agent/store/restore.py ``open_backup`` then checks the journal itself."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        raise ValidationError(f"cannot open {path}: {error.strerror}") from error
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode):
        os.close(descriptor)
        raise ValidationError(f"{path} is not a regular file")
    with os.fdopen(descriptor, "rb") as stream:
        digest = hashlib.sha256()
        reader = _Reader(stream, digest, path)
        manifest = _read_manifest(reader, path, status.st_size)
        identity = manifest.identity
        expected = (len(MAGIC) + _LENGTH.size + reader.manifest_bytes + manifest.journal_size
                    + (identity.size if identity else 0) + _TRAILER_BYTES)  # fmt: skip
        if status.st_size != expected:
            how = "truncated" if status.st_size < expected else "bytes added"
            raise ValidationError(
                f"{path} is {status.st_size} bytes, its manifest describes {expected} ({how}): "
                "nothing was changed"
            )
        staging = Path(_private_directory(staging_parent, ".import-"))
        checked = CheckedBackup(path, manifest, staging)
        try:
            journal_digest = hashlib.sha256()
            descriptor = os.open(checked.journal, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as journal:
                remaining = manifest.journal_size
                while remaining:
                    chunk = reader.take(min(remaining, _CHUNK))
                    journal_digest.update(chunk)
                    journal.write(chunk)
                    remaining -= len(chunk)
            if identity is not None:
                checked.sealed_identity = reader.take(identity.size)
            _check_hashes(checked, digest.digest(), stream.read(_TRAILER_BYTES), journal_digest)
        except BaseException:
            checked.discard()
            raise
    return checked


def _check_hashes(checked: CheckedBackup, whole: bytes, trailer: bytes, journal: Any) -> None:
    path, manifest = checked.source, checked.manifest
    if trailer != whole:
        raise ValidationError(
            f"{path} is damaged (its SHA-256 trailer does not match): nothing was changed"
        )
    identity = manifest.identity
    if journal.hexdigest() != manifest.journal_sha256 or (
        identity is not None
        and hashlib.sha256(checked.sealed_identity).hexdigest() != identity.sha256
    ):
        raise ValidationError(f"{path}: a member's SHA-256 does not match its manifest")


class _Reader:
    def __init__(self, stream: BinaryIO, digest: Any, path: Path) -> None:
        self._stream = stream
        self._digest = digest
        self._path = path
        self.manifest_bytes = 0

    def take(self, size: int) -> bytes:
        data = self._stream.read(size)
        if len(data) != size:
            raise ValidationError(f"{self._path} is truncated (or changed while read)")
        self._digest.update(data)
        return data


def _read_manifest(reader: _Reader, path: Path, file_size: int) -> Manifest:
    if file_size < len(MAGIC) + _LENGTH.size + _TRAILER_BYTES or reader.take(len(MAGIC)) != MAGIC:
        raise ValidationError(f"{path} is not an accelguard state backup: nothing was changed")
    (length,) = _LENGTH.unpack(reader.take(_LENGTH.size))
    if length > MAX_MANIFEST_BYTES or length > file_size:
        raise ValidationError(f"{path}: manifest of {length} bytes (at most {MAX_MANIFEST_BYTES})")
    reader.manifest_bytes = length
    document = parse_json(reader.take(length), MANIFEST_LIMITS, f"{path} manifest")
    if not isinstance(document, dict):
        raise ValidationError(f"{path}: the manifest is not a JSON object")
    version = document.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValidationError(
            f"{path} has format version {version!r}; this agent reads version {FORMAT_VERSION} "
            "(import it with the agent version that wrote it, or newer)"
        )
    return _manifest(_Fields(document, f"{path} manifest"))


class _Fields:
    """Typed access to one JSON object; every miss is a ValidationError naming the field."""

    def __init__(self, document: Mapping[str, Any], where: str) -> None:
        self.document = document
        self.where = where

    def fail(self, key: str, what: str) -> ValidationError:
        return ValidationError(f"{self.where}: {key} must be {what}")

    def text(self, key: str, *, empty: bool = True) -> str:
        value = self.document.get(key)
        if not isinstance(value, str) or len(value) > _MAX_TEXT or (not value and not empty):
            raise self.fail(key, "text")
        return value

    def count(self, key: str, limit: int) -> int:
        value = self.document.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise self.fail(key, f"an integer from 0 to {limit}")
        return value

    def moment(self, key: str, *, optional: bool = False) -> float | None:
        value = self.document.get(key)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise self.fail(key, "a Unix time")
        return float(value)

    def hex(self, key: str, size: int) -> bytes:
        value = self.text(key)
        try:
            data = bytes.fromhex(value)
        except ValueError:
            raise self.fail(key, f"{size} bytes in hex") from None
        if len(data) != size:
            raise self.fail(key, f"{size} bytes in hex")
        return data

    def object(self, key: str) -> _Fields:
        value = self.document.get(key)
        if not isinstance(value, dict):
            raise self.fail(key, "an object")
        return _Fields(value, f"{self.where} {key}")


def _manifest(fields: _Fields) -> Manifest:
    journal = fields.object("journal")
    created = journal.moment("created_at", optional=True)
    sealed = None
    if fields.document.get("identity") is not None:
        identity = fields.object("identity")
        kdf, cipher = identity.object("kdf"), identity.object("cipher")
        if kdf.text("name") != "scrypt" or cipher.text("name") != "AES-256-GCM":
            raise ValidationError(f"{fields.where}: unknown identity encryption")
        n, r, p = kdf.count("n", 1 << 20), kdf.count("r", 16), kdf.count("p", 4)
        if n < 1 << 14 or n & (n - 1) or r < 1 or p < 1 or 128 * n * r * p > _MAX_SCRYPT_BYTES:
            raise ValidationError(f"{fields.where}: scrypt parameters out of bounds")
        sealed = SealedIdentity(
            size=identity.count("size", MAX_IDENTITY_BYTES),
            sha256=identity.hex("sha256", 32).hex(), salt=kdf.hex("salt", 16),
            nonce=cipher.hex("nonce", 12), n=n, r=r, p=p,
        )  # fmt: skip
    return Manifest(
        node_id=fields.text("node_id", empty=False),
        node_public_key=fields.text("node_public_key"),
        agent_version=fields.text("agent_version"),
        exported_at=fields.moment("exported_at") or 0.0,
        journal_size=journal.count("size", MAX_JOURNAL_BYTES),
        journal_sha256=journal.hex("sha256", 32).hex(),
        journal_schema_version=journal.count("schema_version", 1 << 20),
        journal_created_at=created,
        partitions=journal.count("partitions", 1 << 30),
        live_leases=journal.count("live_leases", 1 << 30),
        certificates=journal.count("certificates", 1 << 30),
        identity=sealed,
    )


def open_copy(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None)
    # The file is a stranger's until checked: no schema-defined function with side effects.
    db.execute("PRAGMA trusted_schema=OFF")
    db.execute("PRAGMA cell_size_check=ON")
    return db


def check_integrity(db: sqlite3.Connection) -> None:
    problems = [str(row[0]) for row in db.execute("PRAGMA integrity_check(20)").fetchall()]
    if problems != ["ok"]:
        raise StoreError("integrity_check: " + "; ".join(problems)[:500])


def table_names(db: sqlite3.Connection) -> set[str]:
    return {str(r[0]) for r in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}


def live_leases_sql() -> str:
    return "(" + ", ".join(f"'{state}'" for state in LIVE_LEASE_STATES) + ")"


def _hash_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    if size > MAX_JOURNAL_BYTES:
        raise StoreError(
            f"the journal is {size} bytes, over the {MAX_JOURNAL_BYTES} a backup holds"
        )
    return size, digest.hexdigest()
