from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import HardwareError, ValidationError
from agent.hw.devnodes import DeviceNodeMap, char_majors, mig_minors
from agent.sim.node import SimNode, init_sim_node, parse_topology


def test_sim_init_builds_real_device_nodes(sim_node: SimNode) -> None:
    config = load_config(sim_node.config_path)
    majors = char_majors(config.devices.proc_root)
    assert majors["nvidia-frontend"] == 195
    for name, major, minor in [
        ("nvidiactl", 195, 255),
        ("nvidia0", 195, 0),
        ("nvidia1", 195, 1),
        ("nvidia-uvm", majors["nvidia-uvm"], 0),
        ("nvidia-uvm-tools", majors["nvidia-uvm"], 1),
    ]:
        info = (config.devices.dev_root / name).lstat()
        assert stat.S_ISCHR(info.st_mode)
        assert (os.major(info.st_rdev), os.minor(info.st_rdev)) == (major, minor)
    # No driver sits behind these majors: opening is refused by the device, not the cgroup.
    with pytest.raises(OSError) as raised:
        os.open(config.devices.dev_root / "nvidia0", os.O_RDWR)
    assert raised.value.errno == 6  # ENXIO


def test_partition_nodes_come_from_proc_tables(sim_node: SimNode) -> None:
    config = load_config(sim_node.config_path)
    nodes = DeviceNodeMap(config.devices.dev_root, config.devices.proc_root)
    minors = mig_minors(config.devices.proc_root)
    caps_major = char_majors(config.devices.proc_root)["nvidia-caps"]
    whole = nodes.gpu_nodes(1)
    assert [n.path.name for n in whole] == [
        "nvidiactl",
        "nvidia-uvm",
        "nvidia-uvm-tools",
        "nvidia1",
    ]
    mig = nodes.mig_nodes(1, 2, 0)
    assert mig[:4] == whole
    assert [(n.major, n.minor) for n in mig[4:]] == [
        (caps_major, minors["gpu1/gi2/access"]),
        (caps_major, minors["gpu1/gi2/ci0/access"]),
    ]
    for node in mig:
        info = node.path.lstat()
        assert (os.major(info.st_rdev), os.minor(info.st_rdev)) == (node.major, node.minor)


def test_sim_init_is_idempotent_and_refuses_another_topology(tmp_path: Path) -> None:
    first = init_sim_node(tmp_path / "n", "a100x2")
    again = init_sim_node(tmp_path / "n", "a100x2")
    assert first.config_path.read_text() == again.config_path.read_text()
    with pytest.raises(ValidationError, match="another topology"):
        init_sim_node(tmp_path / "n", "h100x1")


@pytest.mark.parametrize("text", ["h100", "h100x0", "h100x9", "v100x1", "h100x8,a100x1", ""])
def test_bad_topology_is_rejected(text: str) -> None:
    with pytest.raises(ValidationError, match="topology"):
        parse_topology(text)


def test_missing_driver_tables_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "driver" / "nvidia-caps").mkdir(parents=True)
    (tmp_path / "devices").write_text("Character devices:\n195 nvidia-frontend\n")
    nodes = DeviceNodeMap(Path("/dev"), tmp_path)
    with pytest.raises(HardwareError, match="no nvidia-uvm entry"):
        nodes.gpu_nodes(0)
    (tmp_path / "driver" / "nvidia-caps" / "mig-minors").write_text("gpu0/gi1/access x\n")
    with pytest.raises(HardwareError, match="mig-minors:1"):
        mig_minors(tmp_path)
    with pytest.raises(HardwareError, match="cannot read"):
        char_majors(tmp_path / "absent")
