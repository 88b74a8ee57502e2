"""State shared between processes through DIR/state, the mutation counter, and crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.dcmisim import dcmi
from tests.dcmisim.conftest import MakeNode
from tests.dcmisim.dcmi import DCMI_OK, INVALID_PARAMETER, REPO, SimNode, create, destroy, vnpu_ids


def test_a_second_process_sees_the_vnpus_this_one_created(node910: SimNode) -> None:
    lib = node910.lib
    assert create(lib, 0, b"vir08") == (DCMI_OK, 100)
    assert create(lib, 6, b"vir16") == (DCMI_OK, 196)
    seen = node910.run_python(
        """
        result = [dcmi.vnpu_ids(lib, card) for card in range(8)]
        code, answer = dcmi.query(lib, 6, 196)
        result.append([code, answer.query_info.name.decode()])
        """
    )
    assert seen == [[100], [], [], [], [], [], [196], [], [0, "vir16"]]


def test_this_process_sees_another_ones_changes_without_a_new_init(node910b: SimNode) -> None:
    lib = node910b.lib
    assert create(lib, 1, b"vir05_1c_16g") == (DCMI_OK, 116)
    node910b.run_python(
        """
        assert dcmi.destroy(lib, 1, 116) == 0
        assert dcmi.create(lib, 1, b"vir10_3c_32g") == (0, 116)
        """
    )
    code, answer = dcmi.query(lib, 1, 116)
    assert (code, answer.query_info.name) == (DCMI_OK, b"vir10_3c_32g")


def test_a_restarted_process_continues_where_the_last_one_stopped(node910: SimNode) -> None:
    first = node910.run_python("result = [dcmi.create(lib, 0, b'vir04') for _ in range(2)]")
    second = node910.run_python("result = [dcmi.create(lib, 0, b'vir04'), dcmi.vnpu_ids(lib, 0)]")
    assert first == [[0, 100], [0, 101]]
    assert second == [[0, 102], [100, 101, 102]]
    assert "serial 3\n" in node910.state()


def test_the_counter_counts_every_create_and_destroy_and_nothing_else(node910: SimNode) -> None:
    lib = node910.lib
    assert node910.counter() == 0
    dcmi.card_list(lib)
    dcmi.total_resource(lib, 0)
    dcmi.query(lib, 0, 100)
    assert node910.counter() == 0
    assert create(lib, 0, b"vir16")[0] == DCMI_OK
    assert create(lib, 0, b"vir99")[0] == INVALID_PARAMETER  # failures count too
    assert destroy(lib, 0, 100) == DCMI_OK
    assert destroy(lib, 0, 100) == dcmi.DEVICE_NOT_EXIST
    assert node910.counter() == 4
    node910.run_python("dcmi.create(lib, 3, b'vir02')")
    assert node910.counter() == 5


CREATOR = """
import ctypes, json, sys
sys.path.insert(0, {repo!r})
from tests.dcmisim import dcmi
lib = dcmi.load()
assert lib.dcmi_init() == 0
print(json.dumps([dcmi.create(lib, 0, b"vir02") for _ in range(10)]))
"""


def test_concurrent_creators_never_oversubscribe_a_chip(node910: SimNode) -> None:
    # Four processes race for one 32-core chip with ten vir02 each: sixteen fit.
    creators = [
        subprocess.Popen(
            [sys.executable, "-c", CREATOR.format(repo=str(REPO))],
            env=node910.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results: list[tuple[int, int]] = []
    for creator in creators:
        out, err = creator.communicate(timeout=120)
        assert creator.returncode == 0, err
        results.extend(tuple(pair) for pair in json.loads(out))
    created = sorted(vdev_id for code, vdev_id in results if code == DCMI_OK)
    assert created == list(range(100, 116))
    assert sorted(code for code, _ in results if code != DCMI_OK) == [INVALID_PARAMETER] * 24
    assert vnpu_ids(node910.lib, 0) == created
    assert node910.counter() == 40


CHURN = """
import sys
sys.path.insert(0, {repo!r})
from tests.dcmisim import dcmi
lib = dcmi.load()
assert lib.dcmi_init() == 0
while True:
    for template in (b"vir08", b"vir04", b"vir16", b"vir02"):
        dcmi.create(lib, 0, template)
    for vdev_id in (100, 102, 101, 103):
        dcmi.destroy(lib, 0, vdev_id)
"""


@pytest.mark.parametrize("fsync", ["1", "0"])
def test_a_writer_killed_at_any_point_leaves_a_valid_state(node910: SimNode, fsync: str) -> None:
    for _ in range(3):
        start = node910.counter()
        churn = subprocess.Popen(
            [sys.executable, "-c", CHURN.format(repo=str(REPO))],
            env={**node910.env, "DCMI_SIM_FSYNC": fsync},
            stderr=subprocess.PIPE,
        )
        try:
            # Wait for real progress (no time assertions: a guard against a hang only).
            for _ in range(6000):
                if node910.counter() >= start + 40 or churn.poll() is not None:
                    break
                time.sleep(0.005)
            assert churn.poll() is None, churn.stderr.read() if churn.stderr else ""
        finally:
            os.kill(churn.pid, signal.SIGKILL)
            churn.wait()
            if churn.stderr is not None:
                churn.stderr.close()
        # A fresh process reads the state the killed one left; the leftover temp file (if any)
        # is replaced by the next writer.
        result = node910.run_python(
            """
            total = dcmi.total_resource(lib, 0)
            free = dcmi.free_resource(lib, 0)
            result = [total.vdev_num, free.computing.aic + sum(
                dcmi.query(lib, 0, total.vdev_id[i])[1].query_info.computing.aic
                for i in range(total.vdev_num))]
            """
        )
        assert result[0] <= 16
        assert result[1] == 32.0
        assert destroy(node910.lib, 0, dcmi.VDEV_ID_ALL) == DCMI_OK


def test_a_state_for_other_npus_is_rebuilt_from_the_topology(
    make_node: MakeNode, capfd: pytest.CaptureFixture[str]
) -> None:
    node = make_node(dcmi.topology("910B3", 2))
    assert create(node.lib, 0, b"vir05_1c_16g")[0] == DCMI_OK
    (node.path / "topology").write_text(dcmi.topology("910A", 4))
    assert node.init() == DCMI_OK
    assert "describes other NPUs" in capfd.readouterr().err
    assert dcmi.card_list(node.lib) == (DCMI_OK, [0, 1, 2, 3])
    assert vnpu_ids(node.lib, 0) == []


def test_the_preset_writes_a_topology_file_once(make_node: MakeNode) -> None:
    node = make_node(preset="ascend910bx8")
    written = (node.path / "topology").read_text()
    assert written.splitlines()[1:] == dcmi.topology("910B3").splitlines()
    # An existing topology file wins over the environment.
    os.environ["DCMI_SIM_TOPOLOGY"] = "ascend910x2"
    assert node.init() == DCMI_OK
    assert (node.path / "topology").read_text() == written
    assert dcmi.card_list(node.lib)[1] == list(range(8))
