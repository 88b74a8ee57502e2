"""Verify an evidence document: the quote, then the logs and the policy against the quoted PCRs.

:func:`verify_evidence` runs every check whatever the earlier ones found and reports each
failure with its own reason code, so an operator sees everything wrong with a node at once:

1. ``quote`` (:func:`agent.attest.quote.verify_quote`): AK attributes, signature, magic, type,
   pcrDigest over the supplied values; with its ``freshness`` (nonce), ``pcr_selection`` and
   ``clock`` (replay, counters) parts reported as checks of their own;
2. ``ak_identity``: the AK in the document is the one enrolled for the node, when the caller
   says which one that is;
3. ``event_log``: the firmware log replays to the quoted value of every PCR it measures, in
   every bank both have;
4. ``ima``: the IMA list replays to the quoted PCR 10 (incrementally, from a kept value);
5. ``policy``: golden PCRs and reference events, when a policy is given.

Checks that cannot run (no nonce, no earlier quote, no IMA list, no policy) are reported as
``not_checked`` with the reason, never silently passed. Evidence content never raises; only
the caller's own malformed arguments do.

The verifier keeps, per AK, the clock of the last accepted quote and how far it has replayed the
IMA list (:class:`VerifierState`, a small JSON file for the CLI's ``--state``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Final, Literal

from agent.attest import ima
from agent.attest.eventlog import BANKS, EventLog, initial_pcr_value, parse_event_log
from agent.attest.evidence import Evidence
from agent.attest.policy import Policy, evaluate
from agent.attest.quote import (
    Attest,
    ClockState,
    bank_name,
    compute_name,
    decode_attest,
    normalise_selection,
    verify_quote,
)
from agent.attest.quote import Reason as QuoteReason
from agent.errors import AttestationError, EventLogError, ImaLogError, QuoteError

# PFP section 3.3.4: firmware measures into PCRs 0-7 and logs every such measurement, so a
# non-initial value there with no event in the log means the log is incomplete. Higher PCRs
# are also extended by the OS (systemd-stub, IMA) outside the firmware log.
FIRMWARE_PCRS: Final = frozenset(range(8))
# Bounds the report: a log with thousands of bad entries gives a count, not thousands of lines.
MAX_LISTED: Final = 10


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
    """Reasons of this module; quote checks use :class:`agent.attest.quote.Reason`'s codes and
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


_QUOTE_REASON_CHECKS: Final[Mapping[str, Check]] = {
    QuoteReason.NONCE_MISMATCH: Check.FRESHNESS,
    QuoteReason.FRESHNESS_NOT_CHECKED: Check.FRESHNESS,
    QuoteReason.SELECTION_MISMATCH: Check.PCR_SELECTION,
    QuoteReason.CLOCK_STATE_OTHER_AK: Check.CLOCK,
    QuoteReason.CLOCK_NOT_ADVANCED: Check.CLOCK,
    QuoteReason.CLOCK_WENT_BACKWARDS: Check.CLOCK,
    QuoteReason.RESET_COUNT_ROLLED_BACK: Check.CLOCK,
    QuoteReason.RESTART_COUNT_ROLLED_BACK: Check.CLOCK,
    QuoteReason.CLOCK_NOT_CHECKED: Check.CLOCK,
}

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
class _Collector:
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


