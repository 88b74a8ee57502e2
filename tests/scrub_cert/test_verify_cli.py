"""`accelguard scrub verify-cert` as an operator runs it: which key it trusts, and hostile files.

Every mode is tried with the same forgery: a failed scrub's certificate edited to say "verified"
and re-signed with the forger's own key, embedded in the file. Before issue 8, verify-cert without
--public-key trusted that embedded key and exited 0.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.identity.node_key import NODE_KEY_FILE, NodeKey
from agent.scrub.model import ScrubResult
from tests.scrub_cert.support import certify, resign, scrub_result
from tests.support import run_cli


@dataclass(frozen=True)
class Node:
    config: Path
    key: NodeKey
    key_path: Path
    public_pem: Path


@pytest.fixture
def node(tmp_path: Path) -> Node:
    """A node's config and key, as the daemon leaves them (state_dir/node-key.pem, 0600)."""
    state_dir = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(f'[node]\nstate_dir = "{state_dir}"\n')
    key_path = state_dir / NODE_KEY_FILE
    key = NodeKey.load_or_create(key_path)
    public_pem = tmp_path / "node.pem"
    public_pem.write_text(key.public_pem())
    return Node(config, key, key_path, public_pem)


def write(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document, indent=2))
    return path


def forgery(key: NodeKey) -> dict[str, Any]:
    failed = certify(key, scrub_result(mismatched_bytes=8))
    payload = copy.deepcopy(failed["payload"])
    payload["passes"][2]["mismatched_bytes"] = 0
    payload["verified"] = True
    return resign(NodeKey.generate(), payload)


def verify(file: Path, *extra: str, config: Path | None = None) -> tuple[int, str, str]:
    result = run_cli("scrub", "verify-cert", str(file), *extra, config=config)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 1, result.stderr
    return result.returncode, result.stdout, result.stderr.strip()


def test_genuine_certificate_verifies_with_the_nodes_own_key(node: Node, tmp_path: Path) -> None:
    file = write(tmp_path / "cert.json", certify(node.key))
    code, out, err = verify(file, config=node.config)
    assert code == 0, err
    assert f"signature OK (this node's key {node.key_path}, " in out
    assert "scrubbed and verified" in out
    code, out, err = verify(file, "--public-key", str(node.public_pem))
    assert code == 0, err
    assert f"signature OK (the key in {node.public_pem}, " in out


def test_forgery_fails_with_a_pinned_key(node: Node, tmp_path: Path) -> None:
    file = write(tmp_path / "forged.json", forgery(node.key))
    code, out, err = verify(file, "--public-key", str(node.public_pem))
    assert (code, out) == (1, "")
    assert "not the trusted node key" in err


def test_forgery_fails_against_the_nodes_own_key(node: Node, tmp_path: Path) -> None:
    file = write(tmp_path / "forged.json", forgery(node.key))
    code, out, err = verify(file, config=node.config)
    assert (code, out) == (1, "")
    assert "not the trusted node key" in err


def test_without_any_trusted_key_verify_cert_refuses(node: Node, tmp_path: Path) -> None:
    """No --public-key and no node key: the embedded key is not a fallback, whatever the file."""
    node.key_path.unlink()
    for name, document in (("forged", forgery(node.key)), ("genuine", certify(node.key))):
        code, out, err = verify(write(tmp_path / f"{name}.json", document), config=node.config)
        assert (code, out) == (2, ""), name
        assert err == (
            f"accelguard: error: no key to verify against (node key {node.key_path} does not "
            "exist); pass --public-key FILE with the signing node's key (`accelguard status` "
            "prints it)"
        )
    assert not node.key_path.exists()  # a verifier never creates the key it would trust


def test_unusable_config_or_node_key_refuses_the_same_way(node: Node, tmp_path: Path) -> None:
    file = write(tmp_path / "forged.json", forgery(node.key))
    code, _, err = verify(file, config=tmp_path / "absent.toml")
    assert code == 2
    assert "cannot read config" in err and "pass --public-key FILE" in err
    node.key_path.chmod(0o644)  # readable by others: anyone could have signed with it
    code, _, err = verify(file, config=node.config)
    assert code == 2
    assert "has mode 0644" in err and "pass --public-key FILE" in err


def test_duplicate_members_are_refused(node: Node, tmp_path: Path) -> None:
    """A signed failed scrub with `"verified": true` added before the real member. Python keeps
    the last (false, so the signature holds); a first-wins parser would read true."""
    text = json.dumps(certify(node.key, scrub_result(mismatched_bytes=8)), indent=2)
    assert text.count('"verified": false') == 1
    text = text.replace('"verified": false', '"verified": true, "verified": false')
    file = tmp_path / "twice.json"
    file.write_text(text)
    code, _, err = verify(file, "--public-key", str(node.public_pem))
    assert code == 2
    assert err == f"accelguard: error: certificate {file}: member name 'verified' appears twice"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_numbers_are_refused(node: Node, tmp_path: Path, constant: str) -> None:
    text = json.dumps(certify(node.key), indent=2)
    text = text.replace('"bytes_total": 10468982784', f'"bytes_total": {constant}')
    file = tmp_path / "nan.json"
    file.write_text(text)
    code, _, err = verify(file, "--public-key", str(node.public_pem))
    assert code == 2
    assert err.startswith(f"accelguard: error: certificate {file}: ")
    assert constant.lstrip("-") in err


def test_huge_file_is_refused_before_it_is_read(node: Node, tmp_path: Path) -> None:
    """5 GB: read whole, this was 4.9 GB of memory; the size is refused from fstat (the message
    gives the size fstat reports). The cap is a list of certificates' (`scrub certs --json`)."""
    file = tmp_path / "huge.json"
    with file.open("wb") as stream:
        stream.truncate(5 * 10**9)
    code, _, err = verify(file, "--public-key", str(node.public_pem))
    assert code == 2
    assert err == (
        f"accelguard: error: certificate {file}: 5000000000 bytes, over the 67108864-byte limit"
    )


def test_deep_nesting_is_one_line_not_a_recursion_error(node: Node, tmp_path: Path) -> None:
    file = tmp_path / "deep.json"
    file.write_bytes(b"[" * 200_000 + b"]" * 200_000)  # under the byte cap
    code, _, err = verify(file, "--public-key", str(node.public_pem))
    assert code == 2
    assert err == f"accelguard: error: certificate {file}: nested deeper than 8 levels"


def test_a_certificate_at_the_size_cap_still_verifies(node: Node, tmp_path: Path) -> None:
    """The cap refuses nothing the node could sign: the longest detail, in its longest encoding
    (non-BMP characters, each two \\u escapes, as `scrub certs --json` writes them)."""
    result = scrub_result()
    longest = ScrubResult(
        result.backend, result.policy, result.total_bytes, result.passes, "\U0001f600" * 4096
    )
    text = json.dumps(certify(node.key, longest), indent=2)
    assert len(text) > 49_152
    file = tmp_path / "long.json"
    file.write_text(text)
    code, _, err = verify(file, "--public-key", str(node.public_pem))
    assert code == 0, err


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"-" * 5000, "over the 4096-byte limit"), ("é".encode() * 10, "not a PEM file")],
)
def test_bad_public_key_file_is_one_line(
    node: Node, tmp_path: Path, content: bytes, reason: str
) -> None:
    key = tmp_path / "bad.pem"
    key.write_bytes(content)
    code, _, err = verify(write(tmp_path / "c.json", certify(node.key)), "--public-key", str(key))
    assert code == 2
    assert reason in err
