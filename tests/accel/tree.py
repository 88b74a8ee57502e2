"""The simulated accel node the tests run against, shared by the fixture and the fuzz tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.hw.accel import AccelBackend
from agent.sim.accel import init_accel_tree


@dataclass(frozen=True)
class AccelNode:
    sys_root: Path
    dev_root: Path

    @property
    def backend(self) -> AccelBackend:
        return AccelBackend(sys_root=self.sys_root, dev_root=self.dev_root)

    def entry(self, index: int) -> Path:
        """``class/accel/accelN``, as the backend reaches it."""
        return self.sys_root / "class" / "accel" / f"accel{index}"

    def function(self, index: int) -> Path:
        """The PCI function directory behind ``accelN``."""
        return (self.entry(index) / "device").resolve()


def make_accel_node(root: Path, count: int = 2) -> AccelNode:
    node = AccelNode(root / "sys", root / "dev")
    init_accel_tree(node.sys_root, count, node.dev_root)
    return node
