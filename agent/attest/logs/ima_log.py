"""A parsed Linux IMA measurement list: its entries, template hashes and PCR replay.

``ima.py`` parses both list formats into an :class:`ImaLog`; this module is what the kernel's
list *means* (security/integrity/ima/ in Linux: ``ima_template.c``, ``ima_crypto.c``,
``ima_queue.c``, ``ima_fs.c``), with no parsing of its own.

What the kernel hashes (``ima_calc_field_array_hash_tfm``): for every template but ``ima``, each
field as ``u32 length || data`` (so the binary template data itself); for ``ima``, the 20-byte
file digest followed by the file name NUL-padded to ``IMA_EVENT_NAME_LEN_MAX + 1`` = 256 bytes.
String fields carry their terminating NUL.

PCR banks. Since Linux 5.8 (``ima_calc_field_array_hash``) the kernel extends every allocated
bank with the hash of the same template data computed with that bank's algorithm. The classic
lists show the SHA-1 template hash; since Linux 6.10 ("ima: add crypto agility support for
template-hash algorithm") each bank also has its own list (``*_runtime_measurements_sha256``)
whose template-hash column is exactly what was extended into that bank. So replaying the list's
own bank folds its column, and any other bank is recomputed from the template data. Kernels
before 5.8 (and later ones, for banks the kernel crypto API lacks) extend the SHA-1 template
hash zero-padded to the bank's size: ``legacy_padded_sha1=True``.

Violations (a file measured while open for write, or vice versa) have an all-zero template hash
in every list and extend all ``0xFF`` of the bank's size (``ima_add_violation``,
``ima_init_digests``; legacy: 20 bytes of ``0xFF``, zero-padded).

Why entries are rows: a busy server's list holds 100 000+ entries, replayed in several banks.
The parser keeps each entry as a plain tuple (:data:`EntryRow`) that replay and the template
hash check read; the :class:`ImaEntry` objects are built on first use of :attr:`ImaLog.entries`
(and the rows too, in a list the native fast path parsed: ``ima_native.NativeImaLog``).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from agent.attest.tpm.algorithms import BANKS, HashAlgorithm
from agent.errors import ImaLogError

# IMA_EVENT_NAME_LEN_MAX: the `ima` template's name field is padded to this + 1 when hashed.
IMA_EVENT_NAME_LEN_MAX: Final = 255
# IMA_TEMPLATE_NUM_FIELDS_MAX in security/integrity/ima/ima_template.c.
MAX_FIELDS: Final = 15
# CONFIG_IMA_MEASURE_PCR_IDX default.
IMA_DEFAULT_PCR: Final = 10
# The first entry of every list (ima_add_boot_aggregate).
BOOT_AGGREGATE_NAME: Final = "boot_aggregate"

SourceFormat = Literal["ascii", "binary"]

# The kernel's hash_algo_name[] (crypto/hash_info.c), as it prints digests ("sha256:...") and
# names per-bank lists, to our bank names.
KERNEL_HASH_NAMES: Final[Mapping[str, str]] = {
    "sha1": "sha1",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "sm3": "sm3_256",
    "sha3-256": "sha3_256",
    "sha3-384": "sha3_384",
    "sha3-512": "sha3_512",
}

# Built-in templates (ima_template.c, builtin_templates[]).
TEMPLATE_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "ima": ("d", "n"),
    "ima-ng": ("d-ng", "n-ng"),
    "ima-ngv2": ("d-ngv2", "n-ng"),
    "ima-sig": ("d-ng", "n-ng", "sig"),
    "ima-sigv2": ("d-ngv2", "n-ng", "sig"),
    "ima-buf": ("d-ng", "n-ng", "buf"),
    "ima-modsig": ("d-ng", "n-ng", "sig", "d-modsig", "modsig"),
    "evm-sig": (
        "d-ng",
        "n-ng",
        "evmsig",
        "xattrnames",
        "xattrlengths",
        "xattrvalues",
        "iuid",
        "igid",
        "imode",
    ),
}
# Every field ID the kernel defines (ima_template.c, supported_fields[]).
KNOWN_FIELDS: Final = frozenset(
    {"d", "n", "d-ng", "d-ngv2", "n-ng", "sig", "buf", "d-modsig", "modsig", "evmsig"}
    | {"xattrnames", "xattrlengths", "xattrvalues", "iuid", "igid", "imode"}
)

#: One entry as the parsers store it: (offset, pcr, template hash, template name, template-hash
#: input, fields, field IDs, data known). The input is what the kernel hashed (the binary
#: template data; for ``ima``, digest + padded name), None when the ASCII list cannot give it.
#: ``fields`` is None when they are the input's ``u32 length || data`` fields, split on demand.
EntryRow = tuple[
    int, int, bytes, str, bytes | None, tuple[bytes, ...] | None, tuple[str, ...] | None, bool
]


def template_field_ids(template_name: str) -> tuple[str, ...] | None:
    """Field IDs of a template: a built-in's, or a custom ``ima_template_fmt`` such as
    ``d-ng|n-ng|sig`` (the kernel lists a custom template under its format string)."""
    if template_name in TEMPLATE_FIELDS:
        return TEMPLATE_FIELDS[template_name]
    parts = tuple(template_name.split("|"))
    if len(parts) <= MAX_FIELDS and all(part in KNOWN_FIELDS for part in parts):
        return parts
    return None


def bank(name: str) -> HashAlgorithm:
    """The PCR bank ``name``; ImaLogError naming the known ones if there is none."""
    found = BANKS.get(name)
    if found is None:
        raise ImaLogError(f"unknown hash bank {name!r}; known: {', '.join(BANKS)}")
    return found


class _Hash(Protocol):
    def digest(self) -> bytes: ...


class _Digested:
    """A hashlib-like result for a bank hashlib cannot compute (SM3 on OpenSSL builds without
    it), computed through the registry."""

    __slots__ = ("_value",)

    def __init__(self, algorithm: HashAlgorithm, data: bytes) -> None:
        self._value = algorithm.digest(data)

    def digest(self) -> bytes:
        return self._value


_HASHERS: dict[str, Callable[[bytes], _Hash]] = {}


def hasher(algorithm: HashAlgorithm) -> Callable[[bytes], _Hash]:
    """The fastest constructor for ``algorithm``: ``hasher(bank)(data).digest()``.

    hashlib's named constructors (``hashlib.sha256``) skip ``hashlib.new``'s name lookup, a
    good part of the cost of hashing a 100-byte IMA template.
    """
    found = _HASHERS.get(algorithm.name)
    if found is None:
        named: Callable[[bytes], _Hash] | None = getattr(hashlib, algorithm.hashlib_name, None)
        if named is None:
            try:
                hashlib.new(algorithm.hashlib_name)
            except ValueError:
                named = functools.partial(_Digested, algorithm)
            else:
                named = functools.partial(hashlib.new, algorithm.hashlib_name)
        found = _HASHERS[algorithm.name] = named
    return found


def split_fields(template_data: bytes) -> tuple[bytes, ...]:
    """The ``u32 length || data`` fields of template data the parser has already bounded."""
    fields: list[bytes] = []
    cursor = 0
    while cursor < len(template_data):
        size = int.from_bytes(template_data[cursor : cursor + 4], "little")
        fields.append(template_data[cursor + 4 : cursor + 4 + size])
        cursor += 4 + size
    return tuple(fields)


def ima_template_input(digest: bytes, name: bytes) -> bytes:
    """What the kernel hashes for an ``ima`` entry: the digest and the name (with its NUL)
    copied into a zeroed 256-byte buffer (ima_calc_field_array_hash_tfm)."""
    return digest + name + bytes(IMA_EVENT_NAME_LEN_MAX + 1 - len(name))


def join_fields(fields: Sequence[bytes]) -> bytes:
    """Template data as the kernel serialises it: ``u32 length || data`` per field."""
    return b"".join(len(data).to_bytes(4, "little") + data for data in fields)


@dataclass(frozen=True)
class ImaEntry:
    """One measurement. ``fields`` hold the kernel's field data (string fields end in NUL)."""

    index: int
    # Byte offset of the entry (binary) or of its line (ASCII) in the parsed input.
    offset: int
    pcr: int
    template_hash: bytes
    template_name: str
    fields: tuple[bytes, ...]
    field_ids: tuple[str, ...] | None
    # False only for ASCII entries of templates whose fields cannot be rebuilt from the text.
    template_data_known: bool
    template_hash_bank: str = "sha1"

    @property
    def violation(self) -> bool:
        return not any(self.template_hash)

    def template_hash_input(self) -> bytes:
        """The bytes the kernel hashes into the template hash."""
        if not self.template_data_known:
            raise _not_rebuildable(self.index, self.template_name)
        if self.template_name == "ima":
            digest, name = self.fields
            return ima_template_input(digest, name)
        return join_fields(self.fields)

    def template_digest(self, bank_name: str) -> bytes:
        """The template hash computed with ``bank_name``'s algorithm."""
        return bank(bank_name).digest(self.template_hash_input())

    def _field(self, *ids: str) -> bytes | None:
        if self.field_ids is None:
            return None
        for position, field_id in enumerate(self.field_ids):
            if field_id in ids and position < len(self.fields):
                return self.fields[position]
        return None

    @property
    def file_digest(self) -> tuple[str, bytes] | None:
        """(algorithm, digest) of the measured file or buffer; ``ima`` entries are SHA-1
        (MD5 when IMA hashed with MD5). ``d-ngv2`` digests name their type too
        (``ima:sha256``, ``verity:sha256``)."""
        raw = self._field("d")
        if raw is not None:
            return ("sha1" if len(raw) == 20 else "md5", raw)
        data = self._field("d-ng", "d-ngv2")
        if not data:
            return None
        separator = data.find(b":\x00")
        if separator < 0:
            return None
        algorithm = data[:separator].decode("ascii", errors="replace")
        return algorithm, data[separator + 2 :]

    @property
    def file_name(self) -> str | None:
        data = self._field("n-ng", "n")
        if data is None:
            return None
        return data.removesuffix(b"\x00").decode("utf-8", errors="backslashreplace")

    @property
    def signature(self) -> bytes | None:
        return self._field("sig")

    @property
    def buffer(self) -> bytes | None:
        return self._field("buf")

    @property
    def modsig(self) -> tuple[tuple[str, bytes] | None, bytes] | None:
        """``ima-modsig``: (digest of the file without its appended signature, the signature);
        both empty when the file has none."""
        signature = self._field("modsig")
        if signature is None:
            return None
        data = self._field("d-modsig") or b""
        separator = data.find(b":\x00")
        digest = None
        if separator > 0:
            digest = (data[:separator].decode("ascii", errors="replace"), data[separator + 2 :])
        return digest, signature

    def to_dict(self) -> dict[str, object]:
        result: dict[str, object] = {
            "index": self.index,
            "offset": self.offset,
            "pcr": self.pcr,
            "template_hash": self.template_hash.hex(),
            "template_hash_bank": self.template_hash_bank,
            "template": self.template_name,
            "violation": self.violation,
        }
        digest = self.file_digest
        if digest is not None:
            result["file_digest"] = f"{digest[0]}:{digest[1].hex()}"
        name = self.file_name
        if name is not None:
            result["file_name"] = name
        if self.signature:
            result["signature"] = self.signature.hex()
        if self.buffer is not None:
            result["buffer"] = self.buffer.hex()
        modsig = self.modsig
        if modsig is not None and modsig[1]:
            modsig_digest, signature = modsig
            if modsig_digest is not None:
                result["modsig_digest"] = f"{modsig_digest[0]}:{modsig_digest[1].hex()}"
            result["modsig"] = signature.hex()
        if self.field_ids is None:
            result["fields"] = [data.hex() for data in self.fields]
        return result


