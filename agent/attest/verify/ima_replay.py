"""The IMA check of a verification: the list's template hashes, and its replay to the quoted PCRs.

The node reads its IMA list after the quote, so the list may run past what the quoted PCR 10
covers: the check looks for the longest prefix that replays to the quoted values. Evidence may
carry only the entries after those already verified (``ima_start_index``); the replay then
starts from the PCR values kept in :class:`~agent.attest.verify.report.ImaProgress` for the
same AK and boot, and returns the new progress to keep.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from agent.attest.evidence import Evidence
from agent.attest.logs import ima
from agent.attest.tpm.algorithms import BANKS, initial_pcr_value
from agent.attest.tpm.wire import Attest
from agent.attest.verify.report import Check, Collector, ImaProgress, PcrValues, Reason
from agent.errors import ImaLogError

# Bounds the report: a log with thousands of bad entries gives a count, not thousands of lines.
MAX_LISTED: Final = 10


def parse_ima(evidence: Evidence, collector: Collector) -> ima.ImaLog | None:
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


def check_ima(
    log: ima.ImaLog | None,
    start: int,
    quoted: PcrValues,
    attest: Attest | None,
    progress: ImaProgress | None,
    collector: Collector,
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
    total = log.first_index + len(log) - first_index
    try:
        matched, final = _ima_prefix(log, first_index, total, starting, quoted, keys, legacy=False)
        if matched is None and any(bank != "sha1" for bank, _ in keys):
            matched, _ = _ima_prefix(log, first_index, total, starting, quoted, keys, legacy=True)
            if matched is not None:
                collector.notes.append(
                    "IMA: non-SHA-1 banks replay as the SHA-1 template hash zero-padded (a "
                    "kernel before 5.8, or a bank the kernel cannot hash)"
                )
    except ImaLogError as error:
        collector.fail(Check.IMA, Reason.IMA_MALFORMED, f"IMA replay: {error}")
        return None
    if matched is None:
        span = f"entries {first_index}-{first_index + total - 1}" if total else "no entries"
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
    newer = total - count
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


def _check_template_hashes(log: ima.ImaLog, collector: Collector) -> None:
    bad = [
        f"entry {entry.index} ({entry.file_name or entry.template_name}): listed "
        f"{entry.template_hash.hex()}, data hashes to {computed.hex()}"
        for entry, computed in log.template_hash_mismatches()
    ]
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
    collector: Collector,
) -> tuple[dict[tuple[str, int], bytes] | None, int]:
    """The PCR values to replay from, and the first entry to replay."""
    if start == 0:
        return {(bank, pcr): initial_pcr_value(BANKS[bank], pcr) for bank, pcr in keys}, 0
    end = start + len(log)
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


def _ima_prefix(
    log: ima.ImaLog,
    first_index: int,
    total: int,
    starting: Mapping[tuple[str, int], bytes],
    quoted: PcrValues,
    keys: Sequence[tuple[str, int]],
    *,
    legacy: bool,
) -> tuple[tuple[int, dict[tuple[str, int], bytes]] | None, dict[tuple[str, int], bytes]]:
    """The longest prefix of the ``total`` entries from ``first_index`` after which every
    quoted IMA PCR holds its quoted value, with those values (None if there is none); and the
    values after all of them.

    A prefix, not the whole list: the node reads the list after the quote, and the kernel may
    have appended measurements in between. Each (bank, PCR) is replayed once; between two
    entries that change one of them the values stand still, so only those entries matter.
    """
    changes: dict[int, list[tuple[tuple[str, int], bytes]]] = {}
    for key in keys:
        bank, pcr = key
        trace = log.replay_trace(
            bank,
            pcr=pcr,
            start_index=first_index,
            starting_pcr=starting[key],
            legacy_padded_sha1=legacy,
        )
        for index, value in trace:
            changes.setdefault(index, []).append((key, value))
    values = dict(starting)
    differing = {key for key in keys if values[key] != quoted[key[0]][key[1]]}
    changed_at = sorted(changes)
    # The values after entry i hold for every prefix up to the next change.
    bounds = [index - first_index for index in changed_at[1:]] + [total] if changed_at else []
    best: tuple[int, dict[tuple[str, int], bytes]] | None = None
    if not differing:
        best = (changed_at[0] - first_index if changed_at else total, dict(values))
    for index, longest in zip(changed_at, bounds, strict=True):
        for key, value in changes[index]:
            values[key] = value
            if value == quoted[key[0]][key[1]]:
                differing.discard(key)
            else:
                differing.add(key)
        if not differing:
            best = (longest, dict(values))
    return best, values