def verify_evidence(
    evidence: Evidence,
    expected_nonce: bytes | None,
    policy: Policy | None,
    previous: ClockState | None,
    expected_selection: Mapping[str, Sequence[int]] | None = None,
    *,
    enrolled_ak_name: bytes | None = None,
    ima_progress: ImaProgress | None = None,
) -> VerificationReport:
    """Run every check on ``evidence`` and report each failure with its reason.

    ``expected_nonce``: the nonce the verifier sent (None: freshness is not checked).
    ``previous``: this AK's clock state from its last accepted quote (None: first quote).
    ``expected_selection``: the PCRs the verifier asked for, ``{"sha256": [0, 1, ...]}``
    (None: whatever the quote covers is accepted, and the report says so).
    ``enrolled_ak_name``: the Name of the AK enrolled for this node (None: the document's own
    AK is used and the report says its identity was not checked).
    ``ima_progress``: where this AK's IMA replay stopped, for evidence that ships only new
    entries.

    Raises :class:`~agent.errors.AttestationError` only for the caller's own malformed
    ``expected_selection`` or argument types, never for anything in ``evidence``.
    """
    if expected_nonce is not None and not isinstance(expected_nonce, bytes):
        raise AttestationError("expected nonce must be bytes or None")
    if enrolled_ak_name is not None and not isinstance(enrolled_ak_name, bytes):
        raise AttestationError("enrolled AK name must be bytes or None")
    collector = _Collector()
    attest = _decode_attest(evidence.quote)
    if expected_selection is not None:
        selection = normalise_selection(expected_selection)
    else:
        selection = _own_selection(attest, evidence)
        collector.skip(
            Check.PCR_SELECTION,
            Reason.PCR_SELECTION_NOT_CHECKED,
            "PCR selection not checked: no expected selection was given, so the quote's own "
            "selection is accepted",
        )
    expected = {bank_name(alg): list(pcrs) for alg, pcrs in selection.items()}
    result = verify_quote(
        evidence.ak_public,
        evidence.quote,
        evidence.signature,
        evidence.pcrs,
        expected_nonce,
        expected,
        previous,
    )
    collector.ran.add(Check.QUOTE)
    if attest is None:
        skipped = [Check.FRESHNESS, Check.CLOCK]
        if expected_selection is not None:
            skipped.append(Check.PCR_SELECTION)
        for check in skipped:
            collector.skip(
                check, QuoteReason.QUOTE_MALFORMED, "not checked: the quote does not decode"
            )
    else:
        collector.ran.update({Check.FRESHNESS, Check.CLOCK})
        if expected_selection is not None and attest.quote_info is not None:
            collector.ran.add(Check.PCR_SELECTION)
    for finding in result.failures:
        check = _QUOTE_REASON_CHECKS.get(finding.reason, Check.QUOTE)
        collector.fail(check, finding.reason, finding.message)
    for finding in result.unchecked:
        check = _QUOTE_REASON_CHECKS.get(finding.reason, Check.QUOTE)
        collector.ran.discard(check)
        collector.skip(check, finding.reason, finding.message)
    if attest is not None and attest.extra_data != evidence.nonce:
        collector.fail(
            Check.EVIDENCE,
            Reason.EVIDENCE_NONCE_INCONSISTENT,
            f"the document's nonce {evidence.nonce.hex()} is not the quote's extraData "
            f"{attest.extra_data.hex()}",
        )
    collector.ran.add(Check.EVIDENCE)

    ak_name = _ak_name(evidence.ak_public)
    _check_ak_identity(ak_name, enrolled_ak_name, collector)

    quoted = _quoted_values(attest, evidence.pcrs)
    ima_log = _parse_ima(evidence, collector)
    event_log = _check_event_log(evidence, quoted, ima_log, collector)
    progress = _check_ima(
        ima_log, evidence.ima_start_index, quoted, attest, ima_progress, collector
    )
    _check_policy(policy, quoted, event_log, collector)

    checks = {check: collector.status(check) for check in Check}
    return VerificationReport(
        checks=checks,
        failures=tuple(collector.failures),
        unchecked=tuple(collector.unchecked),
        notes=tuple(collector.notes),
        ak_name=ak_name,
        attest=attest,
        clock_state=result.clock_state,
        ima_progress=progress,
    )


def _decode_attest(quote: bytes) -> Attest | None:
    try:
        return decode_attest(quote)
    except QuoteError:
        return None  # verify_quote reports it


def _ak_name(ak_public: bytes) -> bytes | None:
    try:
        return compute_name(ak_public)
    except QuoteError:
        return None  # verify_quote reports it


