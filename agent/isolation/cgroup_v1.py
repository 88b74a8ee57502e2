"""cgroup v1 device fence: ``devices.allow``/``devices.deny`` writes planned from ``devices.list``.

Kernel semantics this relies on (security/device_cgroup.c):

* A devices cgroup is either default-allow, listed as the single line ``a *:* rwm`` whatever
  deny exceptions it holds, or default-deny, listed as its allow exceptions.
* Writing a rule of kind ``a`` switches the default and clears every exception; the kernel
  refuses it (EINVAL) while the cgroup has child cgroups.
* In a default-deny cgroup, an allow write adds an exception (ORing access into one with the
  same type/major/minor); a deny write removes those access bits from the exception with exactly
  the same type/major/minor, and a wildcard deny does not touch narrower exceptions.
* An allow is refused (EPERM) unless the parent cgroup allows it too.

As runc does (libcontainer/cgroups/devices, Emulator.Transition), we compute the writes from the
current list to the target, write them one rule per write, then read ``devices.list`` back and
fail if it is not exactly the target.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from cgroupspy.controllers import DevicesController
from cgroupspy.nodes import Node

from agent.errors import IsolationError, ValidationError
from agent.isolation.protocol import FenceState, Mechanism, fenced_rules
from agent.isolation.rules import (
    FULL_ACCESS,
    DeviceRule,
    RuleKey,
    baseline_rules,
    format_rules,
    normalise,
    parse_rules,
)

DevicesFile = Literal["devices.allow", "devices.deny"]
ALL_DEVICES = DeviceRule("a", None, None, FULL_ACCESS)


@dataclass(frozen=True)
class DevicesState:
    """A devices cgroup as ``devices.list`` shows it."""

    default_allow: bool
    # Allow exceptions of a default-deny cgroup, normalised. Empty for a default-allow cgroup,
    # whose deny exceptions the kernel does not list.
    exceptions: tuple[DeviceRule, ...]

    @classmethod
    def parse(cls, text: str) -> DevicesState:
        rules = parse_rules(text)
        if any(rule.kind == "a" for rule in rules):
            if rules != (ALL_DEVICES,):
                raise ValidationError(
                    f"devices.list mixes 'a *:* rwm' with other lines: {format_rules(rules)!r}"
                )
            return cls(default_allow=True, exceptions=())
        return cls(default_allow=False, exceptions=normalise(rules))


@dataclass(frozen=True)
class DeviceWrite:
    """One rule written to ``devices.allow`` or ``devices.deny``."""

    file: DevicesFile
    rule: DeviceRule

    def __str__(self) -> str:
        return f"{self.rule} > {self.file}"


def plan_transition(
    current: DevicesState,
    target: Sequence[DeviceRule],
    protected: Sequence[DeviceRule] | None = None,
) -> tuple[DeviceWrite, ...]:
    """The writes that turn ``current`` into a default-deny cgroup allowing exactly ``target``.

    ``protected`` (the baseline by default) must never be denied in between, so a running tenant
    keeps /dev/null and its tty throughout. The order, and why:

    1. From default-allow, ``a`` to devices.deny first. Unavoidable: the kernel does not list
       the deny exceptions of a default-allow cgroup, and ``a`` is the only write that switches
       to default-deny, clearing every exception on the way (runc does the same). The protected
       rules are allowed again immediately after, before anything else.
    2. From default-deny, first allow what the protected rules gain. runc denies dropped rules
       first; if a wildcard such as ``c 1:* rwm`` is being replaced by ``c 1:3 rwm``, that order
       leaves /dev/null denied until the allow lands. Allowing the exact protected rule first
       keeps it covered, and widens nothing beyond the target.
    3. Then deny everything being dropped, and only then allow the partition's new rules:
       restricting before widening means a failure part-way leaves the cgroup narrower.
    """
    wanted = {rule.key: rule for rule in normalise(target)}
    protected_keys = {
        rule.key for rule in normalise(baseline_rules() if protected is None else protected)
    }
    writes: list[DeviceWrite] = []
    have: dict[RuleKey, DeviceRule] = {}
    if current.default_allow:
        writes.append(DeviceWrite("devices.deny", ALL_DEVICES))
    else:
        have = {rule.key: rule for rule in current.exceptions}

    def missing_from(rule: DeviceRule, other: DeviceRule | None) -> DeviceRule | None:
        extra = rule.access - (frozenset() if other is None else other.access)
        return rule.with_access(extra) if extra else None

    gained = [
        (key, gain)
        for key, rule in wanted.items()
        if (gain := missing_from(rule, have.get(key))) is not None
    ]
    dropped = [
        DeviceWrite("devices.deny", drop)
        for key, rule in have.items()
        if (drop := missing_from(rule, wanted.get(key))) is not None
    ]
    writes += [DeviceWrite("devices.allow", gain) for key, gain in gained if key in protected_keys]
    writes += dropped
    writes += [
        DeviceWrite("devices.allow", gain) for key, gain in gained if key not in protected_keys
    ]
    return tuple(writes)


class CgroupV1Fence:
    """DeviceFence for a cgroup in a cgroup v1 ``devices`` hierarchy."""

    mechanism: Mechanism = "cgroup-v1-devices"

    def apply(self, cgroup: Path, rules: Sequence[DeviceRule]) -> None:
        self._transition(Path(cgroup), fenced_rules(rules), baseline_rules())

    def revoke(self, cgroup: Path) -> None:
        self._transition(Path(cgroup), fenced_rules(()), baseline_rules())

    def current(self, cgroup: Path) -> FenceState | None:
        # v1 has no owner mark on an exception, so this is the cgroup's whole allow-list; a
        # default-allow cgroup has no fence at all.
        state = read_devices_state(Path(cgroup))
        if state.default_allow:
            return None
        return FenceState(self.mechanism, state.exceptions)

    def remove(self, cgroup: Path) -> None:
        """Give the cgroup back the device access a new child of its parent would get."""
        cgroup = Path(cgroup)
        parent = read_devices_state(cgroup.parent)
        if parent.default_allow:
            # The kernel copies the parent's deny exceptions on this write (dev_exceptions_copy).
            _execute(cgroup, (DeviceWrite("devices.allow", ALL_DEVICES),))
            if not read_devices_state(cgroup).default_allow:
                raise IsolationError(f"removing the fence on {cgroup} did not take")
            return
        self._transition(cgroup, parent.exceptions, protected=parent.exceptions)

    def _transition(
        self, cgroup: Path, target: Sequence[DeviceRule], protected: Sequence[DeviceRule]
    ) -> None:
        plan = plan_transition(read_devices_state(cgroup), target, protected)
        _execute(cgroup, plan)
        verify_devices_list(cgroup, target)


def verify_devices_list(cgroup: Path, expected: Sequence[DeviceRule]) -> None:
    """Read ``devices.list`` back; raise IsolationError unless it allows exactly ``expected``."""
    state = read_devices_state(Path(cgroup))
    wanted = normalise(expected)
    if state.default_allow:
        raise IsolationError(
            f"devices.list of {cgroup} reads 'a *:* rwm' (every device allowed), expected "
            f"{len(wanted)} rules: the fence did not take, treat the cgroup as unfenced"
        )
    if state.exceptions != wanted:
        missing = sorted(set(wanted) - set(state.exceptions), key=str)
        extra = sorted(set(state.exceptions) - set(wanted), key=str)
        raise IsolationError(
            f"devices.list of {cgroup} differs from the fence: missing "
            f"{[str(rule) for rule in missing]}, unexpected {[str(rule) for rule in extra]}; "
            "treat the cgroup as unfenced"
        )


def read_devices_state(cgroup: Path) -> DevicesState:
    try:
        text = _devices_controller(cgroup).get_property(b"devices.list")
    except OSError as error:
        raise IsolationError(
            f"cannot read {cgroup / 'devices.list'}: {error.strerror}; is it a cgroup in a "
            "cgroup v1 devices hierarchy?"
        ) from error
    try:
        return DevicesState.parse(str(text))
    except ValidationError as error:
        raise IsolationError(f"cannot understand {cgroup / 'devices.list'}: {error}") from error


def _devices_controller(cgroup: Path) -> Any:
    # cgroupspy's trees name a node's controller after the tree-root directory it sits under
    # (Node.CONTROLLERS[b"devices"]) and walk the whole hierarchy when built, so they can only
    # address a hierarchy mounted at <somewhere>/devices. A devices hierarchy co-mounted with
    # another controller (/sys/fs/cgroup/cpuset,devices) or mounted under another name would be
    # out of reach; a DevicesController over a root Node whose name is the full path addresses
    # any cgroup directly and reads/writes the files by exact path.
    # We read and write text ourselves rather than through its DeviceAccess type, whose parser
    # turns an empty access string into "rwm"; our parser and formatter are fuzz-tested.
    return DevicesController(Node(os.fsencode(cgroup)))


def _execute(cgroup: Path, plan: Sequence[DeviceWrite]) -> None:
    controller = _devices_controller(cgroup)
    done: list[DeviceWrite] = []
    for write in plan:
        try:
            _write(controller, cgroup, write)
        except IsolationError as failure:
            _roll_back(controller, cgroup, done, failure)
        done.append(write)


def _roll_back(
    controller: Any, cgroup: Path, done: Sequence[DeviceWrite], failure: IsolationError
) -> NoReturn:
    # Every allow we wrote granted only access the cgroup lacked, so denying exactly it again
    # returns to the state before the allows: the old list minus what was already dropped.
    undo = [
        DeviceWrite("devices.deny", write.rule)
        for write in reversed(done)
        if write.file == "devices.allow"
    ]
    try:
        for write in undo:
            _write(controller, cgroup, write)
    except IsolationError as undo_failure:
        raise IsolationError(
            f"{failure}; undoing the {len(undo)} allow writes already made also failed "
            f"({undo_failure}): {cgroup} is in an unknown state, treat it as unfenced"
        ) from failure
    raise IsolationError(
        f"{failure}; the allow writes already made were undone, so {cgroup} is no less "
        "restricted than before"
    ) from failure


def _write(controller: Any, cgroup: Path, write: DeviceWrite) -> None:
    try:
        controller.set_property(write.file.encode(), write.rule.format())
    except OSError as error:
        meaning = _write_error_meaning(write, error)
        raise IsolationError(
            f"writing {write.rule} to {cgroup / write.file} failed: {meaning}"
        ) from error


def _write_error_meaning(write: DeviceWrite, error: OSError) -> str:
    if error.errno == errno.EINVAL and write.rule.kind == "a":
        return (
            "the cgroup has child cgroups, and the kernel only switches a childless devices cgroup "
            "between allow-all and deny-all; fence the cgroup before creating children under it"
        )
    if error.errno == errno.EPERM and write.file == "devices.allow":
        return "the parent cgroup does not allow it (a v1 devices cgroup allows only a subset)"
    if error.errno == errno.ENOENT:
        return "the cgroup no longer exists"
    return str(error.strerror)
