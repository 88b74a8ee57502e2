"""The production DCMI bindings against the header's prototypes, as C declarations map to ctypes.

``native/dcmi-sim/include/dcmi_interface_api.h`` was written from the DCMI API reference; every
binding in ``agent/hw/ascend/dcmi.PROTOTYPES`` must declare the same return type and parameter
types, so a wrong binding (an ``int *`` bound as ``unsigned int *``, a missing parameter) fails
here rather than corrupting memory at run time. The checker is shown to catch each kind of
mistake on mutated copies of the bindings.
"""

from __future__ import annotations

import ctypes
import re
from ctypes import (
    POINTER,
    c_char_p,
    c_int,
    c_long,
    c_uint,
    c_ulong,
    c_ulonglong,
    c_void_p,
)
from typing import Any

import pytest

from agent.hw.ascend import dcmi
from agent.hw.ascend.dcmi import PROTOTYPES, STRUCTS, DcmiLibrary
from tests.dcmisim.dcmi import HEADER, LIBRARY

Prototype = tuple[str, Any, tuple[Any, ...]]

# C scalar type -> ctypes type, for LP64 Linux (the simulator's static asserts pin the same).
SCALARS: dict[str, Any] = {
    "int": c_int,
    "signed int": c_int,
    "unsigned int": c_uint,
    "long": c_long,
    "unsigned long": c_ulong,
    "unsigned long long": c_ulonglong,
}
STRUCT_TYPES = {struct.c_name: struct for struct in STRUCTS}
_DECLARATION = re.compile(r"DCMIDLLEXPORT\s+([\w\s\*]+?)\s*\b(\w+)\s*\(([^)]*)\)\s*;")


def ctypes_type(declaration: str, *, parameter: bool = True) -> Any:
    """The ctypes type a C declaration (``unsigned int *phyid``, or a bare return type) maps
    to. Raises ValueError for a declaration it has no mapping for, so the test cannot pass by
    skipping one."""
    text = " ".join(declaration.replace("*", " * ").split())
    tokens = [token for token in text.split() if token != "const"]
    pointers = tokens.count("*")
    words = [token for token in tokens if token != "*"]
    if parameter:
        if len(words) < 2:
            raise ValueError(f"an unnamed parameter: {declaration!r}")
        words = words[:-1]  # the parameter's name
    base = " ".join(words)
    if "[" in declaration or pointers > 1:
        raise ValueError(f"no ctypes mapping for {declaration!r}")
    if base.startswith("struct "):
        if pointers != 1:
            raise ValueError(f"a structure passed by value: {declaration!r}")
        return POINTER(STRUCT_TYPES[base.split()[1]])
    if base.startswith("enum "):
        # An enum is passed as int (C11 6.7.2.2; 4 bytes with GCC on LP64).
        return POINTER(c_int) if pointers else c_int
    if base in ("char", "unsigned char", "signed char") and pointers == 1:
        return c_char_p  # a byte buffer
    if base == "void" and pointers == 1:
        return c_void_p
    if base in SCALARS:
        return POINTER(SCALARS[base]) if pointers else SCALARS[base]
    raise ValueError(f"no ctypes mapping for {declaration!r}")


def header_prototypes(text: str) -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """name -> (restype, argtypes) of every exported function the header declares."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.DOTALL)
    text = re.sub(r"//[^\n]*", " ", text)
    found: dict[str, tuple[Any, tuple[Any, ...]]] = {}
    for match in _DECLARATION.finditer(text):
        returns, name, parameters = match.group(1), match.group(2), match.group(3).strip()
        argtypes = (
            ()
            if parameters in ("void", "")
            else tuple(ctypes_type(part) for part in parameters.split(","))
        )
        assert name not in found, f"{name} declared twice"
        found[name] = (ctypes_type(returns, parameter=False), argtypes)
    return found


def mismatches(
    bindings: tuple[Prototype, ...], declared: dict[str, tuple[Any, tuple[Any, ...]]]
) -> list[str]:
    """Every difference between the bindings and the header's declarations, one line each."""
    problems = []
    bound = {name: (restype, tuple(argtypes)) for name, restype, argtypes in bindings}
    if len(bound) != len(bindings):
        problems.append("a function is bound twice")
    problems += [f"{name}: declared but not bound" for name in sorted(set(declared) - set(bound))]
    problems += [f"{name}: bound but not declared" for name in sorted(set(bound) - set(declared))]
    for name in sorted(set(bound) & set(declared)):
        (restype, argtypes), (want_restype, want_argtypes) = bound[name], declared[name]
        if restype is not want_restype:
            problems.append(f"{name}: returns {restype}, the header says {want_restype}")
        if len(argtypes) != len(want_argtypes):
            problems.append(
                f"{name}: {len(argtypes)} parameters, the header says {len(want_argtypes)}"
            )
            continue
        for position, (got, want) in enumerate(zip(argtypes, want_argtypes, strict=True)):
            if got is not want:
                problems.append(f"{name}: parameter {position} is {got}, the header says {want}")
    return problems


