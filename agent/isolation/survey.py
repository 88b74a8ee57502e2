"""What the kernel says is fenced: every accelguard fence under the tenant parents, read back.

The journal is not the truth (DESIGN.md invariant 6): a fence can outlive the lease that made it
(a lost journal, a crash between steps, a second agent) or be changed by another manager. The
reconciler surveys the kernel at start-up and after every inventory refresh; the grant path checks
a new lease against the latest survey plus the fences this agent applied since, so that no device
node a partition owns is ever allowed in two tenants' fences (invariant 7).

On cgroup v2 a fence is an accelguard device program attached to the cgroup; on cgroup v1 it is
any ``devices.list`` that is not the default allow-all (v1 has no owner mark, so a restricted
list under a tenant parent counts as a fence whoever wrote it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AccelguardError
from agent.isolation import fence_for
from agent.isolation.protocol import FenceState
from agent.isolation.rules import DeviceRule

# A node has a few hundred tenant cgroups; a runaway tree must not stall the reconciler.
MAX_SURVEYED_CGROUPS = 100_000
MAX_DEPTH = 16


@dataclass(frozen=True)
class SurveyedFence:
    cgroup: str
    state: FenceState

    def allows(self, kind: str, major: int, minor: int) -> bool:
        """Whether this fence lets its cgroup open the device; unreadable rules count as yes."""
        if self.state.allowed is None:
            return True
        return any(rule_matches(rule, kind, major, minor) for rule in self.state.allowed)


@dataclass(frozen=True)
class SurveyProblem:
    cgroup: str
    error: str


def rule_matches(rule: DeviceRule, kind: str, major: int, minor: int) -> bool:
    return (
        rule.kind in ("a", kind)
        and (rule.major is None or rule.major == major)
        and (rule.minor is None or rule.minor == minor)
    )


def _cgroups_under(parents: Sequence[Path]) -> Iterator[Path]:
    """Every directory strictly below the parents, without following symlinks."""
    seen = 0
    stack: list[tuple[Path, int]] = [(Path(parent), 0) for parent in parents]
    while stack:
        directory, depth = stack.pop()
        if depth >= MAX_DEPTH:
            continue
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue  # removed while we looked, or not a cgroup at all
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            seen += 1
            if seen > MAX_SURVEYED_CGROUPS:
                return
            path = Path(entry.path)
            yield path
            stack.append((path, depth + 1))


def survey_fences(
    parents: Sequence[Path],
) -> tuple[list[SurveyedFence], list[SurveyProblem]]:
    """Read back every fence under ``parents``; unreadable cgroups are reported, not skipped."""
    fences: list[SurveyedFence] = []
    problems: list[SurveyProblem] = []
    for cgroup in _cgroups_under(parents):
        try:
            state = fence_for(cgroup).current(cgroup)
        except AccelguardError as error:
            if cgroup.exists():
                problems.append(SurveyProblem(str(cgroup), str(error)))
            continue
        if state is not None:
            fences.append(SurveyedFence(str(cgroup), state))
    return fences, problems


def related(one: str, other: str) -> bool:
    """True when one cgroup path is the other, or an ancestor or descendant of it. An empty path
    (an unbound lease's) names no cgroup and is related to none."""
    if not one or not other:
        return False
    a, b = Path(one), Path(other)
    return a == b or a in b.parents or b in a.parents


def allowing(
    fences: Iterable[SurveyedFence], nodes: Iterable[tuple[str, int, int]]
) -> list[SurveyedFence]:
    """The fences that allow at least one of ``nodes`` ((kind, major, minor))."""
    wanted = list(nodes)
    return [f for f in fences if any(f.allows(k, major, minor) for k, major, minor in wanted)]
