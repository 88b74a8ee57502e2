"""The committed PTX: well-formed, loadable by the drivers we support, what scrub.cu builds to,
and what agent/scrub/cuda/kernels.py launches (entry names, parameter types, block size).

The CUDA toolkit is optional in CI: the tests that need nvcc, ptxas or cuda.h skip, saying so,
where it is missing.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.scrub.cuda import driver, kernels

REPO = Path(__file__).resolve().parents[2]
NATIVE = REPO / "native" / "scrub"
PTX = NATIVE / "scrub.ptx"

_ENTRY = re.compile(r"^\.visible \.entry (\w+)\(\s*(.*?)\)\s*\.maxntid (\d+), 1, 1$", re.M | re.S)
_PARAMETER = re.compile(r"\.param \.(u32|u64|b32|b64) \w+")
_PTX_BITS = {"u32": 32, "b32": 32, "u64": 64, "b64": 64}


def ptx_text() -> str:
    return PTX.read_text(encoding="ascii")


def test_header_declares_an_isa_every_supported_driver_loads() -> None:
    text = ptx_text()
    # PTX ISA 7.0 (CUDA 11.0, driver R450+) is the first with sm_80; the driver JIT-compiles
    # compute_80 PTX for sm_90 (H100) and later.
    assert re.search(r"^\.version 7\.0$", text, re.M)
    assert re.search(r"^\.target sm_80$", text, re.M)
    assert re.search(r"^\.address_size 64$", text, re.M)
    assert len(re.findall(r"^\.version ", text, re.M)) == 1


def test_entries_are_the_kernels_cuda_py_launches() -> None:
    entries = {name: (params, int(threads)) for name, params, threads in _ENTRY.findall(ptx_text())}
    assert sorted(entries) == sorted(kernels.KERNEL_NAMES)
    for name, (parameters, max_threads) in entries.items():
        declared = [_PTX_BITS[kind] for kind in _PARAMETER.findall(parameters)]
        launched = [ctypes.sizeof(kind) * 8 for kind in kernels.KERNEL_PARAMETERS[name]]
        assert declared == launched, name
        assert max_threads == kernels.BLOCK_THREADS, name


def test_ptx_is_plain_ascii_text_without_a_nul() -> None:
    # cuModuleLoadDataEx reads PTX as a NUL-terminated string.
    data = PTX.read_bytes()
    assert b"\x00" not in data
    data.decode("ascii")


def test_cuda_py_loads_the_committed_ptx_from_the_checkout() -> None:
    assert kernels.scrub_ptx() == PTX.read_bytes()


def test_kernels_only_read_global_memory_outside_their_counters() -> None:
    """A verify kernel that wrote the scrubbed memory could "fix" what it is checking. The only
    global writes are the atomics on the counter buffers."""
    text = ptx_text()
    assert not re.search(r"\bst\.global", text)
    assert re.findall(r"\bld\.global\.cs\.v4\.u32\b", text), "vectorised streaming loads"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_ptxas_accepts_the_committed_ptx(tmp_path: Path, arch: str) -> None:
    """ptxas enforces that every instruction exists in the declared ISA version, which is what
    makes lowering nvcc's .version stamp (build.sh) safe."""
    ptxas = shutil.which(os.environ.get("PTXAS", "ptxas"))
    if ptxas is None:
        pytest.skip("ptxas (CUDA toolkit) is not installed here")
    subprocess.run(
        [ptxas, f"-arch={arch}", "-o", str(tmp_path / "scrub.cubin"), str(PTX)],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _nvcc_release(nvcc: str) -> str:
    output = subprocess.run(
        [nvcc, "--version"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    match = re.search(r"Cuda compilation tools, release [\d.]+, V[\d.]+", output)
    assert match, output
    return match.group(0)


def test_committed_ptx_is_what_scrub_cu_builds_to(tmp_path: Path) -> None:
    nvcc = shutil.which(os.environ.get("NVCC", "nvcc"))
    if nvcc is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed here")
    header = re.search(r"^// (Cuda compilation tools, release [\d.]+, V[\d.]+)$", ptx_text(), re.M)
    assert header, "the committed PTX lost nvcc's header"
    release = _nvcc_release(nvcc)
    if release != header.group(1):
        pytest.skip(
            f"the committed PTX was built by '{header.group(1)}' and this nvcc is '{release}': "
            "code generation differs between releases, so only that release can reproduce it"
        )
    rebuilt = tmp_path / "scrub.ptx"
    subprocess.run(
        [str(NATIVE / "build.sh"), str(rebuilt)],
        check=True,
        capture_output=True,
        timeout=300,
        env={**os.environ, "NVCC": nvcc},
    )
    assert rebuilt.read_bytes() == PTX.read_bytes(), (
        "native/scrub/scrub.ptx is stale: run native/scrub/build.sh and commit the result"
    )


# ------------------------------------------------------------------------------------------------
# The ctypes signatures in agent/scrub/cuda/driver.py against the CUDA header (no driver in CI).

_HANDLES = {"CUcontext", "CUmodule", "CUfunction", "CUevent", "CUstream"}
_WIDE = {"CUdeviceptr", "size_t"}


def _header() -> Path:
    for root in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", "/usr"):
        candidate = Path(root or "/nonexistent", "include", "cuda.h")
        if candidate.is_file():
            return candidate
    pytest.skip("cuda.h (CUDA toolkit) is not installed here")


def _declared_parameters(header: str, symbol: str) -> list[str]:
    """Parameter declarations of ``symbol`` as cuda.h spells it (plain names are #defined to
    their _v2 symbols; the legacy section declares the old ones under their own names)."""
    plain = re.sub(r"_v2$", "", symbol)
    candidates = [symbol, plain]
    for name in candidates:
        found = re.search(rf"CUresult CUDAAPI {name}\((.*?)\);", header, re.S)
        if found:
            text = " ".join(found.group(1).split())
            return [] if text == "void" else [p.strip() for p in text.split(",")]
    raise AssertionError(f"{symbol} is not declared in cuda.h")


@pytest.mark.parametrize("symbol", sorted(driver.DRIVER_SIGNATURES))
def test_ctypes_signature_matches_cuda_h(symbol: str) -> None:
    header = _header().read_text(encoding="utf-8", errors="replace")
    declared = _declared_parameters(header, symbol)
    argtypes = driver.DRIVER_SIGNATURES[symbol]
    assert len(declared) == len(argtypes), (symbol, declared)
    for parameter, argtype in zip(declared, argtypes, strict=True):
        c_type = parameter.split()[0] if parameter.split()[0] != "const" else parameter.split()[1]
        is_pointer = "*" in parameter or c_type in _HANDLES
        python_pointer = argtype in (ctypes.c_void_p, ctypes.c_char_p) or issubclass(
            argtype, ctypes._Pointer
        )
        assert is_pointer == python_pointer, (symbol, parameter, argtype)
        if not is_pointer:
            width = 8 if c_type in _WIDE else 4
            assert ctypes.sizeof(argtype) == width, (symbol, parameter, argtype)
