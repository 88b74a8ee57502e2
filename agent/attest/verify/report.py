"""What a verification found: the checks, their status, and each failure with its reason code.

:class:`VerificationReport` is what :func:`agent.attest.verify.engine.verify_evidence` returns
and what the CLI prints; :class:`Collector` is how the engine's checks fill it in. A check is
"passed" only if it ran and nothing failed; one that could not run is "not_checked", with the
reason among ``unchecked``, never silently passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from agent.attest.tpm.checks import ClockState
from agent.attest.tpm.wire import Attest


class Check(StrEnum):
    EVIDENCE = "evidence"
    AK_IDENTITY = "ak_identity"
    QUOTE = "quote"
    FRESHNESS = "freshness"
    PCR_SELECTION = "pcr_selection"
    CLOCK = "clock"
    EVENT_LOG = "event_log"
    IMA = "ima"
    POLICY = "policy"


class Reason(StrEnum):
    """Reasons of this module; quote checks use :class:`agent.attest.tpm.checks.Reason`'s codes and
    policy findings ``policy_<kind>`` (e.g. ``policy_pcr_mismatch``)."""

    EVIDENCE_NONCE_INCONSISTENT = "evidence_nonce_inconsistent"
    AK_NOT_ENROLLED = "ak_not_enrolled"
    AK_IDENTITY_NOT_CHECKED = "ak_identity_not_checked"
    PCR_SELECTION_NOT_CHECKED = "pcr_selection_not_checked"
    EVENTLOG_MALFORMED = "eventlog_malformed"
    EVENTLOG_ERROR = "eventlog_error"
    EVENTLOG_PCR_MISMATCH = "eventlog_pcr_mismatch"
    EVENTLOG_NO_COMMON_BANK = "eventlog_no_common_bank"
    EVENTLOG_PCR_NOT_QUOTED = "eventlog_pcr_not_quoted"
    EVENTLOG_BANK_NOT_REPLAYED = "eventlog_bank_not_replayed"
    PCR_UNEXPLAINED = "pcr_unexplained"
    IMA_MALFORMED = "ima_malformed"
    IMA_TEMPLATE_HASH_MISMATCH = "ima_template_hash_mismatch"
    IMA_PCR_MISMATCH = "ima_pcr_mismatch"
    IMA_START_UNKNOWN = "ima_start_unknown"
    IMA_NOT_CHECKED = "ima_not_checked"
    POLICY_NOT_CHECKED = "policy_not_checked"
    POLICY_NOT_EVALUATED = "policy_not_evaluated"
    POLICY_PCR_NOT_QUOTED = "policy_pcr_not_quoted"


CheckStatus = Literal["passed", "failed", "not_checked"]
PcrValues = Mapping[str, Mapping[int, bytes]]


@dataclass(frozen=True)
class Failure:
    """One failed or skipped check: the check, a stable reason code and a sentence."""

    check: Check
    reason: str
    message: str
    pcr: int | None = None
    bank: str | None = None

    def to_dict(self) -> dict[str, object]:
        result: dict[str, object] = {
            "check": str(self.check),
            "reason": self.reason,
            "message": self.message,
        }
        if self.pcr is not None:
            result["pcr"] = self.pcr
        if self.bank is not None:
            result["bank"] = self.bank
        return result


@dataclass(frozen=True)
class ImaProgress:
    """How far the verifier has replayed one AK's IMA list within one boot (``reset_count``):
    ``pcrs`` are the IMA PCRs' values after entry ``next_index - 1``."""

    reset_count: int
    next_index: int
    pcrs: Mapping[str, Mapping[int, bytes]]


@dataclass(frozen=True)
class VerificationReport:
    """Outcome of :func:`verify_evidence`.

    ``checks`` gives every check's status; ``failures`` the failed ones (their reasons),
    ``unchecked`` what was not or only partly checked and why, ``notes`` informational
    remarks. Keep ``clock_state`` and ``ima_progress`` for the AK's next evidence only when
    ``ok`` (:meth:`VerifierState.record` does that).
    """

    checks: Mapping[Check, CheckStatus]
    failures: tuple[Failure, ...]
    unchecked: tuple[Failure, ...]
    notes: tuple[str, ...]
    ak_name: bytes | None
    attest: Attest | None
    clock_state: ClockState | None
    ima_progress: ImaProgress | None

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def reasons(self) -> frozenset[str]:
        return frozenset(failure.reason for failure in self.failures)

    @property
    def checks_run(self) -> tuple[Check, ...]:
        return tuple(check for check, status in self.checks.items() if status != "not_checked")

    def to_dict(self) -> dict[str, object]:
        result: dict[str, object] = {
            "ok": self.ok,
            "checks": {str(check): status for check, status in self.checks.items()},
            "failures": [failure.to_dict() for failure in self.failures],
            "unchecked": [item.to_dict() for item in self.unchecked],
            "notes": list(self.notes),
            "ak_name": self.ak_name.hex() if self.ak_name is not None else None,
        }
        if self.attest is not None:
            clock = self.attest.clock_info
            result["clock"] = {
                "clock": clock.clock,
                "reset_count": clock.reset_count,
                "restart_count": clock.restart_count,
                "safe": clock.safe,
            }
            if self.attest.quote_info is not None:
                result["quoted_selection"] = self.attest.quote_info.selection_dict()
        return result


@dataclass
class Collector:
    """The failures, skipped checks and notes of one verification, as the checks record them."""

    failures: list[Failure] = field(default_factory=list)
    unchecked: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ran: set[Check] = field(default_factory=set)

    def fail(
        self,
        check: Check,
        reason: str,
        message: str,
        pcr: int | None = None,
        bank: str | None = None,
    ) -> None:
        self.ran.add(check)
        self.failures.append(Failure(check, reason, message, pcr, bank))

    def skip(
        self,
        check: Check,
        reason: str,
        message: str,
        pcr: int | None = None,
        bank: str | None = None,
    ) -> None:
        self.unchecked.append(Failure(check, reason, message, pcr, bank))

    def status(self, check: Check) -> CheckStatus:
        if any(failure.check == check for failure in self.failures):
            return "failed"
        return "passed" if check in self.ran else "not_checked"
