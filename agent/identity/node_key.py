"""The node's identity key: one Ed25519 key per node, created 0600 on the first start.

It signs scrub certificates (``agent/scrub/certificate.py``) and is the key the controller
records at enrollment. Its file's age also tells the daemon a lost journal from a first start
(``agent/daemon.py``): the key is made together with the first journal.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import ConfigError

# The node key's file name under config node.state_dir.
NODE_KEY_FILE: Final = "node-key.pem"
# A PKCS#8 Ed25519 PEM is 119 bytes; anything near this is not a key file.
_MAX_KEY_FILE: Final = 4096


class NodeKey:
    """The node's Ed25519 signing key (a PKCS#8 PEM file, mode 0600, owned by the agent's user)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> NodeKey:
        """Load the key at ``path``, or create it (0600, never replacing a file that appeared
        meanwhile). Refuses a file that group or others may access, or that another user owns:
        whoever can read it can sign certificates as this node."""
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        key = cls.generate()
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            key._write_new(path)
        except FileExistsError:
            return cls._load(path)  # another process created it first: use theirs
        except OSError as error:
            raise ConfigError(f"cannot create the node key {path}: {error.strerror}") from error
        return key

    @classmethod
    def load(cls, path: Path) -> NodeKey:
        """Load the existing key at ``path`` with the same checks; never create one (a verifier
        that minted a key would then trust its own signatures, not the node's)."""
        try:
            return cls._load(path)
        except FileNotFoundError:
            raise ConfigError(f"node key {path} does not exist") from None

    @classmethod
    def _load(cls, path: Path) -> NodeKey:
        try:
            # O_NONBLOCK: a FIFO planted at the path must not hang the agent (it is then refused
            # as not a regular file); it changes nothing for a regular file.
            descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise
        except OSError as error:
            raise ConfigError(f"cannot open the node key {path}: {error.strerror}") from error
        try:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                raise ConfigError(f"node key {path} is not a regular file")
            if status.st_mode & 0o077:
                raise ConfigError(
                    f"node key {path} has mode {stat.S_IMODE(status.st_mode):04o}: group or others "
                    f"may access it; run `chmod 600 {path}` if it was never exposed, otherwise "
                    "remove it and re-enroll the node"
                )
            if status.st_uid != os.geteuid():
                raise ConfigError(
                    f"node key {path} is owned by uid {status.st_uid}, not {os.geteuid()} (the "
                    "agent's user): another user could replace it"
                )
            if status.st_size > _MAX_KEY_FILE:
                raise ConfigError(f"node key {path} is {status.st_size} bytes: not a key file")
            data = os.read(descriptor, _MAX_KEY_FILE + 1)
        except OSError as error:
            raise ConfigError(f"cannot read the node key {path}: {error.strerror}") from error
        finally:
            os.close(descriptor)
        try:
            private_key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as error:
            raise ConfigError(
                f"node key {path} is not an unencrypted PEM private key: {error}"
            ) from error
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ConfigError(f"node key {path} is not an Ed25519 key")
        return cls(private_key)

    def _write_new(self, path: Path) -> None:
        pem = self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Written in full under a temporary name, then linked into place: a crash never leaves a
        # truncated key, and link(2) fails instead of replacing a key created meanwhile.
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.fchmod(descriptor, 0o600)  # whatever the umask
            os.write(descriptor, pem)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        try:
            os.link(temporary, path)
        finally:
            temporary.unlink()

    def public_key(self) -> Ed25519PublicKey:
        return self._private_key.public_key()

    def public_pem(self) -> str:
        return public_pem_of(self.public_key())

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)


def public_pem_of(key: Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
