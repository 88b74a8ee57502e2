"""Device rules: which device numbers a cgroup may open, in the kernel's ``devices.list`` syntax.

A rule is ``<kind> <major>:<minor> <access>``: kind ``c`` (char), ``b`` (block) or ``a`` (all),
major/minor a decimal number or ``*`` (any), access a non-empty subset of ``r`` (read), ``w``
(write), ``m`` (mknod) — Documentation/admin-guide/cgroup-v1/devices.rst. The same model feeds
both backends: cgroup v1 writes the text to ``devices.allow``/``devices.deny``, cgroup v2 compiles
it into a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.errors import IsolationError, ValidationError

DeviceKind = Literal["c", "b", "a"]
Access = frozenset[str]
RuleKey = tuple[DeviceKind, int | None, int | None]

ACCESS_ORDER = "rwm"
FULL_ACCESS: Access = frozenset(ACCESS_ORDER)
READ_WRITE: Access = frozenset("rw")

# dev_t is 12 bits of major and 20 bits of minor (include/linux/kdev_t.h: MINORBITS 20);
# the cgroup interfaces take u32 but no device node can carry a larger number.
MAX_MAJOR = (1 << 12) - 1
MAX_MINOR = (1 << 20) - 1

# ASCII digits only: int() also accepts other scripts' digits and "1_0"; the kernel does not.
_RULE_PATTERN = re.compile(r"([abc]) (\*|[0-9]{1,10}):(\*|[0-9]{1,10}) ([rwm]{1,3})", re.ASCII)
_KIND_ORDER = {"a": 0, "b": 1, "c": 2}


@dataclass(frozen=True)
class DeviceRule:
    """One allow entry: ``kind major:minor access``; ``None`` for major or minor means ``*``."""

    kind: DeviceKind
    major: int | None
    minor: int | None
    access: Access

    def __post_init__(self) -> None:
        if self.kind not in _KIND_ORDER:
            raise ValidationError(f"device rule kind {self.kind!r} is not one of 'c', 'b', 'a'")
        for name, value, limit in (
            ("major", self.major, MAX_MAJOR),
            ("minor", self.minor, MAX_MINOR),
        ):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
                raise ValidationError(
                    f"device rule {name} {value!r} is out of range: expected 0..{limit} or '*'"
                )
        if not isinstance(self.access, frozenset) or not self.access:
            raise ValidationError("device rule access must be a non-empty set of 'r', 'w', 'm'")
        if not self.access <= FULL_ACCESS:
            raise ValidationError(
                f"device rule access {sorted(self.access)!r} has letters other than 'r', 'w', 'm'"
            )
        # The kernel treats any rule starting with 'a' as "all devices" and ignores the numbers
        # (security/device_cgroup.c, devcgroup_update_access), so "a 1:3 rwm" cannot exist.
        if self.kind == "a" and (self.major is not None or self.minor is not None):
            raise ValidationError("a device rule of kind 'a' (all devices) must be 'a *:*'")

    def format(self) -> str:
        """The rule as the kernel prints it in ``devices.list``."""
        major = "*" if self.major is None else str(self.major)
        minor = "*" if self.minor is None else str(self.minor)
        access = "".join(letter for letter in ACCESS_ORDER if letter in self.access)
        return f"{self.kind} {major}:{minor} {access}"

    def __str__(self) -> str:
        return self.format()

    @property
    def key(self) -> RuleKey:
        """What the kernel matches exceptions on (access is merged per key)."""
        return (self.kind, self.major, self.minor)

    @property
    def is_single_device(self) -> bool:
        """True when the rule names exactly one device node (no wildcard, not kind 'a')."""
        return self.kind != "a" and self.major is not None and self.minor is not None

    def with_access(self, access: Iterable[str]) -> DeviceRule:
        return DeviceRule(self.kind, self.major, self.minor, frozenset(access))


def parse_rule(text: str) -> DeviceRule:
    """Parse one rule such as ``c 195:0 rwm`` or ``c 136:* rwm``; ValidationError if malformed."""
    if not isinstance(text, str):
        raise ValidationError(f"device rule must be text, got {type(text).__name__}")
    match = _RULE_PATTERN.fullmatch(text.strip(" \t\n"))
    if match is None:
        raise ValidationError(
            f"device rule {text!r} is malformed: expected '<c|b|a> <major|*>:<minor|*> <rwm>'"
        )
    kind, major_text, minor_text, access_text = match.groups()
    if len(set(access_text)) != len(access_text):
        raise ValidationError(f"device rule {text!r} repeats an access letter")
    major = None if major_text == "*" else int(major_text)
    minor = None if minor_text == "*" else int(minor_text)
    return DeviceRule(_as_kind(kind), major, minor, frozenset(access_text))


def parse_rules(text: str) -> tuple[DeviceRule, ...]:
    """Parse a ``devices.list`` document: one rule per line, blank lines ignored."""
    rules = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip(" \t"):
            continue
        try:
            rules.append(parse_rule(line))
        except ValidationError as error:
            raise ValidationError(f"line {number}: {error}") from None
    return tuple(rules)


def format_rules(rules: Iterable[DeviceRule]) -> str:
    return "".join(f"{rule.format()}\n" for rule in rules)


def normalise(rules: Iterable[DeviceRule]) -> tuple[DeviceRule, ...]:
    """Merge rules with the same kind/major/minor and sort them deterministically.

    Only exact duplicates merge, as the kernel's exception list does (dev_exception_add ORs the
    access of an existing entry with the same type/major/minor); a rule covered by a wildcard rule
    stays separate, so a normalised target compares equal to what ``devices.list`` reads back.
    """
    merged: dict[RuleKey, set[str]] = {}
    for rule in rules:
        if not isinstance(rule, DeviceRule):
            raise ValidationError(f"expected a DeviceRule, got {type(rule).__name__}")
        merged.setdefault(rule.key, set()).update(rule.access)
    return tuple(
        DeviceRule(kind, major, minor, frozenset(access))
        for (kind, major, minor), access in sorted(
            merged.items(), key=lambda item: _sort_key(*item[0])
        )
    )


def _sort_key(kind: DeviceKind, major: int | None, minor: int | None) -> tuple[int, int, int]:
    # Wildcards sort before numbers so the order is total and stable across runs.
    return (_KIND_ORDER[kind], -1 if major is None else major, -1 if minor is None else minor)


def _as_kind(letter: str) -> DeviceKind:
    if letter == "c":
        return "c"
    if letter == "b":
        return "b"
    if letter == "a":
        return "a"
    raise ValidationError(f"device rule kind {letter!r} is not one of 'c', 'b', 'a'")


def baseline_rules() -> tuple[DeviceRule, ...]:
    """What every tenant may open whatever it leased: runc's default allow-list, minus its extras.

    runc (libcontainer/specconv AllowedDevices) grants rwm on each of these. We leave out the rest
    of runc's list on purpose: ``c *:* m`` and ``b *:* m`` (mknod of any device), ``/dev/console``
    (5:1) and ``/dev/net/tun`` (10:200) — a GPU tenant needs none of them.
    """
    return normalise(
        DeviceRule("c", major, minor, FULL_ACCESS)
        for major, minor in (
            (1, 3),  # /dev/null
            (1, 5),  # /dev/zero
            (1, 7),  # /dev/full
            (1, 8),  # /dev/random
            (1, 9),  # /dev/urandom
            (5, 0),  # /dev/tty
            (5, 2),  # /dev/ptmx
            (136, None),  # /dev/pts/* (Unix98 pty slaves, UNIX98_PTY_MAJOR)
        )
    )


def rules_for_nodes(
    paths: Sequence[str | os.PathLike[str]], access: Access = READ_WRITE
) -> tuple[DeviceRule, ...]:
    """One rule per device node, from its st_rdev; ``rw`` by default.

    ``rw`` is what a CUDA process needs on /dev/nvidia*, and what NVIDIA's libnvidia-container
    grants; mknod is not needed because the runtime, not the tenant, creates the nodes.
    Symlinks are followed on purpose (/dev/char/195:0 style links name the same device).
    """
    rules = []
    for path in paths:
        try:
            status = Path(path).stat()
        except OSError as error:
            raise IsolationError(
                f"cannot build a device rule for {os.fspath(path)!r}: {error.strerror}"
            ) from error
        if stat.S_ISCHR(status.st_mode):
            kind: DeviceKind = "c"
        elif stat.S_ISBLK(status.st_mode):
            kind = "b"
        else:
            raise IsolationError(
                f"cannot build a device rule for {os.fspath(path)!r}: not a char or block device"
            )
        rules.append(
            DeviceRule(kind, os.major(status.st_rdev), os.minor(status.st_rdev), frozenset(access))
        )
    return normalise(rules)
