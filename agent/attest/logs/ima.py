"""Linux IMA runtime measurement lists: parsing both formats, every list the kernel publishes.

The lists under ``/sys/kernel/security/ima/`` (security/integrity/ima/ima_fs.c):

* ``binary_runtime_measurements``: per entry ``u32 pcr``, the template hash, ``u32`` name length,
  the template name, then (except for the ``ima`` template) ``u32`` template data length and
  the template data, each field as ``u32`` length + data. Integers are little-endian: that is
  the host order on x86/arm64 and what ``ima_canonical_fmt`` forces everywhere else.
* ``ascii_runtime_measurements``: ``"%2d %s %s"`` (PCR, template hash, template name) followed by
  one space and each field. It is lossy (a file name with a newline breaks it); the binary list
  is the authoritative one.
* Since Linux 6.10, ``binary_runtime_measurements_<algo>`` and ``ascii_runtime_measurements_<algo>``
  for every PCR bank (the kernel's hash names: ``sha256``, ``sm3``, ``sha3-256``): the same list
  with that bank's template hashes. The unsuffixed lists are the SHA-1 ones.

What the entries mean (template hashes, banks, violations, replay) is ``ima_log.py``, and the
``boot_aggregate`` entry ``ima_boot.py``; the names callers use are re-exported here.

The list arrives from the network on the verifier side, so the parsers treat it as hostile:
every length is checked against the bounds below and the input's end before it is used, nothing
is allocated beyond slices of the input, and the only exception that leaves is
:class:`~agent.errors.ImaLogError`, naming the entry and offset.

Speed (a busy server's list has 100 000+ entries, replayed in several banks). A binary list in
a sha1/sha256/sha384/sha512 listing goes first to the native fast path (``ima_native.py``, C in
native/imafast, OpenSSL's hashes): it parses, checks the template hashes and later replays in C,
and takes a list only when it has checked all of it; on any doubt (a malformed length, a
mismatch, a template whose field count it cannot vouch for) the Python parser below reads the
same bytes and gives the result or the error. Without the library (not built, fails to load)
only the Python path runs, 4-5 times slower. The Python parser reads the entries of templates it
has already met with ``struct`` at fixed offsets and a few integer comparisons; anything those
comparisons do not accept (a new template, the ``ima`` template, any malformed or out-of-bounds
length) goes through the careful reader, :func:`_read_binary_entry`, which reads through the one
bounded :class:`ByteReader` and words the error. So all paths accept the same lists, and every
error comes from one place.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Final

from agent.attest.logs import ima_native
from agent.attest.logs.ima_boot import boot_aggregate, boot_aggregate_of
from agent.attest.logs.ima_log import (
    BOOT_AGGREGATE_NAME,
    IMA_DEFAULT_PCR,
    IMA_EVENT_NAME_LEN_MAX,
    KERNEL_HASH_NAMES,
    MAX_FIELDS,
    TEMPLATE_FIELDS,
    EntryRow,
    ImaEntry,
    ImaLog,
    bank,
    bank_of_kernel_name,
    hasher,
    ima_template_input,
    join_fields,
    replay,
    template_field_ids,
)
from agent.attest.reader import ByteReader, read_bounded
from agent.attest.tpm.algorithms import BANKS_BY_ALGORITHM_ID, PCR_COUNT
from agent.errors import ImaLogError

__all__ = [
    "BOOT_AGGREGATE_NAME",
    "IMA_DEFAULT_PCR",
    "IMA_EVENT_NAME_LEN_MAX",
    "MAX_ASCII_LINE_BYTES",
    "MAX_ENTRIES",
    "MAX_FIELDS",
    "MAX_LOG_BYTES",
    "MAX_TEMPLATE_DATA_BYTES",
    "MAX_TEMPLATE_NAME_BYTES",
    "TEMPLATE_FIELDS",
    "ImaEntry",
    "ImaLog",
    "bank_of_kernel_name",
    "bank_of_list",
    "boot_aggregate",
    "boot_aggregate_of",
    "parse_ima_ascii",
    "parse_ima_binary",
    "read_ima_log",
    "replay",
    "template_field_ids",
]

# Bounds for hostile input. A busy server's list reaches a few hundred thousand entries.
MAX_LOG_BYTES: Final = 256 * 1024 * 1024
MAX_ENTRIES: Final = 2_000_000
# ima-buf carries measured buffers (keys, device-mapper tables, kexec command lines): KiBs.
MAX_TEMPLATE_DATA_BYTES: Final = 1024 * 1024
MAX_TEMPLATE_NAME_BYTES: Final = 255
MAX_ASCII_LINE_BYTES: Final = 2 * MAX_TEMPLATE_DATA_BYTES + 4096
_NATIVE_LIMITS: Final = ima_native.Limits(
    MAX_ENTRIES,
    PCR_COUNT,
    MAX_TEMPLATE_NAME_BYTES,
    MAX_TEMPLATE_DATA_BYTES,
    MAX_FIELDS,
    IMA_EVENT_NAME_LEN_MAX,
)

# Builds the error for the line being parsed, prefixed with its entry index and offset.
_Fail = Callable[[str], ImaLogError]
_U32: Final = struct.Struct("<I")

# How each field is printed in the ASCII list, hence how to rebuild its data from the text.
# Fields printed in other ways (xattrnames, iuid, igid, imode) cannot be rebuilt.
_RAW_DIGEST_FIELDS: Final = frozenset({"d"})
_ALGO_DIGEST_FIELDS: Final = frozenset({"d-ng", "d-ngv2", "d-modsig"})
_STRING_FIELDS: Final = frozenset({"n", "n-ng"})
_HEX_FIELDS: Final = frozenset({"sig", "buf", "modsig", "evmsig", "xattrlengths", "xattrvalues"})
_TEXT_FIELDS: Final = frozenset({"xattrnames", "iuid", "igid", "imode"})
_HEX_TOKEN: Final = re.compile(rb"(?:[0-9a-fA-F]{2})*")
_TEMPLATE_NAME: Final = re.compile(rb"[A-Za-z0-9_|.-]+")
_PER_BANK_LIST: Final = re.compile(r"(?:binary|ascii)_runtime_measurements_(.*)")

_SHORTFALL: Final = (
    "{what} needs {needed} bytes but only {remaining} remain (truncated list or corrupt length "
    "field)"
)


def bank_of_list(file_name: str) -> str:
    """The bank whose template hashes a list file holds, from its name.

    ``binary_runtime_measurements`` and ``ascii_runtime_measurements`` are SHA-1; a per-bank
    list is named by the kernel's hash name (``_sha256``, ``_sm3``, ``_sha3-256``), or our
    bank name. Any other suffix is an error: a wrong bank would fail every template hash.
    """
    match = _PER_BANK_LIST.fullmatch(file_name)
    if match is None:
        return "sha1"
    suffix = match.group(1)
    found = bank_of_kernel_name(suffix)
    if found is None and suffix.startswith("tpm_alg_"):
        # A bank the kernel has no hash for would be named by its TPM_ALG_ID.
        try:
            algorithm = BANKS_BY_ALGORITHM_ID.get(int(suffix.removeprefix("tpm_alg_"), 16))
        except ValueError:
            algorithm = None
        found = algorithm.name if algorithm is not None else None
    if found is None:
        raise ImaLogError(
            f"cannot tell the bank of {file_name!r} from its name: the suffix {suffix[:40]!r} "
            f"is none of {', '.join(KERNEL_HASH_NAMES)}; name the bank explicitly"
        )
    return found


def _as_bytes(data: object, what: str) -> bytes:
    if isinstance(data, str):
        # File names are raw bytes in the kernel; surrogateescape keeps them byte-exact.
        try:
            return data.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError as error:
            raise ImaLogError(
                f"entry 0: {what} text holds an unpaired surrogate at character {error.start}"
            ) from None
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise ImaLogError(f"{what} must be bytes or str, not {type(data).__name__}")


def _check_first_index(first_index: int) -> None:
    if first_index < 0:
        raise ImaLogError(f"entry {first_index}: first_index must not be negative")


def _check_size(data: bytes) -> None:
    if len(data) > MAX_LOG_BYTES:
        raise ImaLogError(
            f"measurement list is {len(data)} bytes, over the {MAX_LOG_BYTES}-byte limit"
        )


def _check_pcr(pcr: int, index: int) -> None:
    if pcr >= PCR_COUNT:
        raise ImaLogError(f"entry {index}: PCR {pcr} is out of range 0-{PCR_COUNT - 1}")


def _check_template_name(raw: bytes, index: int) -> str:
    if not raw or len(raw) > MAX_TEMPLATE_NAME_BYTES or not _TEMPLATE_NAME.fullmatch(raw):
        raise ImaLogError(
            f"entry {index}: template name {raw[:64]!r} is not 1-{MAX_TEMPLATE_NAME_BYTES} "
            "characters of [A-Za-z0-9_|.-]"
        )
    return raw.decode("ascii")


def _check_ima_name(name: bytes, index: int) -> None:
    # The kernel falls back to the basename for longer names (ima_eventname_init_common).
    if len(name) > IMA_EVENT_NAME_LEN_MAX:
        raise ImaLogError(
            f"entry {index}: `ima` template file name is {len(name)} bytes, "
            f"the template allows {IMA_EVENT_NAME_LEN_MAX}"
        )


def _mismatch(index: int, listed: bytes, computed: bytes) -> ImaLogError:
    return ImaLogError(
        f"entry {index}: template hash mismatch: the list says {listed.hex()}, the template "
        f"data hashes to {computed.hex()}"
    )


def _verify_row(row: EntryRow, index: int, listed_bank: str) -> None:
    template_hash, hash_input = row[2], row[4]
    if hash_input is None or not any(template_hash):
        return
    computed = hasher(bank(listed_bank))(hash_input).digest()
    if computed != template_hash:
        raise _mismatch(index, template_hash, computed)


# --- Binary lists ---


def parse_ima_binary(
    data: bytes,
    *,
    first_index: int = 0,
    template_hash_bank: str = "sha1",
    verify_template_hashes: bool = True,
) -> ImaLog:
    """Parse a binary list (little-endian) whose template hashes are ``template_hash_bank``'s.

    ``first_index`` numbers the entries when ``data`` is a tail of the list (incremental
    shipping). With ``verify_template_hashes`` every non-violation entry's template hash is
    recomputed from its data and a mismatch is an error.
    """
    raw = _as_bytes(data, "binary measurement list")
    _check_size(raw)
    _check_first_index(first_index)
    listed = bank(template_hash_bank)
    native = ima_native.scan(raw, listed, verify_template_hashes, _NATIVE_LIMITS, first_index)
    if native is not None:
        return native
    hash_size = listed.digest_size
    compute = hasher(listed) if verify_template_hashes else None
    zero = bytes(hash_size)
    unpack = _U32.unpack_from
    # PCR, template hash and template name length in one call.
    unpack_head = struct.Struct(f"<I{hash_size}sI").unpack_from
    # Template names met so far (validated once by the careful reader): name, field IDs and
    # field count (-1: any). Never `ima`, whose layout differs.
    templates: dict[bytes, tuple[str, tuple[str, ...] | None, int]] = {}
    rows: list[EntryRow] = []
    append = rows.append
    end = len(raw)
    offset = 0
    while offset < end:
        count = len(rows)
        if count >= MAX_ENTRIES:
            raise ImaLogError(f"entry {first_index + count}: more than {MAX_ENTRIES} entries")
        # The fast path: every length is compared with the bounds and the end of the input
        # before it is used; anything it does not accept is left to the careful reader.
        name_at = offset + hash_size + 8
        if name_at <= end:
            pcr, template_hash, name_size = unpack_head(raw, offset)
            data_at = name_at + name_size + 4
            template = None
            if name_size <= MAX_TEMPLATE_NAME_BYTES and data_at <= end and pcr < PCR_COUNT:
                template = templates.get(raw[name_at : data_at - 4])
            if template is not None:
                data_end = data_at + unpack(raw, data_at - 4)[0]
                if data_end <= end and data_end - data_at <= MAX_TEMPLATE_DATA_BYTES:
                    name, field_ids, field_count = template
                    cursor = data_at
                    fields = 0
                    if field_count == 2:  # ima-ng, the default template: no loop
                        if cursor + 4 <= data_end:
                            cursor += 4 + unpack(raw, cursor)[0]
                            if cursor + 4 <= data_end:
                                cursor += 4 + unpack(raw, cursor)[0]
                                fields = 2
                    else:
                        while cursor + 4 <= data_end and fields < MAX_FIELDS:
                            cursor += 4 + unpack(raw, cursor)[0]
                            fields += 1
                    if cursor == data_end and (field_count < 0 or fields == field_count):
                        template_data = raw[data_at:data_end]
                        if compute is not None and template_hash != zero:
                            computed = compute(template_data).digest()
                            if computed != template_hash:
                                raise _mismatch(first_index + count, template_hash, computed)
                        append(
                            (offset, pcr, template_hash, name, template_data, None, field_ids, True)
                        )
                        offset = data_end
                        continue
        row, offset = _read_binary_entry(raw, offset, first_index + count, hash_size, templates)
        if verify_template_hashes:
            _verify_row(row, first_index + count, template_hash_bank)
        append(row)
    return ImaLog(rows, "binary", first_index=first_index, template_hash_bank=template_hash_bank)


def _read_binary_entry(
    raw: bytes,
    offset: int,
    index: int,
    hash_size: int,
    templates: dict[bytes, tuple[str, tuple[str, ...] | None, int]],
) -> tuple[EntryRow, int]:
    """The careful reader: one entry at ``offset``, every failure worded with the entry index
    and the offset of the failing read. Returns the row and the next entry's offset, and
    records a template it met for the fast path."""

    def error(at: int, message: str) -> ImaLogError:
        return ImaLogError(f"entry {index} (offset {at}): {message}")

    cursor = ByteReader(raw, byteorder="little", error=error, shortfall=_SHORTFALL, offset=offset)
    pcr = cursor.u32("PCR")
    _check_pcr(pcr, index)
    template_hash = cursor.take(hash_size, "template hash")
    name_size = cursor.u32("template name length")
    # A list read with the wrong bank's hash size fails right here, on its first entry.
    hint = f" (is this a list of {hash_size}-byte template hashes?)" if offset == 0 else ""
    if name_size > MAX_TEMPLATE_NAME_BYTES:
        raise ImaLogError(
            f"entry {index} (offset {offset}): template name length {name_size} is over "
            f"{MAX_TEMPLATE_NAME_BYTES}{hint}"
        )
    raw_name = cursor.take(name_size, "template name")
    try:
        name = _check_template_name(raw_name, index)
    except ImaLogError as refused:
        raise ImaLogError(f"{refused}{hint}") from None
    if name == "ima":
        # ima_measurements_show: no template data length for `ima`, the digest without a
        # length (SHA-1: the `ima` template takes only SHA-1 or MD5, and MD5 lists cannot be
        # told apart in binary), the name with its strlen and without the NUL.
        digest = cursor.take(20, "file digest")
        file_name_size = cursor.u32("file name length")
        if file_name_size > IMA_EVENT_NAME_LEN_MAX:
            raise ImaLogError(
                f"entry {index} (offset {offset}): `ima` template file name length "
                f"{file_name_size} is over {IMA_EVENT_NAME_LEN_MAX}"
            )
        file_name = cursor.take(file_name_size, "file name") + b"\x00"
        fields = (digest, file_name)
        row: EntryRow = (
            offset,
            pcr,
            template_hash,
            name,
            ima_template_input(digest, file_name),
            fields,
            TEMPLATE_FIELDS["ima"],
            True,
        )
        return row, cursor.offset
    data_size = cursor.u32("template data length")
    if data_size > MAX_TEMPLATE_DATA_BYTES:
        raise ImaLogError(
            f"entry {index} (offset {offset}): template data length {data_size} is over "
            f"{MAX_TEMPLATE_DATA_BYTES}"
        )
    data_at = cursor.offset
    template_data = cursor.take(data_size, "template data")
    field_count = _count_fields(template_data, data_at, index)
    field_ids = template_field_ids(name)
    if field_ids is not None and len(field_ids) != field_count:
        raise ImaLogError(
            f"entry {index}: template {name} has {len(field_ids)} fields, the entry has "
            f"{field_count}"
        )
    templates[raw_name] = (name, field_ids, -1 if field_ids is None else len(field_ids))
    return (offset, pcr, template_hash, name, template_data, None, field_ids, True), cursor.offset


def _count_fields(template_data: bytes, data_at: int, index: int) -> int:
    """Check that ``template_data`` (at ``data_at`` in the list) is ``u32 length || data``
    fields; return how many."""

    def error(at: int, message: str) -> ImaLogError:
        return ImaLogError(f"entry {index} (offset {data_at + at}): {message}")

    cursor = ByteReader(template_data, byteorder="little", error=error, shortfall=_SHORTFALL)
    count = 0
    while cursor.remaining:
        if count >= MAX_FIELDS:
            raise ImaLogError(f"entry {index}: more than {MAX_FIELDS} template fields")
        size = cursor.u32(f"template field {count} length")
        cursor.take(size, f"template field {count}")
        count += 1
    return count


# --- ASCII lists ---


def parse_ima_ascii(
    text: str | bytes,
    *,
    first_index: int = 0,
    template_hash_bank: str = "sha1",
    verify_template_hashes: bool = True,
) -> ImaLog:
    """Parse an ASCII list whose template hashes are ``template_hash_bank``'s.

    Field data is rebuilt from the text the way the kernel printed it, so template hashes can
    be checked and other banks replayed; entries of templates whose fields cannot be rebuilt
    (see :data:`TEMPLATE_FIELDS`) keep their text tokens and can only be replayed in the bank
    of the listed template hash.
    """
    raw = _as_bytes(text, "ASCII measurement list")
    _check_size(raw)
    _check_first_index(first_index)
    hash_size = bank(template_hash_bank).digest_size
    rows: list[EntryRow] = []
    offset = 0
    while offset < len(raw):
        index = first_index + len(rows)
        if len(rows) >= MAX_ENTRIES:
            raise ImaLogError(f"entry {index}: more than {MAX_ENTRIES} entries")
        end = raw.find(b"\n", offset, offset + MAX_ASCII_LINE_BYTES + 1)
        if end < 0:
            if len(raw) - offset > MAX_ASCII_LINE_BYTES:
                raise ImaLogError(
                    f"entry {index} (offset {offset}): line longer than {MAX_ASCII_LINE_BYTES}"
                    " bytes"
                )
            end = len(raw)
        row = _parse_ascii_line(raw[offset:end], index, offset, hash_size)
        if verify_template_hashes:
            _verify_row(row, index, template_hash_bank)
        rows.append(row)
        offset = end + 1
    return ImaLog(rows, "ascii", first_index=first_index, template_hash_bank=template_hash_bank)


def _parse_ascii_line(line: bytes, index: int, offset: int, hash_size: int) -> EntryRow:
    def fail(reason: str) -> ImaLogError:
        return ImaLogError(f"entry {index} (offset {offset}): {reason}")

    # The PCR is printed with "%2d": PCRs below 10 get a leading space.
    if line.startswith(b" "):
        line = line[1:]
    tokens = line.split(b" ")
    if len(tokens) < 3:
        raise fail("expected '<pcr> <template hash> <template name> <fields...>'")
    pcr_token, hash_token, name_token, *field_tokens = tokens
    if not pcr_token.isdigit() or len(pcr_token) > 2:
        raise fail(f"PCR {pcr_token[:16]!r} is not a decimal number")
    pcr = int(pcr_token)
    _check_pcr(pcr, index)
    if len(hash_token) != 2 * hash_size or not _HEX_TOKEN.fullmatch(hash_token):
        raise fail(f"template hash {hash_token[:140]!r} is not {hash_size} bytes of hex")
    template_hash = bytes.fromhex(hash_token.decode("ascii"))
    name = _check_template_name(name_token, index)
    field_ids = template_field_ids(name)
    if field_ids is None:
        return (offset, pcr, template_hash, name, None, tuple(field_tokens), None, False)
    if len(field_tokens) > len(field_ids):
        raise fail(
            f"{len(field_tokens)} fields, template {name} has {len(field_ids)} "
            "(a space in a field?)"
        )
    # The kernel prints " " before every field and nothing for an empty one, so an ima-sig
    # entry without a signature ends in a space; tools that strip it lose the empty token.
    field_tokens += [b""] * (len(field_ids) - len(field_tokens))
    fields = tuple(
        _ascii_field(field_id, token, name, fail)
        for field_id, token in zip(field_ids, field_tokens, strict=True)
    )
    known = not _TEXT_FIELDS.intersection(field_ids)
    if name == "ima":
        if len(fields[0]) not in (16, 20):
            raise fail("`ima` template digest must be 20 bytes (SHA-1) or 16 (MD5)")
        _check_ima_name(fields[1][:-1], index)
        hash_input: bytes | None = ima_template_input(fields[0], fields[1])
    else:
        hash_input = join_fields(fields) if known else None
    return (offset, pcr, template_hash, name, hash_input, fields, field_ids, known)


def _hex(token: bytes, what: str, fail: _Fail) -> bytes:
    if not _HEX_TOKEN.fullmatch(token):
        raise fail(f"{what} {token[:64]!r} is not hex")
    return bytes.fromhex(token.decode("ascii"))


def _ascii_field(field_id: str, token: bytes, template: str, fail: _Fail) -> bytes:
    """Rebuild a field's data from how ima_show_template_* printed it."""
    if field_id in _STRING_FIELDS:
        if b"\x00" in token:
            raise fail(f"{field_id} field contains a NUL byte")
        # Strings are stored with their NUL (ima_write_template_field_data).
        return token + b"\x00"
    if not token:
        return b""
    if field_id in _RAW_DIGEST_FIELDS:
        return _hex(token, f"{template} {field_id} field", fail)
    if field_id in _ALGO_DIGEST_FIELDS:
        # Stored as "<algo>:" NUL <digest>, printed as "<algo>:<hex>" ("ima:sha256:..." for
        # d-ngv2): everything up to the last colon is the prefix.
        colon = token.rfind(b":")
        if colon <= 0:
            raise fail(f"{field_id} field {token[:64]!r} has no '<algorithm>:' prefix")
        prefix = token[: colon + 1]
        if not _TEMPLATE_NAME.fullmatch(prefix[:-1].replace(b":", b"")):
            raise fail(f"{field_id} field prefix {prefix[:64]!r} is not an algorithm name")
        return prefix + b"\x00" + _hex(token[colon + 1 :], f"{field_id} digest", fail)
    if field_id in _HEX_FIELDS:
        return _hex(token, f"{field_id} field", fail)
    # Printed as decimal or text: kept as the token, the entry is marked not rebuildable.
    return token


