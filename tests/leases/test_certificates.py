"""Every release leaves a signed scrub certificate that verifies offline and resists tampering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.runtime.failpoints import ENVIRONMENT_VARIABLE, Fault
from tests.leases.helpers import any_tenant_cgroup
from tests.support import RunningAgent, run_cli, wait_all_clean, wait_settled

# tests/foundation/test_failpoints.py checks that every failpoint has a test.
COVERED = frozenset([Fault.SCRUB_SHORT_COVERAGE])


def _release_one(agent: RunningAgent, cgroup: Path, policy: str = "") -> dict[str, Any]:
    extra = ["--scrub-policy", policy] if policy else []
    grant = agent.cli_json(
        "lease",
        "grant",
        "--tenant",
        "tess",
        "--profile",
        "1g.10gb",
        "--cgroup",
        str(cgroup),
        *extra,
    )
    agent.cli_json("lease", "release", grant["lease"]["id"])
    return grant


def test_release_certificate_verifies_and_tampering_is_refused(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path], tmp_path: Path
) -> None:
    agent = lease_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
    wait_all_clean(agent)
    cgroup = any_tenant_cgroup(cgroup_parents, "cert")
    grant = _release_one(agent, cgroup, policy="multi-pass")
    partition = grant["partition"]["uuid"]
    certificates = agent.cli_json("scrub", "certs", "--partition", partition)["certificates"]
    # One for the scrub of the new instance, one for the release.
    assert len(certificates) == 2
    released = certificates[-1]
    payload = released["payload"]
    assert payload["previous_lease_id"] == grant["lease"]["id"]
    assert payload["previous_tenant"] == "tess"
    assert payload["policy"] == "multi-pass"
    assert [p["pattern"] for p in payload["passes"]] == [0x55555555, 0xAAAAAAAA, 0]
    assert payload["verified"] is True and payload["coverage"].startswith("1")
    assert payload["bytes_verified"] == payload["bytes_total"] == agent.config.sim.slice_bytes

    key = tmp_path / "node.pem"
    key.write_text(agent.cli_json("status")["node_public_key"])
    good = tmp_path / "cert.json"
    good.write_text(json.dumps(released, indent=4))  # re-serialised: still the same payload
    result = run_cli("scrub", "verify-cert", str(good), "--public-key", str(key))
    assert result.returncode == 0, result.stderr
    assert "signature OK" in result.stdout

    tampered = json.loads(good.read_text())
    tampered["payload"]["bytes_verified"] += 1
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(tampered))
    refused = run_cli("scrub", "verify-cert", str(bad))
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1

    raw = bytearray(good.read_bytes())
    position = raw.index(b'"signature"') + len(b'"signature": "') + 3
    raw[position] = ord("A") if raw[position] != ord("A") else ord("B")
    bad.write_bytes(bytes(raw))
    assert run_cli("scrub", "verify-cert", str(bad)).returncode != 0

    other = tmp_path / "other.pem"
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert run_cli("scrub", "verify-cert", str(good), "--public-key", str(other)).returncode != 0


def test_coverage_below_minimum_quarantines(agent: RunningAgent) -> None:
    agent.stop()
    agent.start(env={ENVIRONMENT_VARIABLE: Fault.SCRUB_SHORT_COVERAGE})
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
    [partition] = wait_settled(agent)
    assert partition["state"] == "quarantined"
    assert (
        "covered 50.0%" in partition["reason"]
        and "below the configured minimum" in partition["reason"]
    )
    [certificate] = agent.cli_json("scrub", "certs")["certificates"]
    assert certificate["payload"]["coverage"].startswith("0.5")
