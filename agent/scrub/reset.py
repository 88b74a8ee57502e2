"""A scrub by PCI function reset, for devices whose memory accelguard cannot write and read back
itself (``/dev/accel`` devices: no vendor-neutral way to map their memory).

What a reset clears is the device's business: a function-level reset is the PCIe mechanism for
returning a function to a clean state (PCIe Base Specification, "Function Level Reset"), but
whether on-package memory is wiped depends on the device and its firmware. So the outcome says
``verified=False``: the reset happened, nothing was read back. Whether that is enough to hand the
device to the next tenant is the caller's policy, not this module's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from agent.errors import HardwareError, ScrubError
from agent.hw.model import DeviceInfo


class FunctionReset(Protocol):
    """What a reset scrub needs of a backend (``agent.hw.accel.AccelBackend``)."""

    def reset(self, device: DeviceInfo) -> None: ...


@dataclass(frozen=True)
class ResetOutcome:
    method: str = "reset"
    # False: a reset clears what the device clears; no byte of its memory was read back.
    verified: bool = False
    detail: str = ""
    seconds: float = 0.0


def reset_scrub(backend: FunctionReset, device: DeviceInfo) -> ResetOutcome:
    """Reset ``device``'s PCI function; ScrubError if the reset could not be done."""
    started = time.monotonic()
    try:
        backend.reset(device)
    except HardwareError as error:
        raise ScrubError(f"reset scrub of {device.label} failed: {error}") from error
    seconds = time.monotonic() - started
    return ResetOutcome(
        detail=(
            f"PCI function reset of {device.label} ({device.pci_bus_id}, "
            f"{device.driver or 'no driver'}); device memory not read back"
        ),
        seconds=seconds,
    )
