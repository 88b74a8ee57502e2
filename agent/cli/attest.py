"""``accelguard attest quote|verify|eventlog|ima|make-policy``: argument parsing and output.

Errors are raised as AccelguardErrors (the CLI prints one line); a verification that fails is
not an error: ``verify`` prints every failed check and returns 1.

The attest modules (cryptography, the parsers, tpm2-pytss for ``quote``) are imported when a
verb runs, not when the CLI builds its parser: every other command would pay for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from agent.attest.selection import SELECTION_SYNTAX, parse_indices, parse_pcr_selection
from agent.cli.output import add_output, print_json
from agent.config import Config, load_config
from agent.errors import AttestationError, QuoteError, ValidationError
from agent.runtime.inputs import JsonLimits, read_json_file

if TYPE_CHECKING:
    from agent.attest.logs.ima import ImaLog
    from agent.attest.verify.report import VerificationReport

# Shape limits of the JSON files `verify` reads (agent/runtime/inputs.py; the byte caps are the
# formats' own). Evidence needs 3 levels and about 210 items (10 fields, 8 banks of 24 PCRs); a
# policy 5 levels and MAX_REFERENCE_DIGESTS (100,000) digests plus a few thousand objects around
# them.
# The slack leaves small malformed documents to the format checks, which name the field.
_EVIDENCE_MAX_DEPTH: Final = 8
_EVIDENCE_MAX_ITEMS: Final = 1024
_POLICY_MAX_DEPTH: Final = 8
_POLICY_MAX_ITEMS: Final = 200_000


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``attest`` and its verbs to the CLI's command subparsers."""
    attest = commands.add_parser("attest", help="measured-boot attestation: quotes, logs, policy")
    verbs = attest.add_subparsers(dest="verb", required=True)

    quote = verbs.add_parser("quote", help="quote the PCRs and print an evidence document")
    quote.add_argument("--nonce", required=True, help="the verifier's nonce, hex (1-64 bytes)")
    quote.add_argument(
        "--pcrs", help=f"PCR selection {SELECTION_SYNTAX} (default: config [attest] pcrs)"
    )
    quote.add_argument(
        "--event-log", type=Path, help="firmware event log (default: config [attest] event_log)"
    )
    quote.add_argument(
        "--ima-log",
        type=Path,
        help="binary IMA list (default: config [attest] ima_log, if it exists)",
    )
    quote.add_argument(
        "--ima-from", type=int, default=0, help="ship IMA entries from this index on (default 0)"
    )
    quote.add_argument("--tcti", help="TPM TCTI, e.g. swtpm:port=2321 (default: config)")
    quote.add_argument("-o", "--output", type=Path, help="write the document here, not stdout")

    verify = verbs.add_parser(
        "verify", help="verify an evidence document; exit 0 only if it passes"
    )
    verify.add_argument("evidence", type=Path, help="evidence document (JSON)")
    verify.add_argument("--nonce", help="the nonce sent to the node, hex (else: no freshness)")
    verify.add_argument(
        "--pcrs", help=f"the PCR selection asked for, {SELECTION_SYNTAX} (else: not checked)"
    )
    verify.add_argument("--policy", type=Path, help="policy JSON (attest make-policy)")
    verify.add_argument(
        "--state", type=Path, help="per-AK verifier state (clock, IMA replay), JSON, updated"
    )
    verify.add_argument("--ak-name", help="Name of the AK enrolled for this node, hex")
    add_output(verify)

    log = verbs.add_parser("eventlog", help="parse a firmware event log and replay its PCRs")
    log.add_argument(
        "file", type=Path, help="e.g. /sys/kernel/security/tpm0/binary_bios_measurements"
    )
    add_output(log)

    measurements = verbs.add_parser(
        "ima", help="parse an IMA measurement list and replay the PCRs it extends"
    )
    measurements.add_argument(
        "file",
        type=Path,
        help="e.g. /sys/kernel/security/ima/binary_runtime_measurements (or _sha256, ascii_...)",
    )
    measurements.add_argument(
        "--bank",
        help="bank of the list's template hashes, e.g. sha256 (default: from the file name; "
        "the unsuffixed lists are sha1)",
    )
    measurements.add_argument(
        "--format",
        choices=("binary", "ascii"),
        help="list format (default: from the file name, else from its first byte)",
    )
    measurements.add_argument(
        "--legacy-padded-sha1",
        action="store_true",
        help="replay other banks as kernels before 5.8 extended them (SHA-1, zero-padded)",
    )
    measurements.add_argument(
        "--event-log", type=Path, help="firmware event log to check the boot_aggregate against"
    )
    add_output(measurements)

    policy = verbs.add_parser("make-policy", help="a policy from a known-good event log")
    policy.add_argument("file", type=Path, help="known-good firmware event log")
    policy.add_argument(
        "--pcrs", help=f"PCRs to cover, {SELECTION_SYNTAX} or I,J,... (default: all measured)"
    )
    policy.add_argument("--description", default="", help="free text stored in the policy")
    policy.add_argument("--no-golden", action="store_true", help="no golden PCR values")
    policy.add_argument("--no-events", action="store_true", help="no per-event reference digests")
    policy.add_argument("-o", "--output", type=Path, help="write the policy here, not stdout")


