"""Fault injection on a simulated node: ``accelguard sim inject ...`` and the tests.

Writes the control files nvml-sim reads (docs/nvml-sim.md, "The simulation directory"), never
its ``state``. Every call validates all of its arguments first and raises
:class:`~agent.errors.ValidationError` without writing anything when one is wrong.

Invariants:

* ``DIR/xid`` only grows, by one complete line per ``write(2)`` on an ``O_APPEND`` descriptor:
  lines of concurrent injectors never interleave, and an event set never sees half an event
  (nvml-sim counts only newline-terminated lines of this file).
* ``DIR/health`` is replaced, never edited in place: its old lines plus the new ones go to a
  temporary file that is renamed over it, under the exclusive flock on ``DIR/state.lock``. A
  reader sees the file from before or after a whole injection (the two ECC counters of
  :func:`set_ecc` change together), and two injectors never lose each other's lines. A plain
  append could be read half-written, because nvml-sim also reads an unterminated last line of
  this file. The last line for a GPU and key wins, so earlier lines stay as a history.
* A lost GPU is marked in ``DIR/health`` before its XID 79 is appended: whoever receives the
  event already finds the GPU lost. nvml-sim synthesises no event of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Final

from agent.errors import HardwareError, ValidationError

# XIDs are the driver's small positive error numbers (its catalogue runs to a few hundred);
# anything past 16 bits is a typo.
MAX_XID: Final = 65535
# The driver's MIG capability table (proc/driver/nvidia-caps/mig-minors) has GPU instances 0-14
# per GPU and compute instances 0-7 per GPU instance.
MAX_GPU_INSTANCE_ID: Final = 14
MAX_COMPUTE_INSTANCE_ID: Final = 7
# NVML's ECC counters are 64-bit, and so is what nvml-sim reads for them.
MAX_ECC_COUNT: Final = (1 << 64) - 1
# Well past any data-centre GPU's shutdown temperature; a larger number is a typo.
MAX_TEMPERATURE_C: Final = 200
# "Fallen off the bus" (NVIDIA XID catalogue): what the driver logs when a GPU is lost.
XID_GPU_FALLEN_OFF_THE_BUS: Final = 79

_FILE_MODE: Final = 0o644


class EccKind(StrEnum):
    SBE = "sbe"  # single-bit, corrected
    DBE = "dbe"  # double-bit, uncorrected


_ECC_KEYS: Final = {
    EccKind.SBE: ("ecc_volatile_corrected", "ecc_aggregate_corrected"),
    EccKind.DBE: ("ecc_volatile_uncorrected", "ecc_aggregate_uncorrected"),
}


def inject_xid(
    sim_dir: Path | str, gpu: int, xid: int, gi: int | None = None, ci: int | None = None
) -> None:
    """An XID on ``gpu`` (in GPU instance ``gi`` / compute instance ``ci`` when given): every
    event set that registered the GPU for XID events receives it."""
    directory = Path(sim_dir)
    _check_gpu(directory, gpu)
    _check_int("xid", xid, 1, MAX_XID)
    if (gi is None) != (ci is None):
        raise ValidationError("give both a GPU instance and a compute instance id, or neither")
    line = f"{gpu} {xid}"
    if gi is not None and ci is not None:
        _check_int("GPU instance id", gi, 0, MAX_GPU_INSTANCE_ID)
        _check_int("compute instance id", ci, 0, MAX_COMPUTE_INSTANCE_ID)
        line += f" {gi} {ci}"
    _append_xid(directory, line + "\n")


def set_ecc(
    sim_dir: Path | str, gpu: int, kind: EccKind | str, count: int, aggregate: bool = True
) -> None:
    """Sets the volatile ECC error counter of ``kind`` (sbe: corrected, dbe: uncorrected) to
    ``count``, and the aggregate (lifetime) counter too unless ``aggregate`` is False."""
    directory = Path(sim_dir)
    _check_gpu(directory, gpu)
    try:
        ecc_kind = EccKind(kind)
    except ValueError:
        raise ValidationError(f"ECC error kind {kind!r}: expected 'sbe' or 'dbe'") from None
    _check_int("ECC error count", count, 0, MAX_ECC_COUNT)
    volatile, lifetime = _ECC_KEYS[ecc_kind]
    values = {volatile: count, lifetime: count} if aggregate else {volatile: count}
    _append_health(directory, gpu, values)


def set_remap(sim_dir: Path | str, gpu: int, pending: bool, failure: bool) -> None:
    """Sets the row-remapping flags: a remapping waits for a GPU reset (``pending``), a
    remapping has failed (``failure``)."""
    directory = Path(sim_dir)
    _check_gpu(directory, gpu)
    _check_bool("pending", pending)
    _check_bool("failure", failure)
    _append_health(
        directory, gpu, {"remapping_pending": int(pending), "remapping_failure": int(failure)}
    )


def set_lost(sim_dir: Path | str, gpu: int, lost: bool = True) -> None:
    """Makes ``gpu`` fall off the bus (NVML_ERROR_GPU_IS_LOST from every call on it) and appends
    its XID 79; ``lost=False`` brings it back, with no event."""
    directory = Path(sim_dir)
    _check_gpu(directory, gpu)
    _check_bool("lost", lost)
    _append_health(directory, gpu, {"lost": int(lost)})
    if lost:
        _append_xid(directory, f"{gpu} {XID_GPU_FALLEN_OFF_THE_BUS}\n")


def set_temperature(sim_dir: Path | str, gpu: int, celsius: int) -> None:
    """Sets the GPU's core temperature, in whole degrees Celsius."""
    directory = Path(sim_dir)
    _check_gpu(directory, gpu)
    _check_int("temperature (degrees C)", celsius, 0, MAX_TEMPERATURE_C)
    _append_health(directory, gpu, {"temperature_c": celsius})