# --- Files ---


def read_ima_log(
    path: str | Path,
    *,
    binary: bool | None = None,
    first_index: int = 0,
    template_hash_bank: str | None = None,
    verify_template_hashes: bool = True,
) -> ImaLog:
    """Read a measurement list file.

    ``binary`` defaults to what the name says (``binary_...`` or ``ascii_...``), else to what
    the first byte says: an ASCII list starts with a PCR printed as ``"%2d"``, a binary one
    with a little-endian ``u32`` PCR, whose first byte is below 24. ``template_hash_bank``
    defaults to the bank the file name says (:func:`bank_of_list`): the unsuffixed lists are
    SHA-1, ``*_runtime_measurements_sha256`` is SHA-256.
    """
    name = Path(path).name
    if template_hash_bank is None:
        template_hash_bank = bank_of_list(name)
    else:
        bank(template_hash_bank)
    data = read_bounded(
        path,
        MAX_LOG_BYTES,
        "IMA measurement list",
        ImaLogError,
        hint=" (is securityfs mounted and IMA enabled? reading it needs root)",
    )
    if binary is None:
        if name.startswith(("binary", "ascii")):
            binary = name.startswith("binary")
        else:
            binary = bool(data) and data[0] < PCR_COUNT
    parse = parse_ima_binary if binary else parse_ima_ascii
    return parse(
        data,
        first_index=first_index,
        template_hash_bank=template_hash_bank,
        verify_template_hashes=verify_template_hashes,
    )
