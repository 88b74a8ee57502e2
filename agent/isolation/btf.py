"""The kernel's own type information (BTF, ``/sys/kernel/btf/vmlinux``): just enough to find a
structure member's byte offset and a function's type id.

A BPF program that reads kernel structures (the holder iterator, agent/isolation/holder_iter.py)
must use this kernel's layout, which differs between versions and configurations; the kernel
publishes it in BTF (include/uapi/linux/btf.h, Documentation/bpf/btf.rst). The format:

- a header (magic 0xEB9F, version 1, flags, hdr_len, then the type and string sections' offsets
  and lengths, relative to the end of the header);
- the type section: ``struct btf_type`` records (name_off, info, size_or_type), numbered from 1,
  each followed by kind-specific data whose length follows from its kind and ``vlen``;
- the string section: NUL-terminated names.

Invariants: the reader never trusts a length it was given (a truncated or corrupt file is a
:class:`BtfError` naming what is wrong, never an IndexError or a wrong offset); a member inside
anonymous structures and unions is found at its real offset; bit-field members are refused (no
byte offset).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

from agent.errors import IsolationError

VMLINUX = Path("/sys/kernel/btf/vmlinux")
MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_MEMBER = struct.Struct("<III")

# enum btf_kind
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19
_MODIFIERS = frozenset({KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})


# Bytes of kind-specific data after a type record: fixed, plus per item (``vlen`` items); -1 for
# a kind this reader does not know (kinds 1-19, include/uapi/linux/btf.h).
_FIXED_BYTES = (-1, 4, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 4, 0, 0)
_BYTES_PER_ITEM = (0, 0, 0, 0, 12, 12, 8, 0, 0, 0, 0, 0, 0, 8, 0, 12, 0, 0, 0, 12)
_NAMED_KINDS = frozenset({KIND_STRUCT, KIND_UNION, KIND_FUNC})


class BtfError(IsolationError):
    """The kernel's BTF is missing, unreadable or lacks what a program needs."""


class _Record(NamedTuple):
    kind: int
    name_off: int
    vlen: int
    kind_flag: bool
    size_or_type: int
    extra: int  # offset of the kind-specific data in the file


