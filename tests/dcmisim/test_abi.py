"""The ctypes bindings against the C header: struct layouts as the C compiler lays them out,
prototypes as the header declares them, and the library's exported symbols."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from ctypes import POINTER, c_char_p, c_int, c_uint, c_ulonglong, c_void_p
from pathlib import Path
from typing import Any

import pytest

from agent.hw.ascend import dcmi
from agent.hw.ascend.dcmi import PROTOTYPES, STRUCTS
from tests.dcmisim.dcmi import HEADER, LIBRARY


def probe_source() -> str:
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "dcmi_interface_api.h"', ""]
    lines.append("int main(void) {")
    for struct in STRUCTS:
        name = struct.c_name
        lines.append(f'    printf("{name} . 0 %zu\\n", sizeof(struct {name}));')
        for field_name, *_ in struct._fields_:
            lines.append(
                f'    printf("{name} {field_name} %zu %zu\\n", offsetof(struct {name}, '
                f"{field_name}), sizeof(((struct {name} *)0)->{field_name}));"
            )
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[int, int]]:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to lay out the header (the library build needs one too)")
    directory: Path = tmp_path_factory.mktemp("abi")
    (directory / "probe.c").write_text(probe_source())
    command = [compiler, "-std=gnu11", "-Wall", "-Werror", f"-I{HEADER.parent}"]
    subprocess.run([*command, "-o", "probe", "probe.c"], cwd=directory, check=True)
    output = subprocess.run(
        [str(directory / "probe")], capture_output=True, text=True, check=True
    ).stdout
    layout = {}
    for line in output.splitlines():
        struct, field_name, offset, size = line.split()
        layout[(struct, field_name)] = (int(offset), int(size))
    return layout


@pytest.mark.parametrize("struct", STRUCTS, ids=lambda struct: struct.c_name)
def test_ctypes_structs_match_the_header(
    c_layout: dict[tuple[str, str], tuple[int, int]], struct: type[dcmi.DcmiStruct]
) -> None:
    assert c_layout[(struct.c_name, ".")][1] == ctypes.sizeof(struct)
    for field_name, *_ in struct._fields_:
        described = getattr(struct, field_name)
        assert c_layout[(struct.c_name, field_name)] == (described.offset, described.size), (
            field_name
        )


STRUCT_TYPES = {struct.c_name: struct for struct in STRUCTS}


def ctypes_for(declaration: str) -> Any:
    """The ctypes type of one C parameter declaration from the header."""
    text = re.sub(r"\s+", " ", declaration.strip())
    pointer = text.count("*")
    base = re.sub(r"\s*\*\s*", " ", text).strip()
    base = " ".join(base.split()[:-1])  # drop the parameter name
    if base.startswith("const "):
        base = base[len("const ") :]
    if base.startswith("struct "):
        assert pointer == 1, declaration
        return POINTER(STRUCT_TYPES[base.split()[1]])
    scalar: dict[str, Any] = {
        "int": c_int,
        "unsigned int": c_uint,
        "unsigned long long": c_ulonglong,
        "char": ctypes.c_char,
        "unsigned char": ctypes.c_char,
        "void": None,
    }
    if base.startswith("enum "):
        kind: Any = c_int
    else:
        kind = scalar[base]
    if pointer == 0:
        return kind
    assert pointer == 1, declaration
    if kind is ctypes.c_char:
        return c_char_p
    if kind is None:
        return c_void_p
    return POINTER(kind)


def header_prototypes() -> dict[str, list[Any]]:
    text = HEADER.read_text()
    found = {}
    for match in re.finditer(r"DCMIDLLEXPORT int (\w+)\(([^)]*)\);", text):
        name, parameters = match.group(1), match.group(2).strip()
        found[name] = [] if parameters == "void" else [ctypes_for(p) for p in parameters.split(",")]
    return found


def test_ctypes_prototypes_match_the_header() -> None:
    declared = header_prototypes()
    assert sorted(declared) == sorted(name for name, _, _ in PROTOTYPES)
    for name, restype, argtypes in PROTOTYPES:
        assert restype is c_int, name
        assert declared[name] == list(argtypes), name


def test_the_library_exports_exactly_the_declared_functions(dcmi_library: ctypes.CDLL) -> None:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is not installed: cannot list the library's dynamic symbols")
    listing = subprocess.run(
        [nm, "-D", "--defined-only", str(LIBRARY)], capture_output=True, text=True, check=True
    ).stdout
    exported = sorted(line.split()[-1] for line in listing.splitlines() if " T " in line)
    assert exported == sorted(name for name, _, _ in PROTOTYPES)
    soname = subprocess.run(
        ["readelf", "-d", str(LIBRARY)], capture_output=True, text=True, check=False
    ).stdout
    assert "Library soname: [libdcmi.so]" in soname