def _own_selection(attest: Attest | None, evidence: Evidence) -> dict[int, tuple[int, ...]]:
    """The selection to hold the quote to when the caller gave none: the quote's own, else the
    supplied values' (so a malformed quote is still reported by the quote checks)."""
    candidates: list[Mapping[str, Sequence[int]]] = []
    if attest is not None and attest.quote_info is not None:
        candidates.append(attest.quote_info.selection_dict())
    candidates.append({bank: sorted(values) for bank, values in evidence.pcrs.items()})
    for candidate in candidates:
        try:
            return normalise_selection(candidate)
        except QuoteError:
            continue
    return normalise_selection({"sha256": [0]})


def _quoted_values(attest: Attest | None, supplied: PcrValues) -> dict[str, dict[int, bytes]]:
    """The supplied values the quote covers (all of them when the quote does not decode)."""
    if attest is None or attest.quote_info is None:
        return {bank: dict(values) for bank, values in supplied.items()}
    covered = attest.quote_info.selection_dict()
    result: dict[str, dict[int, bytes]] = {}
    for bank, indices in covered.items():
        values = {i: supplied[bank][i] for i in indices if i in supplied.get(bank, {})}
        if values:
            result[bank] = values
    return result


def _check_ak_identity(
    ak_name: bytes | None, enrolled: bytes | None, collector: _Collector
) -> None:
    if enrolled is None:
        collector.skip(
            Check.AK_IDENTITY,
            Reason.AK_IDENTITY_NOT_CHECKED,
            "AK identity not checked: no enrolled AK was given, so the document's own AK is "
            "trusted (enrollment with MakeCredential/ActivateCredential is what ties an AK to "
            "a TPM)",
        )
        return
    collector.ran.add(Check.AK_IDENTITY)
    if ak_name is None or not hmac.compare_digest(ak_name, enrolled):
        shown = ak_name.hex() if ak_name is not None else "undecodable"
        collector.fail(
            Check.AK_IDENTITY,
            Reason.AK_NOT_ENROLLED,
            f"the quote is signed by AK {shown}, not the enrolled AK {enrolled.hex()}",
        )


# --- event log ----------------------------------------------------------------------------------


def _check_event_log(
    evidence: Evidence, quoted: PcrValues, ima_log: ima.ImaLog | None, collector: _Collector
) -> EventLog | None:
    collector.ran.add(Check.EVENT_LOG)
    try:
        log = parse_event_log(evidence.event_log)
    except EventLogError as error:
        collector.fail(Check.EVENT_LOG, Reason.EVENTLOG_MALFORMED, f"event log: {error}")
        return None
    for finding in log.findings:
        if finding.severity == "error":
            collector.fail(
                Check.EVENT_LOG,
                Reason.EVENTLOG_ERROR,
                f"event log {finding.kind}: {finding.message}",
                finding.pcr,
            )
        elif finding.severity == "warning":
            collector.notes.append(f"event log {finding.kind}: {finding.message}")
    replayed = log.replay()
    measured = sorted({event.pcr for event in log.events if event.extends})
    ima_pcrs: frozenset[int] = frozenset()
    if evidence.ima_log is not None:
        ima_pcrs = frozenset({ima.IMA_DEFAULT_PCR} | (ima_log.pcrs if ima_log else set()))
    common = [bank for bank in quoted if bank in replayed]
    if not common:
        collector.fail(
            Check.EVENT_LOG,
            Reason.EVENTLOG_NO_COMMON_BANK,
            f"the event log replays banks {sorted(replayed)} but the quote covers "
            f"{sorted(quoted)}: the log cannot be matched to the quote",
        )
    for bank in sorted(set(quoted) - set(replayed)):
        if measured:
            collector.skip(
                Check.EVENT_LOG,
                Reason.EVENTLOG_BANK_NOT_REPLAYED,
                f"the {bank} PCRs are quoted but the event log cannot replay {bank}: their values "
                "are not checked against the log",
                bank=bank,
            )
    for bank in common:
        size = BANKS[bank].digest_size
        for pcr, actual in sorted(quoted[bank].items()):
            expected = replayed[bank].get(pcr)
            if expected is None:
                if pcr in ima_pcrs:
                    continue  # the IMA check judges it
                if actual == initial_pcr_value(BANKS[bank], pcr):
                    continue
                if pcr in FIRMWARE_PCRS:
                    collector.fail(
                        Check.EVENT_LOG,
                        Reason.EVENTLOG_PCR_MISMATCH,
                        f"PCR {pcr} ({bank}) is {actual.hex()} but the event log has no event for "
                        "it: firmware logs every PCR 0-7 measurement, so the log is incomplete",
                        pcr,
                        bank,
                    )
                else:
                    collector.skip(
                        Check.EVENT_LOG,
                        Reason.PCR_UNEXPLAINED,
                        f"PCR {pcr} ({bank}) is {actual.hex()} but neither the event log nor the "
                        "IMA list measures it: nothing vouches for its value",
                        pcr,
                        bank,
                    )
                continue
            if len(actual) != size or not hmac.compare_digest(actual, expected):
                collector.fail(
                    Check.EVENT_LOG,
                    Reason.EVENTLOG_PCR_MISMATCH,
                    f"PCR {pcr} ({bank}) is {actual.hex()} but the event log replays to "
                    f"{expected.hex()}",
                    pcr,
                    bank,
                )
    if common:
        quoted_anywhere = {pcr for bank in common for pcr in quoted[bank]}
        for pcr in measured:
            if pcr not in quoted_anywhere:
                collector.skip(
                    Check.EVENT_LOG,
                    Reason.EVENTLOG_PCR_NOT_QUOTED,
                    f"the event log measures PCR {pcr} but the quote does not cover it: its "
                    "events are not attested",
                    pcr,
                )
    return log


