"""The one exception hierarchy of accelguard.

Code above a subsystem boundary (``hw/``, ``isolation/``, ``scrub/``, ``attest/``) only ever sees
these: each backend translates its library's errors (pynvml.NVMLError, OSError from bpf(2),
TSS2_Exception, ...) into one of them at the boundary, with a message that says what failed and
what to do about it. The CLI prints ``str(error)`` as one line and exits non-zero.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The CLI's scripting contract (README "Exit codes"): 0 only for the safe outcome asked for."""

    OK = 0
    FAILED = 1
    REFUSED = 2  # input rejected, nothing changed
    QUARANTINED = 3  # done, but the partition ended quarantined (not clean)
    NOT_FOUND = 4  # the named lease, partition or GPU does not exist
    RETRY_LATER = 75  # EX_TEMPFAIL: nothing clean yet, a scrub or a retry is under way


class AccelguardError(Exception):
    """Base of every error accelguard raises on purpose."""

    exit_code: int = ExitCode.FAILED


class ConfigError(AccelguardError):
    """A configuration file or value is invalid; the message names the key."""

    exit_code = ExitCode.REFUSED


class ValidationError(AccelguardError):
    """Input from an operator, a tenant or the network was rejected; nothing was changed."""

    exit_code = ExitCode.REFUSED


class NotFoundError(ValidationError):
    """A named object (GPU index, partition, lease, profile) does not exist."""

    exit_code = ExitCode.NOT_FOUND


class PermissionDeniedError(ValidationError):
    """The caller may not do this (not root, not in the admin group); nothing was changed."""


class RetryLaterError(AccelguardError):
    """Not possible yet, possible soon: no clean partition while scrubs run, or a step failed
    transiently and the agent retries it on its own. Nothing unsafe was done."""

    exit_code = ExitCode.RETRY_LATER


class AlreadyRunningError(AccelguardError):
    """Another agent holds the state directory; this one touched nothing."""


class StoreError(AccelguardError):
    """The SQLite journal could not be opened, migrated or written."""


class JournalCorruptError(StoreError):
    """The journal is damaged: the agent refuses to start on it (``accelguard state recover``)."""


class HardwareError(AccelguardError):
    """An accelerator management call failed (translated from NVML or the driver)."""


class GpuLostError(HardwareError):
    """NVML says the GPU fell off the bus (NVML_ERROR_GPU_IS_LOST)."""


class InsufficientResourcesError(HardwareError):
    """The device refused an allocation (NVML_ERROR_INSUFFICIENT_RESOURCES)."""


class InUseError(HardwareError):
    """The device refused to destroy something that still has users (NVML_ERROR_IN_USE)."""


class LayoutError(ValidationError):
    """A requested MIG layout is malformed, names an unknown profile, or cannot be placed."""


class IsolationError(AccelguardError):
    """A device fence could not be applied or verified: treat the cgroup as unfenced."""


class BpfSyscallError(IsolationError):
    """bpf(2) failed; ``errno`` and ``command`` say which call and why."""

    def __init__(self, command: str, error_number: int, message: str) -> None:
        super().__init__(message)
        self.command = command
        self.errno = error_number


class EvictionError(AccelguardError):
    """The partition cannot be proven free of holders: it must not be scrubbed or reused."""


class ScanError(EvictionError):
    """A live process's descriptors or memory maps could not be read.

    ``hint`` says why the read may have been refused (agent/isolation/evict.py works it out from
    the agent's capabilities)."""

    def __init__(self, pid: int, what: str, error: OSError, hint: str = "") -> None:
        self.pid = pid
        self.detail = f"cannot read /proc/{pid}/{what}: {error.strerror}{hint}"
        super().__init__(f"the holder scan {self.detail}; the partition cannot be proven free")


class ScrubError(AccelguardError):
    """Memory could not be scrubbed or verified: the partition is not clean."""


class AttestationError(AccelguardError):
    """Evidence could not be produced or did not verify."""


class PolicyError(AttestationError):
    """A policy document is invalid; the message names the key."""

    exit_code = ExitCode.REFUSED


class EventLogError(AttestationError):
    """A TCG event log is malformed; the message gives the byte offset and the reason."""


class ImaLogError(AttestationError):
    """An IMA measurement list is malformed; the message gives the entry and the reason."""


class QuoteError(AttestationError):
    """A TPM quote structure is malformed or fails a check."""


class TpmError(AttestationError):
    """A TPM command failed (translated from tpm2-pytss)."""


class AdminApiError(AccelguardError):
    """A call over a local admin socket failed: it could not be served or its answer was not
    understood (the daemon's own refusals arrive as the error classes above, exit codes kept)."""


class DaemonUnavailableError(AdminApiError):
    """The CLI could not reach the daemon's admin socket."""


class LinkError(AccelguardError):
    """The controller link failed."""


# --- the controller link (agent/link, agent/identity, agent/controller) --------------------------


class LinkProtocolError(ValidationError):
    """A link or enrollment message from the network is malformed or breaks the protocol; it was
    refused and nothing was stored."""


class EnrollmentRefusedError(ValidationError):
    """The controller refused an enrollment (token, CSR, TPM evidence); nothing was stored."""


class IdentityError(AccelguardError):
    """The node's link identity (TLS key, certificate, pinned CA) is missing or unusable."""


class PkiError(AccelguardError):
    """The controller's CA, server certificate or command key is missing or unusable."""


class OutboxFullError(RetryLaterError):
    """A report that must never be dropped (lease event, scrub certificate, attestation or
    command result) could not be stored in the link outbox; the node refuses new grants until
    the controller has acknowledged enough to make room."""


class AuditFullError(RetryLaterError):
    """The audit log reached its hard bound (audit.max_records) with records no acked or
    exported checkpoint covers: rotating would lose unshipped history, so new grants are refused
    until the controller acks a checkpoint or an operator runs ``accelguard audit export``."""


class AuditTamperedError(AccelguardError):
    """``accelguard audit verify`` found the log or its checkpoints changed: the message names
    the first broken record or checkpoint."""


class CommandRefusedError(ValidationError):
    """A remote command was refused before anything ran (docs/commands.md): ``reason`` is the
    code reported uplink (malformed, oversized, signature, unknown_key, wrong_node, future,
    expired, replayed, unknown_body, cordoned)."""

    def __init__(self, reason: str, message: str, command_id: bytes = b"") -> None:
        super().__init__(message)
        self.reason = reason
        self.command_id = command_id
