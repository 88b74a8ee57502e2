"""The one exception hierarchy of accelguard.

Code above a subsystem boundary (``hw/``, ``isolation/``, ``scrub/``, ``attest/``) only ever sees
these: each backend translates its library's errors (pynvml.NVMLError, OSError from bpf(2),
TSS2_Exception, ...) into one of them at the boundary, with a message that says what failed and
what to do about it. The CLI prints ``str(error)`` as one line and exits non-zero.
"""

from __future__ import annotations


class AccelguardError(Exception):
    """Base of every error accelguard raises on purpose."""

    exit_code = 1


class ConfigError(AccelguardError):
    """A configuration file or value is invalid; the message names the key."""

    exit_code = 2


class ValidationError(AccelguardError):
    """Input from an operator, a tenant or the network was rejected; nothing was changed."""

    exit_code = 2


class NotFoundError(ValidationError):
    """A named object (GPU index, partition, lease, profile) does not exist."""


class StoreError(AccelguardError):
    """The SQLite journal could not be opened, migrated or written."""


class HardwareError(AccelguardError):
    """An accelerator management call failed (translated from NVML or the driver)."""


class InsufficientResourcesError(HardwareError):
    """The device refused an allocation (NVML_ERROR_INSUFFICIENT_RESOURCES)."""


class InUseError(HardwareError):
    """The device refused to destroy something that still has users (NVML_ERROR_IN_USE)."""


class LayoutError(ValidationError):
    """A requested MIG layout is malformed, names an unknown profile, or cannot be placed."""


class IsolationError(AccelguardError):
    """A device fence could not be applied or verified: treat the cgroup as unfenced."""


class ScrubError(AccelguardError):
    """Memory could not be scrubbed or verified: the partition is not clean."""


class AttestationError(AccelguardError):
    """Evidence could not be produced or did not verify."""


class EventLogError(AttestationError):
    """A TCG event log is malformed; the message gives the byte offset and the reason."""


class ImaLogError(AttestationError):
    """An IMA measurement list is malformed; the message gives the entry and the reason."""


class QuoteError(AttestationError):
    """A TPM quote structure is malformed or fails a check."""


class TpmError(AttestationError):
    """A TPM command failed (translated from tpm2-pytss)."""


class LinkError(AccelguardError):
    """The controller link or admin socket failed."""


class DaemonUnavailableError(LinkError):
    """The CLI could not reach the daemon's admin socket."""
