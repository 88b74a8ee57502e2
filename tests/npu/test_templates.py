"""The vNPU template tables against the table in docs/dcmi-sim.md, and the chip-name lookup."""

from __future__ import annotations

import re

import pytest

from agent.hw.ascend.templates import MAX_VNPUS, MODELS, NpuCapacity, VnpuTemplate, model_for
from tests.dcmisim.dcmi import REPO

# | `910A` | Atlas training ... | 32 | 14 | 32768 | `vir02` 2/1/2048, `vir04` 4/1/4096, ... |
_ROW = re.compile(r"^\| `(\w+)` \|[^|]*\| (\d+) \| (\d+) \| (\d+) \| (.*) \|$")
_TEMPLATE = re.compile(r"`(\w+)` (\d+)/(\d+)/(\d+)")


def documented() -> dict[str, tuple[int, int, int, list[tuple[str, int, int, int]]]]:
    text = (REPO / "docs" / "dcmi-sim.md").read_text()
    section = text[text.index("### Templates and chips") : text.index("### Capacity")]
    rows = {}
    for line in section.splitlines():
        match = _ROW.match(line)
        if match is None:
            continue
        model, aicore, aicpu, hbm, templates = match.groups()
        if templates.startswith("same names"):
            # "same names: 2/1/2184, ..." reuses the previous row's names.
            previous = rows[list(rows)[-1]][3]
            sizes = re.findall(r"(\d+)/(\d+)/(\d+)", templates)
            listed = [
                (name, *map(int, size)) for (name, *_), size in zip(previous, sizes, strict=True)
            ]
        else:
            listed = [
                (name, int(c), int(p), int(m)) for name, c, p, m in _TEMPLATE.findall(templates)
            ]
        rows[model] = (int(aicore), int(aicpu), int(hbm), listed)
    return rows


def test_the_tables_are_the_documented_ones() -> None:
    rows = documented()
    assert list(rows) == list(MODELS) == ["910A", "910ProB", "910B2", "910B3", "910B4"]
    for name, (aicore, aicpu, hbm, templates) in rows.items():
        model = MODELS[name]
        counted = name.startswith("910B")  # AI CPUs are a capacity on the 910B only
        assert model.capacity == NpuCapacity(name, aicore, aicpu, hbm, MAX_VNPUS, counted)
        assert model.templates == tuple(
            VnpuTemplate(template, cores, cpus, memory, counted)
            for template, cores, cpus, memory in templates
        )


@pytest.mark.parametrize(
    ("chip_name", "model"),
    [("910A", "910A"), ("910B3", "910B3"), ("Ascend910B4", "910B4"), ("910proB", "910ProB"),
     (" 910B2 ", "910B2")],
)  # fmt: skip
def test_a_chip_name_finds_its_table(chip_name: str, model: str) -> None:
    assert model_for(chip_name) is MODELS[model]


@pytest.mark.parametrize("chip_name", ["310P3", "910B", "910C", ""])
def test_a_chip_without_a_table_finds_none(chip_name: str) -> None:
    assert model_for(chip_name) is None


def test_a_template_is_found_by_name() -> None:
    assert MODELS["910B3"].template("vir05_1c_16g") == VnpuTemplate(
        "vir05_1c_16g", 5, 1, 16384, counts_aicpu=True
    )
    assert MODELS["910B3"].template("vir16") is None
