"""Boot policy: golden PCR values and per-event reference digests, and their evaluation.

Two kinds of rule, usable together:

* golden PCRs, bank -> PCR -> value: the replayed (quoted) PCR must equal it. Brittle (any
  firmware setting change breaks it) but simple.
* reference events, PCR -> event type -> bank -> allowed digests: every event the log extends
  into a covered PCR must have an allowed type and, in each bank the rule lists, an allowed
  digest. Generated from known-good logs with :func:`make_policy`, this admits any of the known
  boot loaders, kernels and Secure Boot variable contents without pinning their order.

A policy is operator input: :meth:`Policy.from_dict` validates every key and raises
:class:`PolicyError` naming the offending one.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from agent.attest.logs.describe import EV_SEPARATOR, event_type_from_name, event_type_name
from agent.attest.logs.eventlog import EventLog
from agent.attest.reader import read_bounded
from agent.attest.tpm.algorithms import BANKS, PCR_COUNT, initial_pcr_value
from agent.errors import PolicyError

POLICY_VERSION: Final = 1
MAX_POLICY_BYTES: Final = 16 * 1024 * 1024
MAX_REFERENCE_DIGESTS: Final = 100_000
# PFP 10.4.4: firmware measures EV_SEPARATOR into PCRs 0-7 when handing over to the OS; without
# it, measurements made after hand-over could pass for pre-OS ones.
SEPARATOR_PCRS: Final = frozenset(range(8))

_TOP_LEVEL_KEYS: Final = frozenset(
    {"version", "description", "golden_pcrs", "reference_events", "separator_pcrs"}
)
# bytes.fromhex skips whitespace, which would let a short digest through the length check.
_HEX: Final = re.compile(r"[0-9a-fA-F]*")


@dataclass(frozen=True)
class PolicyFinding:
    """One way the evidence fails the policy; ``reason`` is a complete sentence for operators."""

    kind: str
    reason: str
    pcr: int | None = None
    bank: str | None = None
    event_index: int | None = None
    event_type: str | None = None
    digest: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "reason": self.reason,
            "pcr": self.pcr,
            "bank": self.bank,
            "event_index": self.event_index,
            "event_type": self.event_type,
            "digest": self.digest,
        }


@dataclass(frozen=True)
class Policy:
    # bank -> PCR -> value
    golden_pcrs: Mapping[str, Mapping[int, bytes]] = field(default_factory=dict)
    # PCR -> event type name -> bank -> allowed digests
    reference_events: Mapping[int, Mapping[str, Mapping[str, frozenset[bytes]]]] = field(
        default_factory=dict
    )
    description: str = ""
    # PCRs whose events must include an EV_SEPARATOR (see SEPARATOR_PCRS).
    separator_pcrs: frozenset[int] = frozenset()

    def to_dict(self) -> dict[str, object]:
        return {
            "version": POLICY_VERSION,
            "description": self.description,
            "separator_pcrs": sorted(self.separator_pcrs),
            "golden_pcrs": {
                bank: {str(pcr): value.hex() for pcr, value in sorted(values.items())}
                for bank, values in sorted(self.golden_pcrs.items())
            },
            "reference_events": {
                str(pcr): {
                    type_name: {
                        bank: sorted(digest.hex() for digest in digests)
                        for bank, digests in sorted(by_bank.items())
                    }
                    for type_name, by_bank in sorted(by_type.items())
                }
                for pcr, by_type in sorted(self.reference_events.items())
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Policy:
        if len(text) > MAX_POLICY_BYTES:
            raise PolicyError(f"policy is {len(text)} bytes, over the {MAX_POLICY_BYTES} limit")
        try:
            document = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
        except PolicyError:
            raise
        except (ValueError, RecursionError) as error:
            raise PolicyError(f"policy is not valid JSON: {error}") from None
        return cls.from_dict(document)

    @classmethod
    def from_dict(cls, document: object) -> Policy:
        if not isinstance(document, dict):
            raise PolicyError("policy: must be a JSON object")
        unknown = sorted(str(key) for key in document if key not in _TOP_LEVEL_KEYS)
        if unknown:
            raise PolicyError(
                f"{unknown[0]}: unknown key; a policy has {', '.join(sorted(_TOP_LEVEL_KEYS))}"
            )
        if "version" not in document:
            raise PolicyError("version: required")
        version = document["version"]
        if isinstance(version, bool) or version != POLICY_VERSION:
            raise PolicyError(f"version: {version!r} is not supported, expected {POLICY_VERSION}")
        description = document.get("description", "")
        if not isinstance(description, str):
            raise PolicyError("description: must be a string")
        golden = _parse_golden(document.get("golden_pcrs", {}))
        reference = _parse_reference(document.get("reference_events", {}))
        if not golden and not reference:
            raise PolicyError("golden_pcrs: a policy needs golden PCRs or reference events")
        if "separator_pcrs" in document:
            separators = _parse_separator_pcrs(document["separator_pcrs"])
        else:
            # Absent means the safe default: every covered PCR that firmware separates.
            separators = SEPARATOR_PCRS & frozenset(reference)
        return cls(golden, reference, description, separators)


def load_policy(path: str | Path) -> Policy:
    return Policy.from_json(read_bounded(path, MAX_POLICY_BYTES, "policy", PolicyError))


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise PolicyError(f"{key}: duplicate key")
        result[key] = value
    return result


def _parse_pcr(key: object, path: str) -> int:
    if (
        not isinstance(key, str)
        or not (key.isascii() and key.isdigit())
        or len(key) > 2
        or int(key) >= PCR_COUNT
    ):
        raise PolicyError(f"{path}.{key}: PCR must be a decimal number 0-{PCR_COUNT - 1}")
    return int(key)


def _parse_bank(key: object, path: str) -> str:
    if not isinstance(key, str) or key not in BANKS:
        raise PolicyError(f"{path}.{key}: unknown bank; known: {', '.join(BANKS)}")
    return key


def _parse_digest(value: object, bank: str, path: str) -> bytes:
    size = BANKS[bank].digest_size
    if not isinstance(value, str) or len(value) != 2 * size or not _HEX.fullmatch(value):
        raise PolicyError(f"{path}: must be a {bank} digest, {2 * size} hex characters")
    return bytes.fromhex(value)


def _parse_separator_pcrs(section: object) -> frozenset[int]:
    if not isinstance(section, list):
        raise PolicyError("separator_pcrs: must be a list of PCR numbers")
    pcrs: set[int] = set()
    for position, pcr in enumerate(section):
        if isinstance(pcr, bool) or not isinstance(pcr, int) or pcr not in SEPARATOR_PCRS:
            raise PolicyError(f"separator_pcrs[{position}]: must be a PCR number 0-7")
        pcrs.add(pcr)
    return frozenset(pcrs)


def _parse_golden(section: object) -> dict[str, dict[int, bytes]]:
    if not isinstance(section, dict):
        raise PolicyError("golden_pcrs: must be an object of bank -> PCR -> hex digest")
    golden: dict[str, dict[int, bytes]] = {}
    for bank_key, values in section.items():
        bank = _parse_bank(bank_key, "golden_pcrs")
        path = f"golden_pcrs.{bank}"
        if not isinstance(values, dict):
            raise PolicyError(f"{path}: must be an object of PCR -> hex digest")
        golden[bank] = {
            _parse_pcr(pcr_key, path): _parse_digest(value, bank, f"{path}.{pcr_key}")
            for pcr_key, value in values.items()
        }
    return golden


def _parse_reference(section: object) -> dict[int, dict[str, dict[str, frozenset[bytes]]]]:
    if not isinstance(section, dict):
        raise PolicyError(
            "reference_events: must be an object of PCR -> event type -> bank -> [hex digests]"
        )
    reference: dict[int, dict[str, dict[str, frozenset[bytes]]]] = {}
    total = 0
    for pcr_key, by_type in section.items():
        pcr = _parse_pcr(pcr_key, "reference_events")
        pcr_path = f"reference_events.{pcr}"
        if not isinstance(by_type, dict):
            raise PolicyError(f"{pcr_path}: must be an object of event type -> bank -> digests")
        types: dict[str, dict[str, frozenset[bytes]]] = {}
        for type_key, by_bank in by_type.items():
            event_type = event_type_from_name(type_key) if isinstance(type_key, str) else None
            if event_type is None:
                raise PolicyError(
                    f"{pcr_path}.{type_key}: not an event type name (EV_...) or 0xXXXXXXXX"
                )
            type_name = event_type_name(event_type)
            type_path = f"{pcr_path}.{type_key}"
            if not isinstance(by_bank, dict):
                raise PolicyError(f"{type_path}: must be an object of bank -> [hex digests]")
            banks: dict[str, frozenset[bytes]] = {}
            for bank_key, digests in by_bank.items():
                bank = _parse_bank(bank_key, type_path)
                bank_path = f"{type_path}.{bank}"
                if not isinstance(digests, list):
                    raise PolicyError(f"{bank_path}: must be a list of hex digests")
                total += len(digests)
                if total > MAX_REFERENCE_DIGESTS:
                    raise PolicyError(
                        f"{bank_path}: more than {MAX_REFERENCE_DIGESTS} reference digests"
                    )
                banks[bank] = frozenset(
                    _parse_digest(value, bank, f"{bank_path}[{position}]")
                    for position, value in enumerate(digests)
                )
            if type_name in types:
                raise PolicyError(f"{type_path}: event type listed twice")
            types[type_name] = banks
        reference[pcr] = types
    return reference


def make_policy(
    event_log: EventLog,
    *,
    pcrs: Iterable[int] | None = None,
    banks: Iterable[str] | None = None,
    golden: bool = True,
    reference_events: bool = True,
    description: str = "",
) -> Policy:
    """A policy that the given known-good log passes.

    ``pcrs`` and ``banks`` default to everything the log measures and can replay. The PCRs
    in which the log has an EV_SEPARATOR must have one in every log the policy passes.
    """
    replayed = event_log.replay()
    bank_names = list(replayed) if banks is None else [b for b in banks if b in replayed]
    selected = (
        {event.pcr for event in event_log.events if event.extends} if pcrs is None else set(pcrs)
    )
    golden_pcrs: dict[str, dict[int, bytes]] = {}
    if golden:
        for bank in bank_names:
            golden_pcrs[bank] = {
                pcr: value for pcr, value in replayed[bank].items() if pcr in selected
            }
    reference: dict[int, dict[str, dict[str, set[bytes]]]] = {}
    if reference_events:
        for event in event_log.events:
            if not event.extends or event.pcr not in selected:
                continue
            by_bank = reference.setdefault(event.pcr, {}).setdefault(event.type_name, {})
            for bank in bank_names:
                by_bank.setdefault(bank, set()).add(event.digests[bank])
    separators = frozenset(
        event.pcr
        for event in event_log.events
        if event.event_type == EV_SEPARATOR and event.pcr in SEPARATOR_PCRS & selected
    )
    if not reference_events:
        separators = frozenset()
    return Policy(
        golden_pcrs,
        {
            pcr: {
                name: {bank: frozenset(digests) for bank, digests in by_bank.items()}
                for name, by_bank in by_type.items()
            }
            for pcr, by_type in reference.items()
        },
        description,
        separators,
    )


def evaluate(
    policy: Policy,
    replayed_pcrs: Mapping[str, Mapping[int, bytes]],
    event_log: EventLog,
) -> list[PolicyFinding]:
    """Every way the evidence fails the policy; an empty list means it passes.

    ``replayed_pcrs`` are the PCR values the verifier trusts (the quoted ones, or the log's
    replay once checked against the quote); PCRs absent from it hold their start value.
    """
    findings: list[PolicyFinding] = []
    for log_finding in event_log.findings:
        if log_finding.severity == "error":
            findings.append(
                PolicyFinding(
                    "log-error",
                    f"event log: {log_finding.message}",
                    pcr=log_finding.pcr,
                    event_index=log_finding.event_index,
                )
            )
    findings.extend(_check_golden(policy, replayed_pcrs))
    if policy.reference_events:
        findings.extend(_check_log_matches_pcrs(policy, replayed_pcrs, event_log))
        findings.extend(_reference_findings(policy, event_log))
    return findings


# The reference-event verdict depends only on the policy and the log, both immutable: a
# controller judging the same boot every interval (its event logs are cached by digest in
# agent/attest/verify/engine.py) computes it once per log and policy object.
# Keyed by the objects' ids, each checked by identity (weakly: a log is not kept alive here).
_REFERENCE_VERDICTS: OrderedDict[
    tuple[int, int], tuple[weakref.ref[EventLog], Policy, list[PolicyFinding]]
] = OrderedDict()
_REFERENCE_VERDICTS_MAX: Final = 1024
_REFERENCE_LOCK = threading.Lock()


def _reference_findings(policy: Policy, event_log: EventLog) -> list[PolicyFinding]:
    key = (id(policy), id(event_log))
    with _REFERENCE_LOCK:
        kept = _REFERENCE_VERDICTS.get(key)
        if kept is not None and kept[0]() is event_log and kept[1] is policy:
            _REFERENCE_VERDICTS.move_to_end(key)
            return list(kept[2])
    findings = _check_reference_events(policy, event_log)
    with _REFERENCE_LOCK:
        _REFERENCE_VERDICTS[key] = (weakref.ref(event_log), policy, findings)
        while len(_REFERENCE_VERDICTS) > _REFERENCE_VERDICTS_MAX:
            _REFERENCE_VERDICTS.popitem(last=False)
    return list(findings)


def _pcr_value(values: Mapping[str, Mapping[int, bytes]], bank: str, pcr: int) -> bytes:
    value = values.get(bank, {}).get(pcr)
    return initial_pcr_value(BANKS[bank], pcr) if value is None else value


def _check_golden(
    policy: Policy, replayed_pcrs: Mapping[str, Mapping[int, bytes]]
) -> list[PolicyFinding]:
    findings: list[PolicyFinding] = []
    for bank, golden in sorted(policy.golden_pcrs.items()):
        if bank not in replayed_pcrs:
            findings.append(
                PolicyFinding(
                    "bank-missing",
                    f"no {bank} PCR values to compare with the golden values",
                    bank=bank,
                )
            )
            continue
        for pcr, expected in sorted(golden.items()):
            actual = _pcr_value(replayed_pcrs, bank, pcr)
            if actual != expected:
                findings.append(
                    PolicyFinding(
                        "pcr-mismatch",
                        f"PCR {pcr} ({bank}) is {actual.hex()}, the policy expects "
                        f"{expected.hex()}",
                        pcr=pcr,
                        bank=bank,
                        digest=actual.hex(),
                    )
                )
    return findings


def _check_log_matches_pcrs(
    policy: Policy, replayed_pcrs: Mapping[str, Mapping[int, bytes]], event_log: EventLog
) -> list[PolicyFinding]:
    """Event rules judge the log, so the log must be the one that produced the PCRs."""
    log_pcrs = event_log.replay()
    common = sorted(set(log_pcrs) & set(replayed_pcrs))
    if not common:
        return [
            PolicyFinding(
                "no-common-bank",
                f"the event log replays {sorted(log_pcrs)} but the PCR values are for "
                f"{sorted(replayed_pcrs)}: the log cannot be matched to them",
            )
        ]
    findings: list[PolicyFinding] = []
    for bank in common:
        for pcr in sorted(policy.reference_events):
            from_log = _pcr_value(log_pcrs, bank, pcr)
            actual = _pcr_value(replayed_pcrs, bank, pcr)
            if from_log != actual:
                findings.append(
                    PolicyFinding(
                        "log-replay-mismatch",
                        f"PCR {pcr} ({bank}) is {actual.hex()} but the event log replays to "
                        f"{from_log.hex()}: the log does not describe this boot",
                        pcr=pcr,
                        bank=bank,
                        digest=from_log.hex(),
                    )
                )
    return findings


def _check_reference_events(policy: Policy, event_log: EventLog) -> list[PolicyFinding]:
    findings: list[PolicyFinding] = []
    separators: set[int] = set()
    for event in event_log.events:
        rules = policy.reference_events.get(event.pcr)
        if rules is None or not event.extends:
            continue
        if event.event_type == EV_SEPARATOR:
            separators.add(event.pcr)
        where = f"PCR {event.pcr} event {event.index} ({event.type_name})"
        allowed_by_bank = rules.get(event.type_name)
        if allowed_by_bank is None:
            bank, digest = next(iter(sorted(event.digests.items())), ("", b""))
            findings.append(
                PolicyFinding(
                    "event-type-not-allowed",
                    f"{where}: the policy allows no {event.type_name} events in PCR {event.pcr}"
                    + (f" ({bank} digest {digest.hex()})" if bank else ""),
                    pcr=event.pcr,
                    bank=bank or None,
                    event_index=event.index,
                    event_type=event.type_name,
                    digest=digest.hex() if bank else None,
                )
            )
            continue
        constrained = [bank for bank in event.digests if bank in allowed_by_bank]
        if not constrained:
            findings.append(
                PolicyFinding(
                    "event-unconstrained",
                    f"{where}: the event has {sorted(event.digests)} digests, the policy lists "
                    f"{sorted(allowed_by_bank)}: nothing to compare",
                    pcr=event.pcr,
                    event_index=event.index,
                    event_type=event.type_name,
                )
            )
        for bank in constrained:
            digest = event.digests[bank]
            if digest not in allowed_by_bank[bank]:
                findings.append(
                    PolicyFinding(
                        "event-digest-not-allowed",
                        f"{where}: {bank} digest {digest.hex()} is not a reference value",
                        pcr=event.pcr,
                        bank=bank,
                        event_index=event.index,
                        event_type=event.type_name,
                        digest=digest.hex(),
                    )
                )
    for pcr in sorted(policy.separator_pcrs - separators):
        findings.append(
            PolicyFinding(
                "separator-missing",
                f"PCR {pcr} has no EV_SEPARATOR: pre-OS and OS measurements cannot be told apart",
                pcr=pcr,
                event_type="EV_SEPARATOR",
            )
        )
    return findings
