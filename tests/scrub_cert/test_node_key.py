"""The node key file: created 0600 once, reused, refused when others could read or replace it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.errors import ConfigError
from agent.identity.node_key import NodeKey
from agent.scrub.certificate import key_fingerprint


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_created_with_mode_0600_and_reused(key_path: Path, open_umask: None) -> None:
    created = NodeKey.load_or_create(key_path)
    status = key_path.stat()
    assert stat.S_IMODE(status.st_mode) == 0o600
    assert status.st_uid == os.geteuid()
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["node.key"]  # no temp left
    again = NodeKey.load_or_create(key_path)
    assert again.public_pem() == created.public_pem()
    assert len(key_fingerprint(created.public_pem())) == 64


def test_signatures_from_the_reloaded_key_verify(key_path: Path) -> None:
    first = NodeKey.load_or_create(key_path)
    second = NodeKey.load_or_create(key_path)
    first.public_key().verify(second.sign(b"message"), b"message")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610, 0o601, 0o620])
def test_group_or_other_access_is_refused(key_path: Path, mode: int) -> None:
    NodeKey.load_or_create(key_path)
    key_path.chmod(mode)
    with pytest.raises(ConfigError, match="group or others"):
        NodeKey.load_or_create(key_path)


@pytest.mark.parametrize("mode", [0o400, 0o600, 0o700])
def test_owner_only_modes_are_accepted(key_path: Path, mode: int) -> None:
    NodeKey.load_or_create(key_path)
    key_path.chmod(mode)
    NodeKey.load_or_create(key_path)


def test_key_owned_by_another_user_is_refused(key_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the key file to another user")
    NodeKey.load_or_create(key_path)
    os.chown(key_path, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        NodeKey.load_or_create(key_path)


def test_directory_in_place_of_the_key_is_refused(key_path: Path) -> None:
    key_path.mkdir(parents=True, mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        NodeKey.load_or_create(key_path)


def test_fifo_in_place_of_the_key_is_refused_without_blocking(key_path: Path) -> None:
    key_path.parent.mkdir(mode=0o700)
    os.mkfifo(key_path, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        NodeKey.load_or_create(key_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
    ids=["empty", "garbage", "bad-pem"],
)
def test_malformed_key_file_is_refused_not_replaced(key_path: Path, content: bytes) -> None:
    key_path.parent.mkdir(mode=0o700)
    key_path.write_bytes(content)
    key_path.chmod(0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        NodeKey.load_or_create(key_path)
    assert key_path.read_bytes() == content


def test_other_key_type_is_refused(key_path: Path) -> None:
    key_path.parent.mkdir(mode=0o700)
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path.write_bytes(pem)
    key_path.chmod(0o600)
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        NodeKey.load_or_create(key_path)


def test_oversized_file_is_refused(key_path: Path) -> None:
    key_path.parent.mkdir(mode=0o700)
    key_path.write_bytes(b"x" * 100_000)
    key_path.chmod(0o600)
    with pytest.raises(ConfigError, match="not a key file"):
        NodeKey.load_or_create(key_path)


def test_impossible_path_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"node key .*: Not a directory"):
        NodeKey.load_or_create(blocker / "node.key")


_CREATE = """
import sys
from pathlib import Path
from agent.scrub.certificate import NodeKey
sys.stdin.readline()
print(NodeKey.load_or_create(Path(sys.argv[1])).public_pem(), end="")
"""


def test_concurrent_first_use_yields_one_key(key_path: Path) -> None:
    """Eight agents starting at once must end up with the same key, not eight keys."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _CREATE, str(key_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )
        for _ in range(8)
    ]
    try:
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(b"go\n")
            process.stdin.flush()
        keys = {process.communicate(timeout=60)[0] for process in processes}
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert all(process.returncode == 0 for process in processes)
    assert len(keys) == 1
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["node.key"]
