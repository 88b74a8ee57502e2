"""HotplugFilter: which uevent properties concern accelerators, fuzzed with the kernel's formats."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError
from agent.hw.hotplug import DEFAULT_FILTER, HotplugFilter, HotplugMonitor, select_uevent_source


async def _ignore(_event: object) -> None:
    return None


def _pci_properties(vendor: int, device: int, class_code: int) -> dict[str, str]:
    # drivers/pci/pci-driver.c pci_uevent() formats.
    return {"PCI_CLASS": f"{class_code:04X}", "PCI_ID": f"{vendor:04X}:{device:04X}"}


def test_default_filter_keeps_nvidia_gpus() -> None:
    h100 = _pci_properties(0x10DE, 0x2330, 0x030200)
    vga = _pci_properties(0x10DE, 0x2204, 0x030000)
    assert DEFAULT_FILTER.matches("pci", h100)
    assert DEFAULT_FILTER.matches("pci", vga)


def test_default_filter_drops_other_pci_functions() -> None:
    nvidia_hdmi_audio = _pci_properties(0x10DE, 0x1AEF, 0x040300)
    amd_gpu = _pci_properties(0x1002, 0x740F, 0x038000)
    host_bridge = {"PCI_CLASS": "60000", "PCI_ID": "8086:0D57"}  # as read on the test VM
    assert not DEFAULT_FILTER.matches("pci", nvidia_hdmi_audio)
    assert not DEFAULT_FILTER.matches("pci", amd_gpu)
    assert not DEFAULT_FILTER.matches("pci", host_bridge)


def test_accelerator_subsystems_pass_without_pci_properties() -> None:
    assert DEFAULT_FILTER.matches("accel", {"DEVNAME": "accel/accel0"})
    assert DEFAULT_FILTER.matches("nvidia", {})
    assert not DEFAULT_FILTER.matches("drm", {"DEVNAME": "dri/card0"})
    assert not DEFAULT_FILTER.matches("cpu", _pci_properties(0x10DE, 0x2330, 0x030200))


def test_pci_event_without_readable_class_or_vendor_is_kept() -> None:
    assert DEFAULT_FILTER.matches("pci", {})
    assert DEFAULT_FILTER.matches("pci", {"PCI_CLASS": "zz", "PCI_ID": "10DE"})


def test_none_means_any() -> None:
    any_pci = HotplugFilter(subsystems={"pci"}, pci_vendor_ids=None, pci_class_prefixes=None)
    assert any_pci.matches("pci", _pci_properties(0x1AF4, 0x1041, 0x020000))
    assert not any_pci.matches("accel", {})


@pytest.mark.parametrize(
    "arguments",
    [
        {"subsystems": set()},
        {"subsystems": {""}},
        {"pci_vendor_ids": {0x10000}},
        {"pci_vendor_ids": {-1}},
        {"pci_vendor_ids": {"10de"}},
        {"pci_class_prefixes": {""}},
        {"pci_class_prefixes": {"0x03"}},
        {"pci_class_prefixes": {"0302000"}},
        {"pci_class_prefixes": {3}},
    ],
)
def test_invalid_filter_is_a_config_error(arguments: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="hotplug filter"):
        HotplugFilter(**arguments)  # type: ignore[arg-type]


def test_invalid_monitor_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="coalesce_seconds"):
        HotplugMonitor(_ignore, coalesce_seconds=-1)
    with pytest.raises(ConfigError, match="receive_buffer_bytes"):
        HotplugMonitor(_ignore, receive_buffer_bytes=0)


def test_source_follows_udevd_control_socket(tmp_path: Path) -> None:
    control = tmp_path / "control"
    assert select_uevent_source(control) == "kernel"
    control.touch()
    assert select_uevent_source(control) == "udev"


@pytest.mark.slow
@settings(max_examples=500, deadline=None)
@given(
    vendor=st.integers(0, 0xFFFF),
    device=st.integers(0, 0xFFFF),
    class_code=st.integers(0, 0xFFFFFF),
    vendors=st.none() | st.frozensets(st.integers(0, 0xFFFF), max_size=3),
    prefixes=st.none()
    | st.frozensets(st.text("0123456789abcdefABCDEF", min_size=1, max_size=6), max_size=3),
    lowercase=st.booleans(),
)
def test_kernel_formatted_properties_match_exactly_the_configured_devices(
    vendor: int,
    device: int,
    class_code: int,
    vendors: frozenset[int] | None,
    prefixes: frozenset[str] | None,
    lowercase: bool,
) -> None:
    properties = _pci_properties(vendor, device, class_code)
    if lowercase:
        properties = {key: value.lower() for key, value in properties.items()}
    hotplug_filter = HotplugFilter(
        subsystems={"pci"}, pci_vendor_ids=vendors, pci_class_prefixes=prefixes
    )
    vendor_ok = vendors is None or vendor in vendors
    class_ok = prefixes is None or any(
        f"{class_code:06x}".startswith(prefix.lower()) for prefix in prefixes
    )
    assert hotplug_filter.matches("pci", properties) == (vendor_ok and class_ok)


# Kernel-shaped values most of the time, arbitrary text the rest: what a parser of uevent
# properties must survive (udevd forwards whatever a driver or a rule put there).
_HEX_TEXT = st.text("0123456789abcdefABCDEF:x ", max_size=10)
_PROPERTY_VALUE = _HEX_TEXT | st.text(max_size=12)


# Thousands of examples (house rule for parsers) take a minute on a loaded 2-core runner.
@pytest.mark.slow
@settings(max_examples=1000, deadline=None)
@given(
    subsystem=st.sampled_from(["pci", "accel", "nvidia", "drm", ""]),
    properties=st.fixed_dictionaries(
        {}, optional={"PCI_CLASS": _PROPERTY_VALUE, "PCI_ID": _PROPERTY_VALUE}
    ),
)
def test_any_properties_give_an_answer(subsystem: str, properties: dict[str, str]) -> None:
    assert DEFAULT_FILTER.matches(subsystem, properties) in (True, False)
