"""The scrub boundary: what to scrub, how, and what a scrub proved.

A scrub runs in a short-lived worker process per partition (``agent/scrub/worker.py``), never in
the daemon: a hung or crashed scrub is then a process the daemon kills, and the daemon holds no
CUDA context. Backends (``simmem`` for the simulated node, ``cuda`` on hardware) implement
``ScrubBackend``; the lease state machine only sees ``ScrubResult``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from agent.errors import ScrubError

PolicyName = Literal["zero", "multi-pass"]

# Patterns as 32-bit words (cuMemsetD32 writes 32-bit values). zero: one write + verify.
# multi-pass: alternating bits both ways, then zero, each pass verified.
POLICY_PATTERNS: dict[str, tuple[int, ...]] = {
    "zero": (0x00000000,),
    "multi-pass": (0x55555555, 0xAAAAAAAA, 0x00000000),
}
# The policy a certificate names for a device that can only be reset (a /dev/accel device): no
# passes, never verified (docs/npu.md).
RESET_POLICY = "reset"
# A partition's kind (PartitionRecord.kind): whole GPU, MIG instance, whole NPU, vNPU, accel.
ScrubKind = Literal["gpu", "mig", "npu", "vnpu", "accel"]
# What each worker backend can scrub: the CUDA worker has no NPU path (it would need CANN's
# aclrtMemset), and nothing reads an accel device's memory back (it is reset instead).
BACKEND_KINDS: dict[str, frozenset[str]] = {
    "cuda": frozenset({"gpu", "mig"}),
    "simmem": frozenset({"gpu", "mig", "npu", "vnpu"}),
}


@dataclass(frozen=True)
class ScrubTarget:
    partition_uuid: str
    gpu_uuid: str
    gpu_index: int
    kind: ScrubKind
    # What CUDA_VISIBLE_DEVICES names for this partition: the GPU UUID or the MIG UUID.
    visible_device: str
    # Bytes of device memory the partition owns (the coverage denominator).
    total_bytes: int
    # A MIG instance's memory slices (placement start and size); None for a whole GPU. The
    # simulated memory backend maps them to a byte range of its memory file.
    placement_start: int | None = None
    placement_size: int | None = None
    # Filled in by a backend's ``resolve`` inside the worker (simulated node: the GPU's memory
    # file and the partition's byte range in it).
    memory_file: str = ""
    # Memory units the partition owns when they are not one placement (a vNPU's units), and how
    # many units its device has (0: the GPU's 8 MIG memory slices).
    units: tuple[int, ...] = ()
    unit_total: int = 0
    # (offset, bytes) of each range of the memory file (filled in by ``resolve``).
    ranges: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScrubTarget:
        try:
            return cls(**data)
        except TypeError as error:
            raise ScrubError(f"malformed scrub target: {error}") from error


@dataclass(frozen=True)
class PassResult:
    pattern: int
    bytes_written: int
    bytes_verified: int
    write_seconds: float
    verify_seconds: float
    mismatched_bytes: int


@dataclass(frozen=True)
class ScrubResult:
    backend: str
    policy: str
    total_bytes: int
    passes: tuple[PassResult, ...] = field(default_factory=tuple)
    detail: str = ""

    @property
    def bytes_written(self) -> int:
        return min((p.bytes_written for p in self.passes), default=0)

    @property
    def bytes_verified(self) -> int:
        return min((p.bytes_verified for p in self.passes), default=0)

    @property
    def coverage(self) -> float:
        if self.total_bytes <= 0:
            return 0.0
        return self.bytes_verified / self.total_bytes

    @property
    def verified(self) -> bool:
        """True only if every pass ran, wrote and verified bytes, and found no mismatch."""
        return len(self.passes) > 0 and all(
            p.mismatched_bytes == 0 and p.bytes_verified > 0 for p in self.passes
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "policy": self.policy,
            "total_bytes": self.total_bytes,
            "passes": [asdict(p) for p in self.passes],
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScrubResult:
        try:
            return cls(
                backend=str(data["backend"]),
                policy=str(data["policy"]),
                total_bytes=int(data["total_bytes"]),
                passes=tuple(PassResult(**p) for p in data["passes"]),
                detail=str(data.get("detail", "")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ScrubError(f"malformed scrub result from worker: {error}") from error


class ScrubBackend(Protocol):
    """Overwrite and verify a partition's memory. Runs inside the worker process."""

    name: str

    def resolve(self, target: ScrubTarget) -> ScrubTarget:
        """The target as this backend reaches it (byte ranges, sizes); the result covers it."""
        ...

    def scrub(self, target: ScrubTarget, patterns: tuple[int, ...]) -> tuple[PassResult, ...]: ...