def _not_rebuildable(index: int, template_name: str) -> ImaLogError:
    return ImaLogError(
        f"entry {index}: template {template_name!r} cannot be rebuilt from the ASCII list; use "
        "binary_runtime_measurements"
    )


class ImaLog:
    """A parsed measurement list: entries ``first_index`` on, all listed in one bank.

    Immutable: the parser hands over its rows and nothing changes them afterwards.
    """

    __slots__ = ("_entries", "_rows", "first_index", "source_format", "template_hash_bank")

    def __init__(
        self,
        rows: Sequence[EntryRow],
        source_format: SourceFormat,
        *,
        first_index: int = 0,
        template_hash_bank: str = "sha1",
    ) -> None:
        self._rows = tuple(rows)
        self.source_format: SourceFormat = source_format
        self.first_index = first_index
        self.template_hash_bank = template_hash_bank
        self._entries: tuple[ImaEntry, ...] | None = None

    def __len__(self) -> int:
        return len(self._table())

    def _table(self) -> tuple[EntryRow, ...]:
        return self._rows

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImaLog):
            return NotImplemented
        return (
            self.source_format,
            self.first_index,
            self.template_hash_bank,
            self._table(),
        ) == (other.source_format, other.first_index, other.template_hash_bank, other._table())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"ImaLog({len(self)} {self.source_format} entries from {self.first_index}, "
            f"template hashes in {self.template_hash_bank})"
        )

    @property
    def entries(self) -> tuple[ImaEntry, ...]:
        if self._entries is None:
            self._entries = tuple(self._entry(position) for position in range(len(self)))
        return self._entries

    def _entry(self, position: int) -> ImaEntry:
        row = self._table()[position]
        offset, pcr, template_hash, name, hash_input, fields, field_ids, known = row
        if fields is None:
            fields = split_fields(hash_input or b"")
        return ImaEntry(
            self.first_index + position,
            offset,
            pcr,
            template_hash,
            name,
            fields,
            field_ids,
            known,
            self.template_hash_bank,
        )

    @property
    def violations(self) -> int:
        zero = bytes(bank(self.template_hash_bank).digest_size)
        return sum(1 for row in self._table() if row[2] == zero)

    @property
    def pcrs(self) -> frozenset[int]:
        return frozenset(row[1] for row in self._table())

    def replayable_banks(self) -> tuple[str, ...]:
        """The banks this list can be replayed in: every bank when each entry's template data
        is known, else only the bank of its listed template hashes."""
        if all(row[4] is not None or row[2] == bytes(len(row[2])) for row in self._table()):
            return tuple(BANKS)
        return (self.template_hash_bank,)

    def template_hash_mismatches(self) -> list[tuple[ImaEntry, bytes]]:
        """Entries whose listed template hash is not the hash of their data, each with the
        hash computed; violations and entries whose data the ASCII list lacks are skipped."""
        listed_bank = bank(self.template_hash_bank)
        compute = hasher(listed_bank)
        zero = bytes(listed_bank.digest_size)
        bad: list[tuple[ImaEntry, bytes]] = []
        for position, row in enumerate(self._table()):
            template_hash, hash_input = row[2], row[4]
            if hash_input is None or template_hash == zero:
                continue
            computed = compute(hash_input).digest()
            if computed != template_hash:
                bad.append((self._entry(position), computed))
        return bad

    def replay(
        self,
        bank_name: str = "sha1",
        *,
        pcr: int = IMA_DEFAULT_PCR,
        start_index: int | None = None,
        starting_pcr: bytes | None = None,
        legacy_padded_sha1: bool = False,
    ) -> bytes:
        """PCR ``pcr``'s value in ``bank_name`` after these entries; see :func:`replay`."""
        return _fold(
            self._table(),
            self.first_index,
            self.template_hash_bank,
            bank_name,
            pcr,
            self.first_index if start_index is None else start_index,
            starting_pcr,
            legacy_padded_sha1,
            None,
        )

    def replay_trace(
        self,
        bank_name: str,
        *,
        pcr: int = IMA_DEFAULT_PCR,
        start_index: int | None = None,
        starting_pcr: bytes | None = None,
        legacy_padded_sha1: bool = False,
    ) -> list[tuple[int, bytes]]:
        """(entry index, PCR value after it) for every entry from ``start_index`` on that
        extends ``pcr``: what a verifier needs to find the prefix a quote covers."""
        trace: list[tuple[int, bytes]] = []
        _fold(
            self._table(),
            self.first_index,
            self.template_hash_bank,
            bank_name,
            pcr,
            self.first_index if start_index is None else start_index,
            starting_pcr,
            legacy_padded_sha1,
            trace,
        )
        return trace

    def to_dict(self) -> dict[str, object]:
        return {
            "format": self.source_format,
            "template_hash_bank": self.template_hash_bank,
            "entries": [entry.to_dict() for entry in self.entries],
            "violations": self.violations,
        }