# --- IMA ----------------------------------------------------------------------------------------


def _parse_ima(evidence: Evidence, collector: _Collector) -> ima.ImaLog | None:
    if evidence.ima_log is None:
        collector.skip(
            Check.IMA, Reason.IMA_NOT_CHECKED, "IMA not checked: the evidence carries no IMA list"
        )
        return None
    collector.ran.add(Check.IMA)
    try:
        # Template hashes are checked apart, entry by entry, so that a bad entry is reported as
        # such and the replay still runs.
        log = ima.parse_ima_binary(
            evidence.ima_log, first_index=evidence.ima_start_index, verify_template_hashes=False
        )
    except ImaLogError as error:
        collector.fail(Check.IMA, Reason.IMA_MALFORMED, f"IMA list: {error}")
        return None
    _check_template_hashes(log, collector)
    return log


def _check_ima(
    log: ima.ImaLog | None,
    start: int,
    quoted: PcrValues,
    attest: Attest | None,
    progress: ImaProgress | None,
    collector: _Collector,
) -> ImaProgress | None:
    if log is None:
        return None
    pcrs = sorted(log.pcrs | {ima.IMA_DEFAULT_PCR})
    keys = [(bank, pcr) for bank in sorted(quoted) for pcr in pcrs if pcr in quoted[bank]]
    for pcr in pcrs:
        if not any(key[1] == pcr for key in keys):
            collector.skip(
                Check.IMA,
                Reason.IMA_NOT_CHECKED,
                f"the IMA list measures into PCR {pcr} but the quote does not cover it",
                pcr,
            )
    if not keys:
        collector.ran.discard(Check.IMA)
        return None
    reset_count = attest.clock_info.reset_count if attest is not None else None
    starting, first_index = _ima_start(start, log, progress, reset_count, keys, collector)
    if starting is None:
        return None
    entries = [entry for entry in log.entries if entry.index >= first_index]
    try:
        matched = _ima_prefix(entries, first_index, starting, quoted, keys, legacy=False)
        if matched is None and any(bank != "sha1" for bank, _ in keys):
            matched = _ima_prefix(entries, first_index, starting, quoted, keys, legacy=True)
            if matched is not None:
                collector.notes.append(
                    "IMA: non-SHA-1 banks replay as the SHA-1 template hash zero-padded (a "
                    "kernel before 5.8, or a bank the kernel cannot hash)"
                )
    except ImaLogError as error:
        collector.fail(Check.IMA, Reason.IMA_MALFORMED, f"IMA replay: {error}")
        return None
    if matched is None:
        final = _ima_fold(entries, starting, keys, legacy=False)
        span = (
            f"entries {first_index}-{first_index + len(entries) - 1}" if entries else "no entries"
        )
        for bank, pcr in keys:
            actual = quoted[bank][pcr]
            if final[(bank, pcr)] != actual:
                collector.fail(
                    Check.IMA,
                    Reason.IMA_PCR_MISMATCH,
                    f"PCR {pcr} ({bank}) is {actual.hex()} but the IMA list ({span}) replays "
                    f"to {final[(bank, pcr)].hex()}, and no prefix of it to the quoted value",
                    pcr,
                    bank,
                )
        return None
    count, values = matched
    newer = len(entries) - count
    if newer:
        collector.notes.append(
            f"IMA: {newer} entries are newer than the quote; the next quote covers them"
        )
    if reset_count is None:
        return None
    by_bank: dict[str, dict[int, bytes]] = {}
    for (bank, pcr), value in values.items():
        by_bank.setdefault(bank, {})[pcr] = value
    return ImaProgress(reset_count, first_index + count, by_bank)