@pytest.fixture(scope="module")
def declared() -> dict[str, tuple[Any, tuple[Any, ...]]]:
    return header_prototypes(HEADER.read_text())


def test_the_header_declares_what_the_simulator_exports(
    declared: dict[str, tuple[Any, tuple[Any, ...]]],
) -> None:
    # The parser saw every declaration: one per DCMIDLLEXPORT function in the header.
    assert len(declared) == HEADER.read_text().count("DCMIDLLEXPORT int ") == 28


def test_every_binding_matches_its_declaration(
    declared: dict[str, tuple[Any, tuple[Any, ...]]],
) -> None:
    assert mismatches(PROTOTYPES, declared) == []


def _replace(name: str, restype: Any = None, argtypes: tuple[Any, ...] | None = None) -> Any:
    def mutate(bindings: list[Prototype]) -> None:
        index = next(i for i, (bound, _, _) in enumerate(bindings) if bound == name)
        _, old_restype, old_argtypes = bindings[index]
        bindings[index] = (
            name,
            old_restype if restype is None else restype,
            old_argtypes if argtypes is None else argtypes,
        )

    return mutate


MUTATIONS = {
    "signedness of a pointer": (
        _replace("dcmi_get_device_health", argtypes=(c_int, c_int, POINTER(c_int))),
        "dcmi_get_device_health: parameter 2",
    ),
    "signedness of a scalar": (
        _replace("dcmi_set_destroy_vdevice", argtypes=(c_int, c_int, c_int)),
        "dcmi_set_destroy_vdevice: parameter 2",
    ),
    "the wrong structure": (
        _replace("dcmi_get_device_chip_info", argtypes=(c_int, c_int, POINTER(dcmi.ChipInfoV2))),
        "dcmi_get_device_chip_info: parameter 2",
    ),
    "a missing parameter": (
        _replace("dcmi_get_device_errorcode_v2", argtypes=(c_int, c_int, POINTER(c_int), c_void_p)),
        "dcmi_get_device_errorcode_v2: 4 parameters",
    ),
    "the return type": (
        _replace("dcmi_create_vdevice", restype=c_uint),
        "dcmi_create_vdevice: returns",
    ),
    "a 64-bit scalar": (
        _replace("dcmi_get_device_phyid_from_logicid", argtypes=(c_ulonglong, POINTER(c_uint))),
        "dcmi_get_device_phyid_from_logicid: parameter 0",
    ),
    "a missing binding": (
        lambda bindings: bindings.pop(0),
        "dcmi_init: declared but not bound",
    ),
    "an undeclared binding": (
        lambda bindings: bindings.append(("dcmi_get_device_pcie_info", c_int, (c_int,))),
        "dcmi_get_device_pcie_info: bound but not declared",
    ),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=str)
def test_the_check_catches_a_wrong_binding(
    declared: dict[str, tuple[Any, tuple[Any, ...]]], mutation: str
) -> None:
    mutate, expected = MUTATIONS[mutation]
    bindings = list(PROTOTYPES)
    mutate(bindings)
    problems = mismatches(tuple(bindings), declared)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


@pytest.mark.parametrize(
    ("declaration", "expected"),
    [
        ("unsigned int *phyid", POINTER(c_uint)),
        ("int *card_num", POINTER(c_int)),
        ("unsigned int vdevid", c_uint),
        ("enum dcmi_main_cmd main_cmd", c_int),
        ("enum dcmi_unit_type *device_type", POINTER(c_int)),
        ("unsigned char *error_info", c_char_p),
        ("const char *name", c_char_p),
        ("void *buf", c_void_p),
        ("unsigned long long *unit_mask", POINTER(c_ulonglong)),
        ("struct dcmi_hbm_info *hbm_info", POINTER(dcmi.HbmInfo)),
    ],
)
def test_c_declarations_map_to_ctypes(declaration: str, expected: Any) -> None:
    assert ctypes_type(declaration) is expected


@pytest.mark.parametrize(
    "declaration", ["int **list", "struct dcmi_hbm_info info", "float rate", "int list[4]"]
)
def test_a_declaration_without_a_mapping_is_an_error(declaration: str) -> None:
    with pytest.raises((ValueError, KeyError)):
        ctypes_type(declaration)


def test_the_loaded_library_carries_the_bindings(dcmi_library: ctypes.CDLL) -> None:
    library = DcmiLibrary(str(LIBRARY))
    for name, restype, argtypes in PROTOTYPES:
        function = library.function(name)
        assert function.restype is restype, name
        assert tuple(function.argtypes) == argtypes, name
    # ctypes now refuses an argument of the wrong type before the C function runs.
    with pytest.raises(ctypes.ArgumentError):
        library.call("dcmi_get_device_health", 0, 0, ctypes.byref(c_int()))
