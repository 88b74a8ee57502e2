"""A real swtpm per test module (or per test, for tests that change persistent TPM state)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.attest.tpm.client import TpmClient
from agent.attest.tpm.keys import AkAlgorithm, AttestationKey
from agent.sim.swtpm import Swtpm


@pytest.fixture(scope="module")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    tpm = Swtpm(tmp_path_factory.mktemp("swtpm"))
    try:
        tpm.start()
        yield tpm
    finally:
        tpm.stop()


@pytest.fixture
def fresh_swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A swtpm of its own, for tests that persist keys or define NV indices."""
    tpm = Swtpm(tmp_path / "swtpm")
    try:
        tpm.start()
        yield tpm
    finally:
        tpm.stop()


@pytest.fixture(scope="module")
def tpm(swtpm: Swtpm) -> Iterator[TpmClient]:
    client = TpmClient(swtpm.tcti)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module", params=list(AkAlgorithm), ids=lambda a: str(a))
def ak(request: pytest.FixtureRequest, tpm: TpmClient) -> Iterator[AttestationKey]:
    """A transient AK of each algorithm in turn (swtpm holds only 3 loaded objects: EK, this AK
    and one spare, so it is flushed before the next algorithm's)."""
    key = tpm.create_attestation_key(request.param)
    try:
        yield key
    finally:
        tpm.flush_attestation_key(key)