def run(args: argparse.Namespace, config: Config | None = None) -> int:
    if config is None:
        config = load_config(args.config)
    if args.verb == "quote":
        return _quote(args, config)
    if args.verb == "verify":
        return _verify(args)
    if args.verb == "eventlog":
        return _eventlog(args)
    if args.verb == "ima":
        return _ima(args)
    if args.verb == "make-policy":
        return _make_policy(args)
    raise AssertionError(f"unhandled attest verb {args.verb}")  # pragma: no cover


# --- argument parsing ---------------------------------------------------------------------------


def _parse_hex(text: str, what: str, limit: int) -> bytes:
    cleaned = text.removeprefix("0x")
    try:
        value = bytes.fromhex(cleaned)
    except ValueError:
        raise ValidationError(f"{what}: {text[:40]!r} is not hex") from None
    if not 1 <= len(value) <= limit or " " in cleaned:
        raise ValidationError(f"{what}: must be 1 to {limit} bytes of hex")
    return value


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    from agent.attest.collect import read_limited  # noqa: PLC0415

    return read_limited(path, limit, what)


def _write_output(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as error:
        raise AttestationError(f"cannot write {output}: {error.strerror or error}") from error


# --- quote --------------------------------------------------------------------------------------


def _quote(args: argparse.Namespace, config: Config) -> int:
    # tpm2-pytss is only needed on a node with a TPM; verify, eventlog and make-policy run
    # without it (on the controller).
    from agent.attest.evidence import (  # noqa: PLC0415
        MAX_EVENT_LOG_BYTES,
        MAX_NONCE_BYTES,
        collect_evidence,
    )
    from agent.attest.tpm.client import TpmClient  # noqa: PLC0415

    nonce = _parse_hex(args.nonce, "--nonce", MAX_NONCE_BYTES)
    if args.pcrs is not None:
        selection = parse_pcr_selection(args.pcrs)
    else:
        selection = parse_pcr_selection(config.attest.pcrs, "config [attest] pcrs")
    if args.ima_from < 0:
        raise ValidationError("--ima-from must not be negative")
    event_log_path = args.event_log or config.attest.event_log
    event_log = _read_bounded(event_log_path, MAX_EVENT_LOG_BYTES, "event log")
    ima_path: Path | None = args.ima_log
    if ima_path is None and config.attest.ima_log.exists():
        ima_path = config.attest.ima_log
    elif ima_path is None and args.ima_from:
        raise ValidationError("--ima-from needs an IMA list (--ima-log or config [attest] ima_log)")

    def read_ima() -> tuple[bytes, int] | None:
        if ima_path is None:
            return None
        return _ima_tail(ima_path, args.ima_from)

    with TpmClient(args.tcti or config.attest.tcti) as client:
        key = client.ensure_attestation_key(config.attest.ak_handle)
        certificate = client.endorsement_key().certificate
        evidence = collect_evidence(client, key, selection, nonce, event_log, read_ima, certificate)
    _write_output(evidence.to_json(), args.output)
    return 0


def _ima_tail(path: Path, first: int) -> tuple[bytes, int]:
    from agent.attest.collect import read_ima_tail  # noqa: PLC0415

    return read_ima_tail(path, first)


# --- verify -------------------------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    from agent.attest.evidence import (  # noqa: PLC0415
        MAX_DOCUMENT_BYTES,
        MAX_NONCE_BYTES,
        evidence_from_dict,
    )
    from agent.attest.policy import MAX_POLICY_BYTES, Policy  # noqa: PLC0415
    from agent.attest.tpm.wire import compute_name  # noqa: PLC0415
    from agent.attest.verify.engine import verify_evidence  # noqa: PLC0415
    from agent.attest.verify.state import open_state  # noqa: PLC0415

    nonce = None if args.nonce is None else _parse_hex(args.nonce, "--nonce", MAX_NONCE_BYTES)
    expected = None if args.pcrs is None else parse_pcr_selection(args.pcrs)
    enrolled = None if args.ak_name is None else _parse_hex(args.ak_name, "--ak-name", 66)
    policy: Policy | None = None
    if args.policy is not None:
        limits = JsonLimits(MAX_POLICY_BYTES, _POLICY_MAX_DEPTH, _POLICY_MAX_ITEMS)
        policy = Policy.from_dict(read_json_file(args.policy, limits, "policy"))
    limits = JsonLimits(MAX_DOCUMENT_BYTES, _EVIDENCE_MAX_DEPTH, _EVIDENCE_MAX_ITEMS)
    evidence = evidence_from_dict(read_json_file(args.evidence, limits, "evidence"))
    if args.state is None:
        report = verify_evidence(evidence, nonce, policy, None, expected, enrolled_ak_name=enrolled)
    else:
        with open_state(args.state) as state:
            try:
                name: bytes | None = compute_name(evidence.ak_public)
            except QuoteError:
                name = None  # the quote checks report the malformed AK
            report = verify_evidence(
                evidence,
                nonce,
                policy,
                state.clock_state(name),
                expected,
                enrolled_ak_name=enrolled,
                ima_progress=state.ima_progress(name),
            )
            state.record(report)
    if args.json:
        print_json(report.to_dict())
    else:
        _print_report(report)
    return 0 if report.ok else 1


