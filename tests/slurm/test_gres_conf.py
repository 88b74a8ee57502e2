"""Reading gres.conf back in the Prolog: Slurm's GPU indices are the node's records in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli.slurm_gres import read_gres_conf
from agent.errors import ValidationError


def test_records_of_this_node_in_order(tmp_path: Path) -> None:
    conf = tmp_path / "gres.conf"
    conf.write_text(
        "AutoDetect=off  # comment\n"
        "NodeName=a Name=gpu Type=3g.40gb MultipleFiles=/dev/nvidia0,/dev/c1,/dev/c2\n"
        "NodeName=b Name=gpu Type=7g.80gb File=/dev/nvidia0\n"
        "Name=gpu Type=1g.10gb MultipleFiles=/dev/nvidia1,/dev/c3,/dev/c4\n"
        "NodeName=a Name=mps Count=100\n"
    )
    records = read_gres_conf(conf, "a")
    assert [(r.type, r.files) for r in records] == [
        ("3g.40gb", ("/dev/nvidia0", "/dev/c1", "/dev/c2")),
        ("1g.10gb", ("/dev/nvidia1", "/dev/c3", "/dev/c4")),
    ]


@pytest.mark.parametrize("names", ["sim[0-3]", "a,b"])
def test_a_host_list_is_refused_rather_than_skipped(tmp_path: Path, names: str) -> None:
    conf = tmp_path / "gres.conf"
    conf.write_text(f"NodeName={names} Name=gpu File=/dev/nvidia0\n")
    with pytest.raises(ValidationError, match="host list"):
        read_gres_conf(conf, "a")