def _check_template_hashes(log: ima.ImaLog, collector: _Collector) -> None:
    bad: list[str] = []
    for entry in log.entries:
        if entry.violation:
            continue
        computed = entry.template_digest(entry.template_hash_bank)
        if not hmac.compare_digest(computed, entry.template_hash):
            bad.append(
                f"entry {entry.index} ({entry.file_name or entry.template_name}): listed "
                f"{entry.template_hash.hex()}, data hashes to {computed.hex()}"
            )
    if bad:
        more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        collector.fail(
            Check.IMA,
            Reason.IMA_TEMPLATE_HASH_MISMATCH,
            f"{len(bad)} IMA entries do not hash to their template hash: "
            + "; ".join(bad[:MAX_LISTED])
            + more,
        )


def _ima_start(
    start: int,
    log: ima.ImaLog,
    progress: ImaProgress | None,
    reset_count: int | None,
    keys: Sequence[tuple[str, int]],
    collector: _Collector,
) -> tuple[dict[tuple[str, int], bytes] | None, int]:
    """The PCR values to replay from, and the first entry to replay."""
    if start == 0:
        return {(bank, pcr): initial_pcr_value(BANKS[bank], pcr) for bank, pcr in keys}, 0
    end = start + len(log.entries)
    if progress is None or reset_count is None or progress.reset_count != reset_count:
        collector.fail(
            Check.IMA,
            Reason.IMA_START_UNKNOWN,
            f"the IMA list starts at entry {start} but the verifier holds no replay state for "
            "this AK in this boot: the node must send its list from entry 0",
        )
        return None, start
    if not start <= progress.next_index <= end:
        collector.fail(
            Check.IMA,
            Reason.IMA_START_UNKNOWN,
            f"the IMA list covers entries {start}-{end - 1} but the verifier has replayed up to "
            f"entry {progress.next_index - 1}: the node must send entries from "
            f"{progress.next_index}",
        )
        return None, start
    missing = [key for key in keys if key[1] not in progress.pcrs.get(key[0], {})]
    if missing:
        bank, pcr = missing[0]
        collector.fail(
            Check.IMA,
            Reason.IMA_START_UNKNOWN,
            f"the verifier's IMA replay state has no PCR {pcr} ({bank}) value: the node must "
            "send its list from entry 0",
            pcr,
            bank,
        )
        return None, start
    return {(bank, pcr): progress.pcrs[bank][pcr] for bank, pcr in keys}, progress.next_index


