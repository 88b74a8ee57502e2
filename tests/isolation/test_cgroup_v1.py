"""cgroup v1 specifics: the transition planner, read-back verification, and failure handling.

The planner is checked twice: against a small model of security/device_cgroup.c's exception
list (with hypothesis, so many shapes of "current" are tried), and against the real kernel,
reading devices.list after every single write of a plan.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import IsolationError, ValidationError
from agent.isolation.cgroup_v1 import (
    ALL_DEVICES,
    CgroupV1Fence,
    DevicesState,
    DeviceWrite,
    plan_transition,
    read_devices_state,
    verify_devices_list,
)
from agent.isolation.protocol import fenced_rules
from agent.isolation.rules import (
    DeviceRule,
    baseline_rules,
    format_rules,
    normalise,
    parse_rule,
    parse_rules,
    rules_for_nodes,
)

# One concrete device per baseline rule (a pty slave stands for c 136:*).
BASELINE_DEVICES = [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2), (136, 4)]


@dataclass
class KernelModel:
    """The exception list of one devices cgroup, as security/device_cgroup.c keeps it."""

    default_allow: bool
    exceptions: dict[tuple[str, int | None, int | None], set[str]] = field(default_factory=dict)

    @classmethod
    def from_state(cls, state: DevicesState) -> KernelModel:
        return cls(state.default_allow, {rule.key: set(rule.access) for rule in state.exceptions})

    def write(self, write: DeviceWrite) -> None:
        if write.rule.kind == "a":  # any 'a' switches the default and clears exceptions
            self.default_allow = write.file == "devices.allow"
            self.exceptions = {}
            return
        adds = (write.file == "devices.allow") != self.default_allow
        if adds:  # dev_exception_add ORs into the entry with the same key
            self.exceptions.setdefault(write.rule.key, set()).update(write.rule.access)
        elif write.rule.key in self.exceptions:  # dev_exception_rm: exact key only
            self.exceptions[write.rule.key] -= write.rule.access
            if not self.exceptions[write.rule.key]:
                del self.exceptions[write.rule.key]

    def allows(self, major: int, minor: int, access: str) -> bool:
        """match_exception for a default-deny cgroup (plans only ever produce those)."""
        assert not self.default_allow
        return any(
            kind == "c"
            and rule_major in (None, major)
            and rule_minor in (None, minor)
            and set(access) <= granted
            for (kind, rule_major, rule_minor), granted in self.exceptions.items()
        )

    def rules(self) -> tuple[DeviceRule, ...]:
        return normalise(
            DeviceRule(kind, major, minor, frozenset(access))  # type: ignore[arg-type]
            for (kind, major, minor), access in self.exceptions.items()
        )


accesses = st.frozensets(st.sampled_from("rwm"), min_size=1)
small_majors = st.sampled_from([1, 5, 136, 195, 510])
# "Current" lists include wildcards that cover baseline devices, and partial baseline access.
current_rules = st.builds(
    DeviceRule,
    st.sampled_from(["c", "b"]),
    st.one_of(st.none(), small_majors),
    st.one_of(st.none(), st.sampled_from([0, 1, 3, 5, 9])),
    accesses,
)
partition_rules = st.builds(
    DeviceRule, st.just("c"), st.sampled_from([195, 510]), st.integers(0, 3), accesses
)


@settings(max_examples=400, deadline=None)
@given(st.lists(current_rules, max_size=10), st.lists(partition_rules, max_size=5))
def test_plan_never_denies_the_baseline_and_reaches_the_target(
    current: list[DeviceRule], partition: list[DeviceRule]
) -> None:
    state = DevicesState(default_allow=False, exceptions=normalise(current))
    target = fenced_rules(partition)
    kernel = KernelModel.from_state(state)
    before = {
        (major, minor, access): kernel.allows(major, minor, access)
        for major, minor in BASELINE_DEVICES
        for access in "rwm"
    }
    plan = plan_transition(state, target)
    for write in plan:
        kernel.write(write)
        for (major, minor, access), was_allowed in before.items():
            if was_allowed:
                assert kernel.allows(major, minor, access), f"{write} dropped {major}:{minor}"
    assert kernel.rules() == target


@settings(max_examples=150, deadline=None)
@given(st.lists(current_rules, max_size=10), st.lists(partition_rules, max_size=5))
def test_plan_restricts_before_it_widens(
    current: list[DeviceRule], partition: list[DeviceRule]
) -> None:
    state = DevicesState(default_allow=False, exceptions=normalise(current))
    plan = plan_transition(state, fenced_rules(partition))
    baseline_keys = {rule.key for rule in baseline_rules()}
    partition_allows = [
        index
        for index, write in enumerate(plan)
        if write.file == "devices.allow" and write.rule.key not in baseline_keys
    ]
    denies = [index for index, write in enumerate(plan) if write.file == "devices.deny"]
    if partition_allows and denies:
        assert max(denies) < min(partition_allows)


def test_plan_from_allow_all_switches_first_then_baseline_then_partition() -> None:
    partition = [parse_rule("c 195:0 rw"), parse_rule("c 195:255 rw")]
    plan = plan_transition(DevicesState(default_allow=True, exceptions=()), fenced_rules(partition))
    assert [str(write) for write in plan] == [
        "a *:* rwm > devices.deny",
        *(f"{rule} > devices.allow" for rule in baseline_rules()),
        "c 195:0 rw > devices.allow",
        "c 195:255 rw > devices.allow",
    ]


def test_plan_keeps_null_covered_when_a_wildcard_goes() -> None:
    # runc's order (deny dropped, then allow gained) would deny /dev/null between two writes.
    current = DevicesState(False, parse_rules("c 1:* rwm\nc 5:* rwm\nc 136:* rwm\nc 195:1 rw\n"))
    plan = plan_transition(current, fenced_rules([parse_rule("c 195:0 rw")]))
    text = [str(write) for write in plan]
    assert text.index("c 1:3 rwm > devices.allow") < text.index("c 1:* rwm > devices.deny")
    assert text.index("c 195:1 rw > devices.deny") < text.index("c 195:0 rw > devices.allow")


def test_plan_for_an_unchanged_fence_is_empty() -> None:
    target = fenced_rules([parse_rule("c 195:0 rw")])
    assert plan_transition(DevicesState(False, target), target) == ()


def test_plan_changes_only_access_letters() -> None:
    current = DevicesState(False, fenced_rules([parse_rule("c 195:0 rwm")]))
    plan = plan_transition(current, fenced_rules([parse_rule("c 195:0 rw")]))
    assert [str(write) for write in plan] == ["c 195:0 m > devices.deny"]


def test_devices_list_parsing() -> None:
    assert DevicesState.parse("a *:* rwm\n") == DevicesState(True, ())
    assert DevicesState.parse("") == DevicesState(False, ())
    with pytest.raises(ValidationError, match="mixes"):
        DevicesState.parse("a *:* rwm\nc 1:3 rwm\n")


# --- real kernel ------------------------------------------------------------------------------


def write_rule(cgroup: Path, write: DeviceWrite) -> None:
    (cgroup / write.file).write_text(write.rule.format())


def devices_list(cgroup: Path) -> tuple[DeviceRule, ...]:
    return normalise(parse_rules((cgroup / "devices.list").read_text()))


def test_each_step_of_a_plan_keeps_the_baseline_in_the_kernel(v1_cgroup: Path, sim_dev) -> None:
    start = [
        DeviceWrite("devices.deny", ALL_DEVICES),
        *(
            DeviceWrite("devices.allow", parse_rule(text))
            for text in ("c 1:* rwm", "c 5:* rwm", "c 136:* rwm", f"c {sim_dev.gpu_major}:1 rw")
        ),
    ]
    for write in start:
        write_rule(v1_cgroup, write)
    current = read_devices_state(v1_cgroup)
    target = fenced_rules(rules_for_nodes(sim_dev.partition0))
    model = KernelModel.from_state(current)

    for write in plan_transition(current, target):
        write_rule(v1_cgroup, write)
        model.write(write)
        in_kernel = devices_list(v1_cgroup)
        assert in_kernel == model.rules(), f"kernel and model disagree after {write}"
        for major, minor in BASELINE_DEVICES:
            assert model.allows(major, minor, "rwm"), f"{write} dropped {major}:{minor}"
    assert devices_list(v1_cgroup) == target


def test_apply_from_allow_all_reads_back_exactly(v1_cgroup: Path, sim_dev) -> None:
    assert (v1_cgroup / "devices.list").read_text() == "a *:* rwm\n"
    rules = rules_for_nodes(sim_dev.partition0)
    CgroupV1Fence().apply(v1_cgroup, rules)
    # The kernel lists exceptions in the order they were added: baseline first, as planned.
    assert (v1_cgroup / "devices.list").read_text() == format_rules(fenced_rules(rules))


def test_read_back_refuses_a_list_that_differs(v1_cgroup: Path, sim_dev) -> None:
    rules = rules_for_nodes([sim_dev.nvidia0])
    CgroupV1Fence().apply(v1_cgroup, rules)
    verify_devices_list(v1_cgroup, fenced_rules(rules))

    wrong = fenced_rules(rules_for_nodes([sim_dev.nvidia1]))
    with pytest.raises(
        IsolationError, match=r"missing \['c \d+:1 rw'\], unexpected \['c \d+:0 rw'\]"
    ):
        verify_devices_list(v1_cgroup, wrong)
    # Someone else widens the cgroup behind our back: the next check notices.
    (v1_cgroup / "devices.allow").write_text(f"c {sim_dev.gpu_major}:1 r")
    with pytest.raises(IsolationError, match="unexpected"):
        verify_devices_list(v1_cgroup, fenced_rules(rules))


def test_read_back_refuses_allow_all(v1_cgroup: Path) -> None:
    with pytest.raises(IsolationError, match="every device allowed"):
        verify_devices_list(v1_cgroup, baseline_rules())


def test_first_fence_needs_a_childless_cgroup(v1_cgroup: Path, sim_dev) -> None:
    (v1_cgroup / "child").mkdir()
    with pytest.raises(IsolationError, match="child cgroups") as caught:
        CgroupV1Fence().apply(v1_cgroup, rules_for_nodes([sim_dev.nvidia0]))
    assert "no less restricted than before" in str(caught.value)
    assert (v1_cgroup / "devices.list").read_text() == "a *:* rwm\n"


def test_refencing_a_parent_with_children_works(v1_cgroup: Path, sim_dev, probe) -> None:
    fence = CgroupV1Fence()
    fence.apply(v1_cgroup, rules_for_nodes([sim_dev.nvidia0, sim_dev.nvidia1]))
    child = v1_cgroup / "workload"
    child.mkdir()
    fence.apply(v1_cgroup, rules_for_nodes([sim_dev.nvidia1]))
    # Denies propagate to children (propagate_exception), so the workload lost nvidia0 too.
    nodes = {"nvidia0": sim_dev.nvidia0, "nvidia1": sim_dev.nvidia1}
    assert probe.open(child, nodes) == {"nvidia0": errno.EPERM, "nvidia1": errno.ENXIO}


def test_a_refused_write_is_rolled_back(v1_cgroup: Path, sim_dev) -> None:
    fence = CgroupV1Fence()
    # The parent allows everything of the partition except the capability node ...
    parent_nodes = [sim_dev.nvidiactl, sim_dev.uvm, sim_dev.uvm_tools, sim_dev.nvidia0]
    fence.apply(v1_cgroup, rules_for_nodes(parent_nodes))
    tenant = v1_cgroup / "tenant"
    tenant.mkdir()
    fence.revoke(tenant)
    assert devices_list(tenant) == baseline_rules()
    # ... so the last allow of the plan fails with EPERM after four have succeeded.
    with pytest.raises(IsolationError, match="parent cgroup does not allow") as caught:
        fence.apply(tenant, rules_for_nodes(sim_dev.partition0))
    assert "undone" in str(caught.value)
    assert devices_list(tenant) == baseline_rules()


def test_remove_restores_what_a_new_child_would_get(v1_cgroup: Path, sim_dev) -> None:
    fence = CgroupV1Fence()
    fence.apply(v1_cgroup, rules_for_nodes([sim_dev.nvidia0]))
    fence.remove(v1_cgroup)  # parent is the hierarchy root: allow-all
    assert (v1_cgroup / "devices.list").read_text() == "a *:* rwm\n"

    fence.apply(v1_cgroup, rules_for_nodes([sim_dev.nvidia0, sim_dev.nvidia1]))
    tenant = v1_cgroup / "tenant"
    tenant.mkdir()
    fence.apply(tenant, rules_for_nodes([sim_dev.nvidia1]))
    fence.remove(tenant)  # parent is fenced: back to the parent's allow-list
    assert devices_list(tenant) == devices_list(v1_cgroup)


def test_current_of_a_narrowed_cgroup_is_its_allow_list(v1_cgroup: Path) -> None:
    (v1_cgroup / "devices.deny").write_text("a")
    (v1_cgroup / "devices.allow").write_text("c 1:3 rw")
    state = CgroupV1Fence().current(v1_cgroup)
    assert state is not None
    assert state.mechanism == "cgroup-v1-devices"
    assert state.allowed == (DeviceRule("c", 1, 3, frozenset("rw")),)
    assert not state.grants_exactly([])


def test_unreadable_devices_list_is_an_isolation_error(tmp_path: Path) -> None:
    with pytest.raises(IsolationError, match="cgroup v1 devices hierarchy"):
        read_devices_state(tmp_path)
    (tmp_path / "devices.list").write_text("garbage\n")
    with pytest.raises(IsolationError, match="cannot understand"):
        read_devices_state(tmp_path)
