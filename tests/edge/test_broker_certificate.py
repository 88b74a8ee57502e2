"""`accelguard controller broker-certificate`: the broker's TLS certificate from the controller
CA, for exactly the names asked; bad input changes nothing."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.link.support import Controller, run_tool


def test_the_broker_certificate_names_the_broker_and_chains_to_the_ca(tmp_path: Path) -> None:
    controller = Controller(tmp_path / "controller")
    controller.init()
    out = tmp_path / "broker"
    config = str(controller.config_path)
    names = ["--name", "mqtt.edge.example", "--name", "10.0.0.7"]
    result = run_tool("controller", "broker-certificate", "--config", config, *names, "--out",
                      str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "controller identity: controller@test.fleet" in result.stdout
    chain = x509.load_pem_x509_certificates((out / "broker.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    assert (
        chain[-1]
        == ca
        == x509.load_pem_x509_certificate((controller.root / "pki" / "ca.pem").read_bytes())
    )
    leaf = chain[0]
    leaf.verify_directly_issued_by(ca)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mqtt.edge.example"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert (out / "broker.key").stat().st_mode & 0o077 == 0

    refused = tmp_path / "refused"
    result = run_tool("controller", "broker-certificate", "--config", str(controller.config_path),
                      "--name", "bad name/../x", "--out", str(refused))  # fmt: skip
    assert result.returncode == 2, result.stdout
    assert "--name 'bad name/../x': not a DNS name or an IP address" in result.stderr
    assert not refused.exists()