def _ima_fold(
    entries: Sequence[ima.ImaEntry],
    starting: Mapping[tuple[str, int], bytes],
    keys: Sequence[tuple[str, int]],
    *,
    legacy: bool,
) -> dict[tuple[str, int], bytes]:
    values = dict(starting)
    banks_of = _banks_by_pcr(keys)
    for entry in entries:
        for bank in banks_of.get(entry.pcr, ()):
            values[(bank, entry.pcr)] = _extend(entry, bank, values[(bank, entry.pcr)], legacy)
    return values


def _ima_prefix(
    entries: Sequence[ima.ImaEntry],
    first_index: int,
    starting: Mapping[tuple[str, int], bytes],
    quoted: PcrValues,
    keys: Sequence[tuple[str, int]],
    *,
    legacy: bool,
) -> tuple[int, dict[tuple[str, int], bytes]] | None:
    """The longest prefix of ``entries`` after which every quoted IMA PCR holds its quoted
    value, with those values; None if there is none.

    A prefix, not the whole list: the node reads the list after the quote, and the kernel may
    have appended measurements in between.
    """
    values = dict(starting)
    banks_of = _banks_by_pcr(keys)
    differing = {key for key in keys if values[key] != quoted[key[0]][key[1]]}
    best: tuple[int, dict[tuple[str, int], bytes]] | None = None
    if not differing:
        best = (0, dict(values))
    for position, entry in enumerate(entries, 1):
        if entry.index != first_index + position - 1:
            raise ImaLogError(f"entry {entry.index}: expected entry {first_index + position - 1}")
        for bank in banks_of.get(entry.pcr, ()):
            key = (bank, entry.pcr)
            values[key] = _extend(entry, bank, values[key], legacy)
            if values[key] == quoted[bank][entry.pcr]:
                differing.discard(key)
            else:
                differing.add(key)
        if not differing:
            best = (position, dict(values))
    return best


def _banks_by_pcr(keys: Sequence[tuple[str, int]]) -> dict[int, list[str]]:
    result: dict[int, list[str]] = {}
    for bank, pcr in keys:
        result.setdefault(pcr, []).append(bank)
    return result


def _extend(entry: ima.ImaEntry, bank: str, value: bytes, legacy: bool) -> bytes:
    return ima.replay(
        (entry,),
        bank,
        pcr=entry.pcr,
        start_index=entry.index,
        starting_pcr=value,
        legacy_padded_sha1=legacy,
    )


# --- policy -------------------------------------------------------------------------------------


def _check_policy(
    policy: Policy | None, quoted: PcrValues, log: EventLog | None, collector: _Collector
) -> None:
    if policy is None:
        collector.skip(Check.POLICY, Reason.POLICY_NOT_CHECKED, "no policy given")
        return
    collector.ran.add(Check.POLICY)
    # (bank, PCR) pairs the policy needs and the quote lacks: reported once here, not again
    # as the mismatches with start values that evaluate() would find for them.
    not_quoted: set[tuple[str, int]] = set()
    for bank, golden in sorted(policy.golden_pcrs.items()):
        for pcr in sorted(golden):
            if pcr not in quoted.get(bank, {}):
                not_quoted.add((bank, pcr))
                collector.fail(
                    Check.POLICY,
                    Reason.POLICY_PCR_NOT_QUOTED,
                    f"the policy has a golden value for PCR {pcr} ({bank}) but the quote does not "
                    "cover it",
                    pcr,
                    bank,
                )
    banks = sorted(quoted)
    for pcr in sorted(policy.reference_events):
        if all(pcr not in quoted[bank] for bank in banks):
            not_quoted.update((bank, pcr) for bank in BANKS)
            collector.fail(
                Check.POLICY,
                Reason.POLICY_PCR_NOT_QUOTED,
                f"the policy has reference events for PCR {pcr} but the quote does not cover it",
                pcr,
            )
    if log is None:
        collector.fail(
            Check.POLICY,
            Reason.POLICY_NOT_EVALUATED,
            "the policy could not be evaluated: the event log did not parse",
        )
        return
    for finding in evaluate(policy, quoted, log):
        if finding.kind == "log-error":
            continue  # the event_log check already reports every error finding of the log
        if finding.bank is not None and (finding.bank, finding.pcr) in not_quoted:
            continue
        collector.fail(
            Check.POLICY,
            "policy_" + finding.kind.replace("-", "_"),
            finding.reason,
            finding.pcr,
            finding.bank,
        )


