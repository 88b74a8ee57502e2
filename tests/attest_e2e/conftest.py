"""swtpm fixtures for the end-to-end attestation tests (see helpers.py for what "booted" means)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.attest.tpm.client import TpmClient
from agent.attest.tpm.keys import AttestationKey
from tests.attest_e2e.helpers import AK_HANDLE, BootedTpm, start_booted_tpm


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootedTpm]:
    """One booted swtpm per module; tests that reset or extend it use ``fresh_booted``."""
    tpm = start_booted_tpm(tmp_path_factory.mktemp("swtpm"))
    try:
        yield tpm
    finally:
        tpm.swtpm.stop()


@pytest.fixture
def fresh_booted(tmp_path: Path) -> Iterator[BootedTpm]:
    tpm = start_booted_tpm(tmp_path / "swtpm")
    try:
        yield tpm
    finally:
        tpm.swtpm.stop()


@pytest.fixture(scope="module")
def tpm(booted: BootedTpm) -> Iterator[TpmClient]:
    client = booted.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def ak(tpm: TpmClient) -> AttestationKey:
    """The node's AK, persisted at the configured handle as `accelguard attest quote` does."""
    return tpm.ensure_attestation_key(AK_HANDLE)
