"""Verify an evidence document: the quote, then the logs and the policy against the quoted PCRs.

:func:`verify_evidence` runs every check whatever the earlier ones found and reports each
failure with its own reason code, so an operator sees everything wrong with a node at once:

1. ``quote`` (:func:`agent.attest.tpm.checks.verify_quote`): AK attributes, signature, magic, type,
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
IMA list (:class:`~agent.attest.verify.state.VerifierState`, a small JSON file for the CLI's
``--state``). The report model is in ``report.py``, the IMA replay in ``ima_replay.py``.
A controller calls :func:`verify_evidence` for every node every interval with the same
firmware log, so parsed logs are kept between calls by the SHA-256 of their bytes
(:data:`EVENT_LOG_CACHE_ENTRIES`).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Final

from agent.attest.evidence import Evidence
from agent.attest.logs import ima
from agent.attest.logs.eventlog import FIRMWARE_PCRS, EventLog, parse_event_log
from agent.attest.policy import Policy, evaluate
from agent.attest.tpm.algorithms import BANKS, bank_name, initial_pcr_value
from agent.attest.tpm.checks import ClockState, verify_quote
from agent.attest.tpm.checks import Reason as QuoteReason
from agent.attest.tpm.wire import Attest, compute_name, decode_attest, normalise_selection
from agent.attest.verify.ima_replay import check_ima, parse_ima
from agent.attest.verify.report import (
    Check,
    Collector,
    ImaProgress,
    PcrValues,
    Reason,
    VerificationReport,
)
from agent.errors import AttestationError, EventLogError, QuoteError

# A controller verifies every node's evidence each interval, and a node's firmware log does not
# change within a boot: parsed logs are kept by their SHA-256, up to this many (a parsed log of
# 100 events is about 100 KiB; least recently used first out).
EVENT_LOG_CACHE_ENTRIES: Final = 1024

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
    collector = Collector()
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
    ima_log = parse_ima(evidence, collector)
    event_log = _check_event_log(evidence, quoted, ima_log, collector)
    progress = check_ima(ima_log, evidence.ima_start_index, quoted, attest, ima_progress, collector)
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


def _check_ak_identity(ak_name: bytes | None, enrolled: bytes | None, collector: Collector) -> None:
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


class _EventLogCache:
    """Parsed event logs by the SHA-256 of their bytes, least recently used out first.

    Parsing is deterministic and an :class:`EventLog` is immutable (its replay is computed
    once), so a hit is the same answer as a parse. Errors are not kept: a malformed log is
    parsed, and refused, every time. The lock lets verifications run in executor threads.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._logs: OrderedDict[bytes, EventLog] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, data: bytes) -> EventLog:
        key = hashlib.sha256(data).digest()
        with self._lock:
            log = self._logs.get(key)
            if log is not None:
                self._logs.move_to_end(key)
                return log
        log = parse_event_log(data)
        with self._lock:
            self._logs[key] = log
            while len(self._logs) > self._capacity:
                self._logs.popitem(last=False)
        return log


_parsed_event_log = _EventLogCache(EVENT_LOG_CACHE_ENTRIES).get


def _check_event_log(
    evidence: Evidence, quoted: PcrValues, ima_log: ima.ImaLog | None, collector: Collector
) -> EventLog | None:
    collector.ran.add(Check.EVENT_LOG)
    try:
        log = _parsed_event_log(evidence.event_log)
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
                # Firmware logs every measurement of PCRs 0-7 (PFP 3.3.4), so a changed one
                # without an event means the log is incomplete; the OS also extends higher PCRs
                # (systemd-stub, IMA) outside the firmware log.
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


# --- policy -------------------------------------------------------------------------------------


def _check_policy(
    policy: Policy | None, quoted: PcrValues, log: EventLog | None, collector: Collector
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