# --- verifier state -----------------------------------------------------------------------------

STATE_VERSION: Final = 1
MAX_STATE_BYTES: Final = 16 * 1024 * 1024
_HEX_NAME: Final = re.compile(r"(?:[0-9a-f]{2}){3,66}")


@dataclass
class _AkRecord:
    clock: ClockState
    ima: ImaProgress | None
    updated_at: float


class VerifierState:
    """Per-AK memory of the verifier: the last accepted quote's clock and the IMA replay point.

    Stored as JSON (``--state FILE``)::

        {"version": 1, "aks": {"<AK Name hex>": {
            "clock": 1234, "reset_count": 3, "restart_count": 0, "updated_at": 1700000000.0,
            "ima": {"reset_count": 3, "next_index": 1520, "pcrs": {"sha256": {"10": "<hex>"}}}}}}

    Use :func:`open_state` to read, update and write it under a lock.
    """

    def __init__(self, records: dict[bytes, _AkRecord] | None = None) -> None:
        self._records = records or {}
        self.changed = False

    def clock_state(self, ak_name: bytes | None) -> ClockState | None:
        record = self._records.get(ak_name) if ak_name is not None else None
        return record.clock if record is not None else None

    def ima_progress(self, ak_name: bytes | None) -> ImaProgress | None:
        record = self._records.get(ak_name) if ak_name is not None else None
        return record.ima if record is not None else None

    def record(self, report: VerificationReport) -> bool:
        """Keep the report's clock and IMA state if every check passed; True if kept."""
        if not report.ok or report.clock_state is None:
            return False
        name = report.clock_state.ak_name
        ima_state = report.ima_progress
        if ima_state is None:
            kept = self._records.get(name)
            # An evidence without IMA keeps the replay point of the same boot.
            if (
                kept is not None
                and kept.ima is not None
                and kept.ima.reset_count == report.clock_state.reset_count
            ):
                ima_state = kept.ima
        self._records[name] = _AkRecord(report.clock_state, ima_state, time.time())
        self.changed = True
        return True

    def to_dict(self) -> dict[str, object]:
        aks: dict[str, object] = {}
        for name, record in sorted(self._records.items()):
            entry: dict[str, object] = {
                "clock": record.clock.clock,
                "reset_count": record.clock.reset_count,
                "restart_count": record.clock.restart_count,
                "updated_at": record.updated_at,
            }
            if record.ima is not None:
                entry["ima"] = {
                    "reset_count": record.ima.reset_count,
                    "next_index": record.ima.next_index,
                    "pcrs": {
                        bank: {str(pcr): value.hex() for pcr, value in sorted(values.items())}
                        for bank, values in sorted(record.ima.pcrs.items())
                    },
                }
            aks[name.hex()] = entry
        return {"version": STATE_VERSION, "aks": aks}

    @classmethod
    def from_json(cls, text: bytes, source: str) -> VerifierState:
        def fail(where: str, what: str) -> AttestationError:
            return AttestationError(f"verifier state {source}: {where}: {what}")

        if len(text) > MAX_STATE_BYTES:
            raise fail("file", f"over the {MAX_STATE_BYTES}-byte limit")
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise fail("file", f"not valid JSON ({error})") from None
        if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
            raise fail("version", f"expected a JSON object with version {STATE_VERSION}")
        aks = document.get("aks")
        if not isinstance(aks, dict):
            raise fail("aks", "must be an object of AK Name -> state")
        records: dict[bytes, _AkRecord] = {}
        for name_hex, entry in aks.items():
            where = f"aks.{name_hex[:16]}"
            if not _HEX_NAME.fullmatch(name_hex) or not isinstance(entry, dict):
                raise fail(where, "must be a hex AK Name mapped to an object")
            name = bytes.fromhex(name_hex)
            numbers = [entry.get(key) for key in ("clock", "reset_count", "restart_count")]
            if not all(type(n) is int and n >= 0 for n in numbers):
                raise fail(where, "clock, reset_count and restart_count must be integers >= 0")
            clock, reset_count, restart_count = (int(n) for n in numbers)  # type: ignore[arg-type]
            updated_at = entry.get("updated_at", 0.0)
            if not isinstance(updated_at, int | float):
                raise fail(f"{where}.updated_at", "must be a number")
            progress = None
            if entry.get("ima") is not None:
                progress = _progress_from_dict(entry["ima"], f"{where}.ima", fail)
            records[name] = _AkRecord(
                ClockState(name, clock, reset_count, restart_count), progress, float(updated_at)
            )
        return cls(records)