def replay(
    entries: Sequence[ImaEntry],
    bank_name: str = "sha1",
    *,
    pcr: int = IMA_DEFAULT_PCR,
    start_index: int = 0,
    starting_pcr: bytes | None = None,
    legacy_padded_sha1: bool = False,
) -> bytes:
    """Extend ``starting_pcr`` (default zero) with the entries from ``start_index`` on.

    Entry indices are absolute (see ``first_index`` of the parsers), so a verifier that kept
    the PCR value after entry k-1 replays only the new entries: parse them with
    ``first_index=k`` and call ``replay(new, bank, start_index=k, starting_pcr=kept)``.
    Entries below ``start_index`` are skipped; the rest must be contiguous from it.
    """
    bank(bank_name)
    kept = [entry for entry in entries if entry.index >= start_index]
    for expected, entry in enumerate(kept, start_index):
        if entry.index != expected:
            raise ImaLogError(
                f"entry {entry.index}: expected entry {expected} next; replay needs contiguous "
                "entries"
            )
    if entries and start_index > entries[-1].index + 1:
        raise ImaLogError(
            f"entry {start_index}: expected entry {start_index} next, the entries end at "
            f"{entries[-1].index}"
        )
    listed = {entry.template_hash_bank for entry in kept}
    if len(listed) > 1:
        raise ImaLogError(
            f"entry {start_index}: the entries come from lists of different banks "
            f"({', '.join(sorted(listed))})"
        )
    rows = [
        (
            entry.offset,
            entry.pcr,
            entry.template_hash,
            entry.template_name,
            entry.template_hash_input() if entry.template_data_known else None,
            entry.fields,
            entry.field_ids,
            entry.template_data_known,
        )
        for entry in kept
    ]
    return _fold(
        rows,
        start_index,
        listed.pop() if listed else "sha1",
        bank_name,
        pcr,
        start_index,
        starting_pcr,
        legacy_padded_sha1,
        None,
    )


