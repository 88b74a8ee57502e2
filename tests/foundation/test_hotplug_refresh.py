"""A real kernel uevent on a matching device makes the running agent refresh its inventory."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from tests.support import RunningAgent, machine_uevents


def _pci_device() -> tuple[Path, str, str] | None:
    for device in sorted(Path("/sys/bus/pci/devices").glob("*")):
        try:
            vendor = (device / "vendor").read_text().strip()
            pci_class = (device / "class").read_text().strip()
        except OSError:
            continue
        if (device / "uevent").exists():
            return device, vendor, pci_class[2:4]
    return None


def test_uevent_triggers_inventory_refresh(agent: RunningAgent) -> None:
    found = _pci_device()
    if found is None:
        pytest.skip("no PCI device with a uevent file on this machine")
    device, vendor, class_prefix = found
    agent.stop()
    text = agent.config_path.read_text()
    text = text.replace("[hotplug]\nenabled = false", "[hotplug]\nenabled = true")
    text = text.replace('pci_vendor_ids = ["0x10de"]', f'pci_vendor_ids = ["{vendor}"]')
    text = text.replace('pci_class_prefixes = ["03"]', f'pci_class_prefixes = ["{class_prefix}"]')
    text = text.replace('level = "info"', 'level = "debug"')
    agent.config_path.write_text(text)
    agent.start()
    time.sleep(1)  # let the monitor subscribe; the check below does not depend on it
    tag = uuid.uuid4()
    deadline = time.monotonic() + 30
    with machine_uevents():
        while time.monotonic() < deadline:
            (device / "uevent").write_text(f"change {tag} ACCELGUARDTEST=1")
            events = [json.loads(ln) for ln in agent.log().splitlines() if ln.startswith("{")]
            seen = [
                i
                for i, e in enumerate(events)
                if e["event"] == "hotplug_event" and e["device"] == str(device.resolve())
            ]
            if seen and any(e["event"] == "inventory_refreshed" for e in events[seen[0] + 1 :]):
                return
            time.sleep(0.5)
    raise AssertionError(f"no hotplug-driven refresh:\n{agent.log()[-3000:]}")
