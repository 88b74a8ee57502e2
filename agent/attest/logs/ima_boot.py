"""The ``boot_aggregate`` entry that opens every IMA list: which bank it is in, and its value.

At initialisation IMA measures the TPM's boot PCRs into its first entry, named
``boot_aggregate`` (``ima_add_boot_aggregate``, ``ima_calc_boot_aggregate`` in Linux's
security/integrity/ima/). Comparing it with the PCRs a firmware event log replays to ties the
list to that boot. Its variants:

* the bank: ``ima_hash``'s if the TPM has that bank, else SHA-256, else SHA-1;
* the PCRs: 0-7 for SHA-1, 0-9 for any other bank (Linux 5.8, "ima: extend boot_aggregate with
  kernel measurements"; earlier kernels always used SHA-1 over 0-7);
* how it is listed: a bare digest in the ``ima`` template, ``sha256:...`` in ``ima-ng`` and
  its kin, ``ima:sha256:...`` in ``d-ngv2`` templates;
* all zero when the kernel found no TPM.
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.attest.logs.ima_log import BOOT_AGGREGATE_NAME, ImaEntry, bank, bank_of_kernel_name
from agent.attest.tpm.algorithms import BANKS
from agent.errors import ImaLogError


def boot_aggregate_of(entry: ImaEntry) -> tuple[str, bytes] | None:
    """(bank, digest) of a ``boot_aggregate`` entry; None for any other entry, or one whose
    digest names an algorithm that is no PCR bank.

    The kernel computes it in the bank of ``ima_hash`` if the TPM has one, else SHA-256, else
    SHA-1, and lists it in the entry's ``d``/``d-ng`` field: ``ima`` templates (and kernels
    before 5.8) show a bare SHA-1 digest, ``ima-ng`` ones ``sha1:`` or ``sha256:``...
    """
    if entry.file_name != BOOT_AGGREGATE_NAME or entry.violation:
        return None
    digest = entry.file_digest
    if digest is None:
        return None
    algorithm, value = digest
    found = bank_of_kernel_name(algorithm.rpartition(":")[2] if ":" in algorithm else algorithm)
    if found is None or len(value) != BANKS[found].digest_size:
        return None
    return found, value


def boot_aggregate(pcrs: Mapping[int, bytes], bank_name: str) -> bytes:
    """The ``boot_aggregate`` digest the kernel computes from ``pcrs`` of ``bank_name``
    (``ima_calc_boot_aggregate``): the hash of PCRs 0-7 for SHA-1, of PCRs 0-9 for any other
    bank (Linux 5.8, "ima: extend boot_aggregate with kernel measurements"; earlier kernels
    always used the SHA-1 bank). A kernel that found no TPM lists an all-zero digest instead.

    ``pcrs`` must hold every PCR used; ImaLogError names the first one missing.
    """
    algorithm = bank(bank_name)
    used = range(8) if algorithm.name == "sha1" else range(10)
    parts: list[bytes] = []
    for pcr in used:
        value = pcrs.get(pcr)
        if value is None or len(value) != algorithm.digest_size:
            raise ImaLogError(
                f"boot_aggregate in {bank_name} needs PCR {pcr} ({algorithm.digest_size} bytes)"
            )
        parts.append(value)
    return algorithm.digest(b"".join(parts))