def _fold(
    rows: Sequence[EntryRow],
    first_index: int,
    listed_bank_name: str,
    bank_name: str,
    pcr: int,
    start_index: int,
    starting_pcr: bytes | None,
    legacy_padded_sha1: bool,
    trace: list[tuple[int, bytes]] | None,
) -> bytes:
    """The one replay loop: ``rows`` are entries ``first_index`` on, listed in
    ``listed_bank_name``; ``trace`` (when given) collects (index, value) per extend."""
    target = bank(bank_name)
    size = target.digest_size
    if starting_pcr is None:
        value = bytes(size)
    elif len(starting_pcr) != size:
        raise ImaLogError(
            f"starting PCR value is {len(starting_pcr)} bytes, a {bank_name} PCR is {size}"
        )
    else:
        value = bytes(starting_pcr)
    if rows and start_index > first_index + len(rows):
        raise ImaLogError(
            f"entry {start_index}: expected entry {start_index} next, the entries end at "
            f"{first_index + len(rows) - 1}"
        )
    if start_index < first_index and rows:
        raise ImaLogError(
            f"entry {first_index}: expected entry {start_index} next; replay needs contiguous "
            "entries"
        )
    compute = hasher(target)
    listed = bank(listed_bank_name)
    zero = bytes(listed.digest_size)
    same_bank = target.name == listed.name
    # Kernels before 5.8 extended every bank with the SHA-1 template hash, zero-padded
    # (violations: 20 bytes of FF). A per-bank list's own bank is one the kernel hashed: its
    # column is what was extended, padded or not.
    padded = legacy_padded_sha1 and target.name != "sha1" and not same_bank
    violation_digest = (b"\xff" * 20 + bytes(size))[:size] if padded else b"\xff" * size
    begin = max(0, start_index - first_index)
    for index, (_, row_pcr, template_hash, name, hash_input, _, _, _) in enumerate(
        rows[begin:], first_index + begin
    ):
        if row_pcr != pcr:
            continue
        if template_hash == zero:
            digest = violation_digest
        elif same_bank:
            digest = template_hash
        elif padded:
            sha1 = template_hash if listed.name == "sha1" else _sha1(hash_input, index, name)
            digest = (sha1 + bytes(size))[:size]
        elif hash_input is None:
            raise _not_rebuildable(index, name)
        else:
            digest = compute(hash_input).digest()
        value = compute(value + digest).digest()
        if trace is not None:
            trace.append((index, value))
    return value


def _sha1(hash_input: bytes | None, index: int, name: str) -> bytes:
    """The SHA-1 template hash of an entry listed in another bank (legacy replay)."""
    if hash_input is None:
        raise _not_rebuildable(index, name)
    return BANKS["sha1"].digest(hash_input)


def bank_of_kernel_name(name: str) -> str | None:
    """Our bank name for a kernel hash name (``sm3`` -> ``sm3_256``) or our own name."""
    return KERNEL_HASH_NAMES.get(name) or (name if name in BANKS else None)