def _progress_from_dict(
    document: object, where: str, error: Callable[[str, str], AttestationError]
) -> ImaProgress:
    def fail(what: str) -> AttestationError:
        return error(where, what)

    if not isinstance(document, dict):
        raise fail("must be an object")
    reset_count, next_index = document.get("reset_count"), document.get("next_index")
    if type(reset_count) is not int or type(next_index) is not int:
        raise fail("reset_count and next_index must be integers")
    if reset_count < 0 or next_index < 0:
        raise fail("reset_count and next_index must not be negative")
    pcrs = document.get("pcrs")
    if not isinstance(pcrs, dict):
        raise fail("pcrs must be an object of bank -> PCR -> hex")
    values: dict[str, dict[int, bytes]] = {}
    for bank, by_pcr in pcrs.items():
        if bank not in BANKS or not isinstance(by_pcr, dict):
            raise fail(f"pcrs.{bank[:16]}: unknown bank or not an object")
        size = BANKS[bank].digest_size
        values[bank] = {}
        for pcr, value in by_pcr.items():
            if not pcr.isdigit() or int(pcr) > 23:
                raise fail(f"pcrs.{bank}.{pcr[:8]}: not a PCR number")
            if not isinstance(value, str) or not re.fullmatch(f"[0-9a-f]{{{2 * size}}}", value):
                raise fail(f"pcrs.{bank}.{pcr}: not a {bank} value")
            values[bank][int(pcr)] = bytes.fromhex(value)
    return ImaProgress(reset_count, next_index, values)


def load_state(path: str | Path) -> VerifierState:
    """Read a state file; a missing file is an empty state."""
    try:
        with Path(path).open("rb") as stream:
            text = stream.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return VerifierState()
    except OSError as error:
        raise AttestationError(
            f"cannot read verifier state {path}: {error.strerror or error}"
        ) from error
    return VerifierState.from_json(text, str(path))


def save_state(state: VerifierState, path: str | Path) -> None:
    """Write atomically (temporary file, fsync, rename), mode 0600."""
    target = Path(path)
    text = json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n"
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(descriptor, "w") as stream:
                stream.write(text)
                stream.flush()
                os.fsync(stream.fileno())
            Path(temporary).replace(target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as error:
        raise AttestationError(
            f"cannot write verifier state {path}: {error.strerror or error}"
        ) from error


@contextlib.contextmanager
def open_state(path: str | Path) -> Iterator[VerifierState]:
    """Load the state under an exclusive lock (``FILE.lock``) and save it on exit if changed,
    so concurrent verifications of the same AK cannot both accept one replayed quote."""
    lock_path = Path(f"{path}.lock")
    try:
        lock = lock_path.open("a")
    except OSError as error:
        raise AttestationError(
            f"cannot open the verifier state lock {lock_path}: {error.strerror or error}"
        ) from error
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        state = load_state(path)
        yield state
        if state.changed:
            save_state(state, path)