class Btf:
    """A parsed BTF blob: types by id, and structures and functions by name."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        if len(data) < _HEADER.size:
            raise BtfError(f"BTF of {len(data)} bytes is shorter than its header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(
            data
        )
        if magic != MAGIC or version != 1:
            raise BtfError(f"not BTF version 1 (magic {magic:#x}, version {version})")
        types = (hdr_len + type_off, hdr_len + type_off + type_len)
        self._strings = (hdr_len + str_off, hdr_len + str_off + str_len)
        if hdr_len < _HEADER.size or max(types[1], self._strings[1]) > len(data):
            raise BtfError("BTF header points beyond the end of the data")
        # Where each type's record starts, by id (id 0 is void); records are decoded on demand.
        self._starts: list[int] = [-1]
        # (kind, name offset) -> first id: BTF's strings are deduplicated, so a name has one.
        self._by_name: dict[tuple[int, int], int] = {}
        unpack, end, starts, by_name = _TYPE.unpack_from, types[1], self._starts, self._by_name
        position = types[0]
        while position < end:
            if position + _TYPE.size > end:
                raise BtfError(f"BTF type {len(starts)} is cut short")
            name_off, info, _ = unpack(data, position)
            kind = (info >> 24) & 0x1F
            if kind >= len(_FIXED_BYTES) or _FIXED_BYTES[kind] < 0:
                raise BtfError(f"unknown BTF kind {kind}: this reader predates the kernel's format")
            starts.append(position)
            position += _TYPE.size + _FIXED_BYTES[kind] + _BYTES_PER_ITEM[kind] * (info & 0xFFFF)
            if position > end:
                raise BtfError(f"BTF type {len(starts) - 1} is cut short")
            if name_off and kind in _NAMED_KINDS:
                # The first of a name wins: the kernel's own types come first.
                by_name.setdefault((kind, name_off), len(starts) - 1)

    @classmethod
    def of_kernel(cls, path: Path = VMLINUX) -> Btf:
        try:
            return cls(path.read_bytes())
        except OSError as error:
            raise BtfError(
                f"cannot read the kernel's BTF ({path}: {error.strerror}); the kernel needs "
                "CONFIG_DEBUG_INFO_BTF"
            ) from error

    def _named(self, kind: int, name: str) -> int | None:
        """The first type of ``kind`` called ``name`` (the string section is searched for the
        name, every copy of it if a writer did not deduplicate)."""
        start, end = self._strings
        needle = b"\0" + name.encode() + b"\0"
        found = self._data.find(needle, start, end)
        while found >= 0:
            type_id = self._by_name.get((kind, found + 1 - start))
            if type_id is not None:
                return type_id
            found = self._data.find(needle, found + 1, end)
        return None

    def _raw_name(self, offset: int) -> bytes:
        start = self._strings[0] + offset
        end = self._data.find(b"\0", start, self._strings[1])
        if offset >= self._strings[1] - self._strings[0] or end < 0:
            raise BtfError(f"BTF name offset {offset} is outside the string section")
        return self._data[start:end]

    def _name(self, offset: int) -> str:
        return self._raw_name(offset).decode("utf-8", "replace")

    def _record(self, type_id: int) -> _Record:
        if not 0 < type_id < len(self._starts):
            raise BtfError(f"BTF type id {type_id} does not exist")
        start = self._starts[type_id]
        name_off, info, size_or_type = _TYPE.unpack_from(self._data, start)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        return _Record(kind, name_off, vlen, bool(info >> 31), size_or_type, start + _TYPE.size)

    def function(self, name: str) -> int:
        """The type id of the function ``name`` (a BPF tracing program attaches by it)."""
        found = self._named(KIND_FUNC, name)
        if found is None:
            raise BtfError(f"the kernel has no function {name!r} (too old for this program?)")
        return found

    def struct_size(self, name: str) -> int:
        return self._record(self._struct(name)).size_or_type

    def offset(self, struct_name: str, member: str) -> int:
        """The byte offset of ``member`` in ``struct struct_name``."""
        found = self._member(self._struct(struct_name), member)
        if found is None:
            raise BtfError(f"struct {struct_name} has no member {member!r} in this kernel")
        return found

    def _struct(self, name: str) -> int:
        found = self._named(KIND_STRUCT, name)
        if found is None:
            raise BtfError(f"the kernel has no struct {name!r}")
        return found

    def _resolve(self, type_id: int) -> int:
        """The id of the type behind typedefs and qualifiers."""
        for _ in range(64):
            record = self._record(type_id)
            if record.kind not in _MODIFIERS:
                return type_id
            type_id = record.size_or_type
        raise BtfError(f"BTF type {type_id} is a loop of typedefs or qualifiers")

    def _member(self, type_id: int, member: str, depth: int = 0) -> int | None:
        record = self._record(type_id)
        if depth > 16:
            raise BtfError("BTF structures nest more than 16 anonymous levels")
        for index in range(record.vlen):
            name_off, member_type, bits = (
                int(value) for value in _MEMBER.unpack_from(self._data, record.extra + 12 * index)
            )
            # With kind_flag, the low 24 bits are the offset and the high 8 a bit-field size.
            bit_offset = bits & 0xFFFFFF if record.kind_flag else bits
            if name_off and self._name(name_off) == member:
                if bit_offset % 8 or (record.kind_flag and bits >> 24):
                    raise BtfError(f"member {member!r} is a bit-field: it has no byte offset")
                return bit_offset // 8
            if not name_off:
                inner_id = self._resolve(member_type)
                if self._record(inner_id).kind in (KIND_STRUCT, KIND_UNION):
                    found = self._member(inner_id, member, depth + 1)
                    if found is not None:
                        return bit_offset // 8 + found
        return None
