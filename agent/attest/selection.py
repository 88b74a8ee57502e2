"""PCR selections as operators write them (``sha256:0-7,14+sha1:0-7``): the CLI's ``--pcrs``,
``[attest] pcrs`` and the controller's ``attest_pcrs``. Light to import (the CLI builds its
parser with it); the TPM modules load when a selection is checked."""

from __future__ import annotations

import re
from typing import Final

from agent.errors import QuoteError, ValidationError

SELECTION_SYNTAX: Final = "BANK:I,J,K-L[+BANK:...], e.g. sha256:0-7,14+sha1:0-7"
_SELECTION_PART: Final = re.compile(r"([a-z0-9_]+):([0-9,\-]+)")


def parse_pcr_selection(text: str, what: str = "--pcrs") -> dict[str, list[int]]:
    """``sha256:0-7,14+sha1:0`` -> ``{"sha256": [0..7, 14], "sha1": [0]}``."""
    selection: dict[str, list[int]] = {}
    for part in text.split("+"):
        match = _SELECTION_PART.fullmatch(part.strip())
        if match is None:
            raise ValidationError(f"{what} {text!r}: expected {SELECTION_SYNTAX}")
        bank = match.group(1)
        if bank in selection:
            raise ValidationError(f"{what} {text!r}: bank {bank} is listed twice")
        selection[bank] = parse_indices(match.group(2), text, what)
    check_selection(selection, f"{what} {text!r}")
    return selection


def check_selection(selection: dict[str, list[int]], what: str) -> None:
    """Known banks, PCR indices the TPM has: ValidationError naming ``what`` otherwise."""
    from agent.attest.tpm.algorithms import PCR_COUNT  # noqa: PLC0415
    from agent.attest.tpm.wire import normalise_selection  # noqa: PLC0415

    try:
        normalise_selection(selection)
    except QuoteError as error:
        raise ValidationError(f"{what}: {error}") from None
    for bank, indices in selection.items():
        if not indices:
            raise ValidationError(f"{what}: no PCRs for {bank}")
        if max(indices) >= PCR_COUNT:
            raise ValidationError(f"{what}: PCR {max(indices)} in {bank} is over {PCR_COUNT - 1}")


def parse_indices(text: str, whole: str, what: str) -> list[int]:
    indices: set[int] = set()
    for item in text.split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or len(low) > 2 or len(high) > 2:
            raise ValidationError(f"{what} {whole!r}: {item!r} is not a PCR index or range")
        first, last = int(low), int(high or low)
        if first > last:
            raise ValidationError(f"{what} {whole!r}: range {item!r} runs backwards")
        indices.update(range(first, last + 1))
    return sorted(indices)
