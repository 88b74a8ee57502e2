"""Arbitrary bytes in ``dev``, ``vendor`` and ``device``: the backend answers with a
HardwareError or with exactly what the files say, never with another exception."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import HardwareError
from tests.accel.tree import AccelNode, make_accel_node
from tests.fuzzing import fuzz

_NEAR_VALID_DEV = [
    b"261:0",
    b"261:0\n",
    b"261:0\n\n",
    b" 261:0",
    b"261:00",
    b"0261:0",
    b"261:1",
    b"261:\xd9\xa0",
    b"\xd9\xa2\xd9\xa6\xd9\xa1:0",
    b"261:99999999",
    b"",
    b"\n",
]
_NEAR_VALID_ID = [
    b"0x1da3\n",
    b"0x1DA3",
    b"0x1da",
    b"0x1da30",
    b"1da3",
    b"0X1da3",
    b"0x 1da",
    b"0x1da3\r\n",
    b"0x\xef\xbc\x91da3",
    b"\x00" * 4096,
    b"0" * 4097,
]


def _content(valid: st.SearchStrategy[bytes], near_valid: list[bytes]) -> st.SearchStrategy[bytes]:
    # Half the draws valid, so that accepted trees (and what they answer) are tested as often
    # as refused ones.
    garbage = st.one_of(
        st.sampled_from(near_valid),
        st.binary(max_size=64),
        st.binary(min_size=4090, max_size=4100),
        st.text(alphabet="0123456789abcdefx:\n", max_size=12).map(str.encode),
    )
    return st.booleans().flatmap(lambda keep_valid: valid if keep_valid else garbage)


_VALID_DEV = st.sampled_from([b"261:0", b"261:0\n"])
_VALID_ID = st.builds(
    lambda value, upper, newline: (f"0x{value:04X}" if upper else f"0x{value:04x}").encode()
    + b"\n" * newline,
    st.integers(0, 0xFFFF),
    st.booleans(),
    st.booleans(),
)
_DEV_BYTES = _content(_VALID_DEV, _NEAR_VALID_DEV)
_ID_BYTES = _content(_VALID_ID, _NEAR_VALID_ID)


def _id_from(data: bytes) -> int | None:
    """What a PCI id file means: "0x" and four hex digits, one optional newline."""
    text = data.removesuffix(b"\n")
    if (
        len(text) == 6
        and text[:2] == b"0x"
        and all(chr(c) in "0123456789abcdefABCDEF" for c in text[2:])
    ):
        return int(text[2:], 16)
    return None


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> AccelNode:
    return make_accel_node(tmp_path_factory.mktemp("accel-fuzz"), count=1)


@fuzz(2000)
@given(dev=_DEV_BYTES, vendor=_ID_BYTES, device=_ID_BYTES)
def test_arbitrary_sysfs_bytes(
    fuzz_node: AccelNode, dev: bytes, vendor: bytes, device: bytes
) -> None:
    function = fuzz_node.function(0)
    (fuzz_node.entry(0) / "dev").write_bytes(dev)
    (function / "vendor").write_bytes(vendor)
    (function / "device").write_bytes(device)
    backend = fuzz_node.backend
    try:
        devices = backend.inventory()
    except HardwareError as error:
        assert str(error), "a HardwareError must say what failed"
        assert re.search(r"/(dev|vendor|device)\b", str(error)), str(error)
        return
    # Accepted: then every file said exactly one thing, and the answer is that thing.
    assert dev.removesuffix(b"\n") == b"261:0"
    vendor_id, device_id = _id_from(vendor), _id_from(device)
    assert vendor_id is not None and device_id is not None
    [found] = devices
    assert found.pci_device_id == device_id << 16 | vendor_id
    assert found.name == f"habanalabs {vendor_id:04x}:{device_id:04x}"
    assert found.minor == 0
    assert backend.nodes(found)[0].minor == 0