# ---- validation -------------------------------------------------------------------------------


def gpu_count(sim_dir: Path | str) -> int:
    """How many GPUs ``DIR/topology`` declares (``gpu <index> <model> mig=<0|1>`` lines)."""
    topology = Path(sim_dir) / "topology"
    try:
        text = topology.read_text(errors="replace")
    except FileNotFoundError:
        raise ValidationError(
            f"{sim_dir} is not a simulated node's NVML directory (no topology); "
            "`accelguard sim init` makes one"
        ) from None
    except OSError as error:
        raise HardwareError(f"cannot read {topology}: {error.strerror}") from error
    return sum(1 for line in text.splitlines() if line.split("#", 1)[0].split()[:1] == ["gpu"])


def _check_gpu(sim_dir: Path, gpu: int) -> None:
    count = gpu_count(sim_dir)
    if isinstance(gpu, bool) or not isinstance(gpu, int):
        raise ValidationError(f"GPU index {gpu!r}: expected an integer")
    if not 0 <= gpu < count:
        raise ValidationError(f"GPU index {gpu} does not exist (this node has {count})")


def _check_int(what: str, value: int, lowest: int, highest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what} {value!r}: expected an integer")
    if not lowest <= value <= highest:
        raise ValidationError(f"{what} {value} is out of range ({lowest}-{highest})")


def _check_bool(what: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ValidationError(f"{what} {value!r}: expected True or False")


# ---- the control files ------------------------------------------------------------------------


def _append_xid(sim_dir: Path, line: str) -> None:
    path = sim_dir / "xid"
    data = line.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as error:
        raise HardwareError(f"cannot append to {path}: {error.strerror}") from error
    if written != len(data):
        # Only a full disk shortens a write to a regular file; the line is then incomplete and
        # nvml-sim will not count it until a newline follows.
        raise HardwareError(f"cannot append to {path}: short write ({written} of {len(data)})")


@contextlib.contextmanager
def _state_lock(sim_dir: Path) -> Iterator[None]:
    # The contract: opened without truncating, exclusive flock, released by closing.
    with (sim_dir / "state.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _append_health(sim_dir: Path, gpu: int, values: Mapping[str, int]) -> None:
    path = sim_dir / "health"
    lines = "".join(f"{gpu} {key} {value}\n" for key, value in values.items()).encode()
    try:
        with _state_lock(sim_dir):
            try:
                old = path.read_bytes()
            except FileNotFoundError:
                old = b""
            if old and not old.endswith(b"\n"):
                old += b"\n"  # another writer's unterminated line stays a line of its own
            fd, temporary = tempfile.mkstemp(prefix=".health.", dir=sim_dir)
            try:
                with os.fdopen(fd, "wb") as new:
                    new.write(old + lines)
                    os.fchmod(new.fileno(), _FILE_MODE)
                Path(temporary).replace(path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
    except OSError as error:
        raise HardwareError(f"cannot update {path}: {error.strerror}") from error