def _print_report(report: VerificationReport) -> None:
    name = report.ak_name.hex() if report.ak_name is not None else "(undecodable)"
    header = f"AK {name}"
    if report.attest is not None:
        clock = report.attest.clock_info
        header += (
            f"  clock {clock.clock}  resetCount {clock.reset_count}  "
            f"restartCount {clock.restart_count}"
        )
        if report.attest.quote_info is not None:
            covered = report.attest.quote_info.selection_dict()
            header += "  quoted " + "+".join(
                f"{bank}:{','.join(map(str, pcrs))}" for bank, pcrs in covered.items()
            )
    print(header)
    print("checks: " + ", ".join(f"{check} {status}" for check, status in report.checks.items()))
    for failure in report.failures:
        print(f"FAILED {failure.check}: {failure.reason}: {failure.message}")
    for item in report.unchecked:
        print(f"NOT CHECKED {item.check}: {item.reason}: {item.message}")
    for note in report.notes:
        print(f"note: {note}")
    if report.ok:
        print(f"result: PASS ({len(report.unchecked)} items not checked, listed above)")
    else:
        print(f"result: FAIL ({len(report.failures)} failed checks)")


# --- eventlog and make-policy -------------------------------------------------------------------


def _eventlog(args: argparse.Namespace) -> int:
    from agent.attest.logs import eventlog  # noqa: PLC0415
    from agent.attest.logs.describe import describe_event_data  # noqa: PLC0415

    log = eventlog.read_event_log(args.file)
    if args.json:
        json.dump(log.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    banks = ", ".join(f"{bank} ({size} bytes)" for bank, size in log.algorithms.items())
    print(f"format {log.format}; banks {banks}; replayed {', '.join(log.replayable_banks)}")
    if log.startup_locality is not None:
        print(f"StartupLocality {log.startup_locality}")
    for event in log.events:
        digests = " ".join(f"{bank}:{digest.hex()}" for bank, digest in event.digests.items())
        decoded = describe_event_data(event.event_type, event.data)
        text = f"  {_short(decoded)}" if decoded else ""
        print(f"#{event.index:<4} PCR {event.pcr:<2} {event.type_name}{text}")
        if event.extends:
            print(f"      {digests}")
    for finding in log.findings:
        print(f"{finding.severity}: {finding.kind}: {finding.message}")
    print("pcrs:")
    for bank, values in log.replay().items():
        print(f"  {bank}:")
        for pcr, value in sorted(values.items()):
            print(f"    {pcr:>2}: {value.hex()}")
    return 0


def _ima(args: argparse.Namespace) -> int:
    from agent.attest.logs import ima  # noqa: PLC0415
    from agent.attest.tpm.algorithms import BANKS  # noqa: PLC0415

    bank: str | None = None
    if args.bank is not None:
        bank = ima.bank_of_kernel_name(args.bank)
        if bank is None:
            raise ValidationError(f"--bank {args.bank!r}: unknown bank; known: {', '.join(BANKS)}")
    else:
        try:
            bank = ima.bank_of_list(args.file.name)
        except AttestationError as error:
            raise ValidationError(f"{error} (--bank)") from None
    binary = None if args.format is None else args.format == "binary"
    log = ima.read_ima_log(args.file, binary=binary, template_hash_bank=bank)
    pcrs = sorted(log.pcrs) or [ima.IMA_DEFAULT_PCR]
    replayed = {
        name: {
            pcr: log.replay(name, pcr=pcr, legacy_padded_sha1=args.legacy_padded_sha1)
            for pcr in pcrs
        }
        for name in log.replayable_banks()
    }
    aggregate = _boot_aggregate(log, args.event_log)
    if args.json:
        document = log.to_dict()
        document["first_index"] = log.first_index
        document["legacy_padded_sha1"] = args.legacy_padded_sha1
        document["pcrs"] = {
            name: {str(pcr): value.hex() for pcr, value in values.items()}
            for name, values in replayed.items()
        }
        if aggregate is not None:
            document["boot_aggregate"] = aggregate
        print_json(document)
    else:
        _print_ima(args.file, log, replayed, aggregate)
    return 1 if aggregate is not None and aggregate.get("matches") is False else 0


def _boot_aggregate(log: ImaLog, event_log_path: Path | None) -> dict[str, object] | None:
    """The list's boot_aggregate entry, checked against a firmware log's PCRs when given."""
    from agent.attest.logs import ima  # noqa: PLC0415
    from agent.attest.logs.eventlog import read_event_log  # noqa: PLC0415
    from agent.attest.tpm.algorithms import BANKS, initial_pcr_value  # noqa: PLC0415

    found = next(
        (
            (entry, aggregate)
            for entry in log.entries[:1]
            if (aggregate := ima.boot_aggregate_of(entry)) is not None
        ),
        None,
    )
    if found is None:
        if event_log_path is not None:
            raise ValidationError(
                "--event-log: the list does not start with a boot_aggregate entry to check"
            )
        return None
    entry, (bank, digest) = found
    result: dict[str, object] = {
        "entry": entry.index,
        "bank": bank,
        "digest": digest.hex(),
        "no_tpm": not any(digest),
    }
    if event_log_path is None:
        return result
    replayed = read_event_log(event_log_path).replay()
    if bank not in replayed:
        raise ValidationError(
            f"--event-log: the boot_aggregate is {bank} but the event log replays "
            f"{', '.join(replayed) or 'no bank'}"
        )
    values = {
        pcr: replayed[bank].get(pcr, initial_pcr_value(BANKS[bank], pcr)) for pcr in range(10)
    }
    expected = ima.boot_aggregate(values, bank)
    result["expected_from_event_log"] = expected.hex()
    result["matches"] = expected == digest
    return result


def _print_ima(
    path: Path,
    log: ImaLog,
    replayed: dict[str, dict[int, bytes]],
    aggregate: dict[str, object] | None,
) -> None:
    print(
        f"{path}: {log.source_format} list, {len(log)} entries from {log.first_index}, "
        f"template hashes in {log.template_hash_bank}, {log.violations} violations"
    )
    for entry in log.entries:
        digest = entry.file_digest
        shown = f"{digest[0]}:{digest[1].hex()}" if digest is not None else "-"
        name = entry.file_name if entry.file_name is not None else "-"
        flag = "  VIOLATION" if entry.violation else ""
        print(f"#{entry.index:<6} PCR {entry.pcr:<2} {entry.template_name} {shown} {name}{flag}")
        extra = []
        if entry.signature:
            extra.append(f"signature {len(entry.signature)} bytes")
        if entry.buffer is not None:
            extra.append(f"buffer {_short_hex(entry.buffer)}")
        modsig = entry.modsig
        if modsig is not None and modsig[1]:
            extra.append(f"modsig {len(modsig[1])} bytes")
        if entry.field_ids is None:
            extra.append("fields " + " ".join(_short_hex(field) for field in entry.fields))
        details = "; ".join(extra)
        print(f"        template {entry.template_hash.hex()}" + (f"; {details}" if details else ""))
    if aggregate is not None:
        line = f"boot_aggregate ({aggregate['bank']}): {aggregate['digest']}"
        if aggregate["no_tpm"]:
            line += " (all zero: the kernel found no TPM)"
        if "matches" in aggregate:
            expected = aggregate["expected_from_event_log"]
            line += (
                "; matches the event log's PCRs"
                if aggregate["matches"]
                else f"; DOES NOT match the event log's PCRs, which give {expected}"
            )
        print(line)
    print("pcrs:")
    for name, values in replayed.items():
        print(f"  {name}:")
        for pcr, value in values.items():
            print(f"    {pcr:>2}: {value.hex()}")


def _short_hex(data: bytes) -> str:
    return data[:32].hex() + ("..." if len(data) > 32 else "")


def _short(decoded: dict[str, object]) -> str:
    text = ", ".join(f"{key}={value}" for key, value in decoded.items())
    return text if len(text) <= 120 else text[:117] + "..."


def _make_policy(args: argparse.Namespace) -> int:
    from agent.attest.logs.eventlog import read_event_log  # noqa: PLC0415
    from agent.attest.policy import make_policy  # noqa: PLC0415

    if args.no_golden and args.no_events:
        raise ValidationError("--no-golden and --no-events leave nothing to put in the policy")
    log = read_event_log(args.file)
    pcrs: list[int] | None = None
    banks: list[str] | None = None
    if args.pcrs is not None:
        if ":" in args.pcrs:
            selection = parse_pcr_selection(args.pcrs)
            banks = list(selection)
            pcrs = sorted({pcr for indices in selection.values() for pcr in indices})
            unreplayable = [bank for bank in banks if bank not in log.replayable_banks]
            if unreplayable:
                raise ValidationError(
                    f"--pcrs: the log cannot replay {', '.join(unreplayable)} (it replays "
                    f"{', '.join(log.replayable_banks) or 'no bank'})"
                )
        else:
            pcrs = parse_indices(args.pcrs, args.pcrs, "--pcrs")
    policy = make_policy(
        log,
        pcrs=pcrs,
        banks=banks,
        golden=not args.no_golden,
        reference_events=not args.no_events,
        description=args.description,
    )
    if not any(policy.golden_pcrs.values()) and not policy.reference_events:
        raise ValidationError("the log measures none of the selected PCRs: the policy is empty")
    _write_output(policy.to_json(), args.output)
    return 0
