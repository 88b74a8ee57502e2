"""The shipped unit, systemd/accelguard.service: its exposure, its syntax, and the agent at work
under as much of it as applies without systemd.

systemd is not PID 1 where the suite runs, so the unit itself is never started. Instead:

- ``systemd-analyze security --offline=yes`` rates the file: at most 3.5, what the unit promises;
- ``systemd-analyze verify`` parses a copy whose ExecStart names an executable that exists here
  (``/usr/bin/accelguard`` does not): an unknown key or a bad value fails the test;
- a launcher reads the unit file and applies to a real agent on a simulated node:
  the mount namespace (PrivateMounts, ProtectSystem=strict, ProtectKernelTunables with
  ReadWritePaths: / and /sys read-only, /sys/fs/cgroup writable), DevicePolicy=closed with
  DeviceAllow (a device fence on the agent's own cgroup, written by the agent's own fence code:
  its baseline is the pseudo devices "closed" allows), UMask, CapabilityBoundingSet with the
  empty AmbientCapabilities and NoNewPrivileges (setpriv), then SystemCallFilter,
  SystemCallErrorNumber and RestrictAddressFamilies as seccomp filters. Those filters are a
  close approximation, not systemd's own: the groups are expanded by ``systemd-analyze
  syscall-filter`` (systemd's tables), an allow list gets @default as systemd adds it, and the
  filters are built with libseccomp, as systemd builds them; what differs is who installs them.
  Under all of that a grant is fenced (a tenant's probe: its nodes ENXIO, every other EPERM) and
  a release evicts the tenant's processes (one of another user, one that outlives SIGTERM), reads
  a bystander of another user and leaves it be, and ends free and clean; the scrub worker, which
  inherits everything, runs under it too. The launcher is first checked against the kernel
  (/proc/PID/status, statvfs, a few refused calls).

Not applied here: IPAddressDeny/IPAddressAllow (systemd's cgroup socket-buffer programs; the
simulated node has no controller link), RestrictNamespaces, LockPersonality, RestrictRealtime,
RestrictSUIDSGID, ProtectClock, ProtectHostname, ProtectKernelModules and ProtectKernelLogs
(filters and mounts that nothing the agent does comes near), ProtectHome, and PrivateTmp: the
simulated node lives under /tmp, which stays writable as a private /tmp would be, and stands in
for the state, runtime and CDI directories. The notify protocol is tested in
test_systemd_notify.py.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import errno
import fnmatch
import grp
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from agent.config import config_as_dict, load_config, parse_config, to_toml
from agent.isolation import fence_for
from agent.isolation.cgroups import hierarchy_mounts
from agent.isolation.rules import DeviceKind, DeviceRule
from agent.sim.node import init_sim_node
from tests.leases.conftest import cgroup_parents, hierarchy  # noqa: F401 - the fixtures
from tests.leases.helpers import hold, reap, tenant_cgroup
from tests.leases.test_eviction_capabilities import other_user_holder, unit_capabilities
from tests.support import ACCELGUARD, REPO, RunningAgent, all_gpu_nodes, probe, wait_all_clean

UNIT = REPO / "systemd" / "accelguard.service"
MAX_EXPOSURE = 3.5
ADMIN_GROUP = "adm"  # a group root is not a member of

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="needs systemd-analyze (Debian package systemd) to rate, parse and expand the unit",
)

needs_sandbox_tools = pytest.mark.skipif(
    shutil.which("setpriv") is None
    or shutil.which("capsh") is None
    or ctypes.util.find_library("seccomp") is None,
    reason="needs setpriv (util-linux), capsh (libcap2-bin) and libseccomp to apply the unit",
)


def service_settings() -> dict[str, list[str]]:
    """The unit's [Service] assignments in order, each key with every value it was given."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        assert not stripped.endswith("\\"), f"continued lines are not parsed here: {line!r}"
        if stripped.startswith("["):
            section = stripped
        elif section == "[Service]":
            key, _, value = stripped.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def setting(name: str, default: str = "") -> str:
    """The value that counts for a single-valued setting: the last assignment."""
    return service_settings().get(name, [default])[-1]


def _run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=120, check=False
    )


# --- what systemd-analyze says about the file -----------------------------------------------


def test_exposure_is_at_most_the_promised_level() -> None:
    result = _run(
        "systemd-analyze", "security", "--offline=yes", "--no-pager",
        f"--threshold={round(MAX_EXPOSURE * 10)}", UNIT,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}\n{result.stderr}"
    exposure = float(match.group(1))
    failing = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n" + "\n".join(failing)
    # --threshold makes the exit status say the same.
    assert result.returncode == 0, result.stderr


def test_unit_parses_without_complaint(tmp_path: Path) -> None:
    # verify insists that every command exists; the agent is not installed at /usr/bin here.
    copy = tmp_path / UNIT.name
    text = UNIT.read_text()
    assert "\nExecStart=/usr/bin/accelguard " in text
    copy.write_text(
        text.replace("\nExecStart=/usr/bin/accelguard ", f"\nExecStart={sys.executable} ")
    )
    result = _run("systemd-analyze", "verify", "--man=no", copy)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_syscall_groups_expand_to_the_calls_the_agent_makes() -> None:
    allowed = allowed_syscalls()
    assert {"bpf", "kill", "pidfd_send_signal", "prctl", "ioctl", "mknodat", "fchownat"} <= allowed
    assert not {"mount", "ptrace", "init_module", "sched_setaffinity", "reboot"} & allowed


# --- applying the unit to a real agent -------------------------------------------------------


@cache
def syscall_group(name: str) -> frozenset[str]:
    """A group's system calls as systemd's own table has them, nested groups expanded."""
    result = _run("systemd-analyze", "syscall-filter", "--no-pager", name)
    assert result.returncode == 0, result.stderr
    calls: set[str] = set()
    for line in result.stdout.splitlines()[1:]:  # the first line names the group itself
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        calls |= syscall_group(entry) if entry.startswith("@") else {entry}
    return frozenset(calls)


def _expand(entries: list[str]) -> set[str]:
    calls: set[str] = set()
    for entry in entries:
        calls |= syscall_group(entry) if entry.startswith("@") else {entry}
    return calls


def allowed_syscalls() -> set[str]:
    """SystemCallFilter= as systemd combines it: an allow list (it starts with one) plus
    @default, less what a later "~" line names."""
    lines = service_settings()["SystemCallFilter"]
    assert not lines[0].startswith("~"), "a deny list is not applied here"
    allowed = set(syscall_group("@default"))
    for line in lines:
        if line.startswith("~"):
            allowed -= _expand(line[1:].split())
        else:
            allowed |= _expand(line.split())
    return allowed


def address_families() -> list[int]:
    values = setting("RestrictAddressFamilies").split()
    assert values and not values[0].startswith("~"), "a deny list is not applied here"
    return sorted(int(getattr(socket, name)) for name in values)


def device_allow_rules() -> list[DeviceRule]:
    """DeviceAllow= resolved as systemd resolves it when the unit starts: "char-GROUP" globs
    against /proc/devices, a /dev path by its device number (skipped when missing)."""
    majors: list[tuple[int, str]] = []
    section = ""
    for line in Path("/proc/devices").read_text().splitlines():
        if line.endswith(":"):
            section = line
        elif section == "Character devices:" and line.strip():
            number, name = line.split(maxsplit=1)
            majors.append((int(number), name))
    rules: list[DeviceRule] = []
    for value in service_settings().get("DeviceAllow", []):
        specifier, _, access = value.partition(" ")
        letters = frozenset(access.strip() or "rwm")
        if specifier.startswith("char-"):
            pattern = specifier.removeprefix("char-")
            rules += [
                DeviceRule("c", major, None, letters)
                for major, name in majors
                if fnmatch.fnmatchcase(name, pattern)
            ]
        else:
            with contextlib.suppress(FileNotFoundError):
                info = Path(specifier).stat()
                kind: DeviceKind = "c" if stat.S_ISCHR(info.st_mode) else "b"
                major, minor = os.major(info.st_rdev), os.minor(info.st_rdev)
                rules.append(DeviceRule(kind, major, minor, letters))
    return rules


# Run as three stages, each exec'ing the next, in systemd's order: namespace and cgroup set-up
# with every privilege; then setpriv drops capabilities and sets no_new_privs; then the seccomp
# filters, last, just before the agent's own exec.
LAUNCHER = r"""
import ctypes, json, os, re, sys

stage, policy, command = sys.argv[1], json.loads(sys.argv[2]), sys.argv[4:]
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_SLAVE = 4096, 16384, 1 << 19
KEPT = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}


def checked(result, what):
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def mount(source, target, flags):
    source = None if source is None else source.encode()
    checked(libc.mount(source, target.encode(), None, ctypes.c_ulong(flags), None), target)


def under(path, roots):
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def mount_points():
    unescape = lambda text: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            yield unescape(fields[4]), fields[5].split(",")


def namespace():
    # Into the unit's cgroup first, as systemd forks the service there before anything else.
    with open(os.path.join(policy["cgroup"], "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))
    checked(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
    mount(None, "/", MS_REC | MS_SLAVE)
    writable = [path for path in policy["writable"] if os.path.isdir(path)]
    for path in writable:
        mount(path, path, MS_BIND | MS_REC)
    for path in policy["read_only"]:
        mount(path, path, MS_BIND | MS_REC)
    for target, options in list(mount_points()):
        if "rw" not in options or under(target, writable):
            continue
        if under(target, policy["untouched"]) and not under(target, policy["read_only"]):
            continue
        kept = sum(flag for name, flag in KEPT.items() if name in options)
        mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
    os.umask(policy["umask"])


class Comparison(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def filters():
    seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    seccomp.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Comparison)]
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    allow, errno_action = 0x7FFF0000, lambda number: 0x00050000 | number
    eq, gt = 4, 6

    def number_of(name):
        return seccomp.seccomp_syscall_resolve_name(name.encode())

    def rule(context, action, call, *comparisons):
        array = (Comparison * len(comparisons))(*comparisons) if comparisons else None
        result = seccomp.seccomp_rule_add_array(context, action, call, len(comparisons), array)
        if result < 0:
            raise OSError(-result, f"seccomp rule for syscall {call}")

    def load(context):
        result = seccomp.seccomp_load(context)
        if result < 0:
            raise OSError(-result, "seccomp_load")

    # RestrictAddressFamilies=: socket(2) of any other family fails with EAFNOSUPPORT.
    families = policy["families"]
    context = seccomp.seccomp_init(allow)
    refused = errno_action(97)  # EAFNOSUPPORT
    for family in range(max(families)):
        if family not in families:
            rule(context, refused, number_of("socket"), Comparison(0, eq, family, 0))
    rule(context, refused, number_of("socket"), Comparison(0, gt, max(families), 0))
    load(context)
    # SystemCallFilter=, last (seccomp(2) itself is not on the list): an allow list, anything
    # else fails with SystemCallErrorNumber=.
    context = seccomp.seccomp_init(errno_action(policy["errno"]))
    for name in policy["syscalls"]:
        if number_of(name) >= 0:  # not on this architecture: systemd skips it too
            rule(context, allow, number_of(name))
    load(context)


if stage == "namespace":
    namespace()
else:
    filters()
os.execvp(command[0], command)
"""


def _policy(cgroup: Path) -> dict[str, Any]:
    settings = service_settings()
    protect_tunables = setting("ProtectKernelTunables") == "yes"
    assert setting("ProtectSystem") == "strict", "only ProtectSystem=strict is applied here"
    writable = [p for line in settings.get("ReadWritePaths", []) for p in line.split()]
    writable += [f"/var/lib/{d}" for d in setting("StateDirectory").split()]
    writable += [f"/run/{d}" for d in setting("RuntimeDirectory").split()]
    if setting("PrivateTmp") == "yes":
        writable += ["/tmp", "/var/tmp"]  # the directories PrivateTmp= replaces
    writable = [p.lstrip("-") for p in writable]
    # ProtectSystem= leaves the API file systems; ProtectKernelTunables= takes /sys and /proc/sys
    # read-only (ReadWritePaths= wins for /sys/fs/cgroup), ProtectControlGroups= the cgroup tree.
    read_only = ["/proc/sys"] if protect_tunables else []
    if setting("ProtectControlGroups") == "yes":
        writable = [p for p in writable if not p.startswith("/sys/fs/cgroup")]
        read_only.append("/sys/fs/cgroup")
    return {
        "writable": writable,
        "untouched": ["/dev", "/proc"] + ([] if protect_tunables else ["/sys"]),
        "read_only": read_only,
        "cgroup": str(cgroup),
        "umask": int(setting("UMask", "0022"), 8),
        "syscalls": sorted(allowed_syscalls()),
        "errno": getattr(errno, setting("SystemCallErrorNumber", "EPERM")),
        "families": address_families(),
    }


def sandboxed(command: list[str], cgroup: Path) -> list[str]:
    """``command`` under the unit's sandbox, ``cgroup`` standing in for the unit's cgroup."""
    policy = json.dumps(_policy(cgroup))
    setpriv = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all"]
    assert setting("AmbientCapabilities") == ""
    # setpriv spells capabilities without the "cap_" prefix; as root, the permitted and
    # effective sets after its exec are exactly the bounding set, as under the unit.
    bounding = ["-all", *(f"+{c.removeprefix('cap_')}" for c in unit_capabilities())]
    setpriv.append(f"--bounding-set={','.join(bounding)}")
    if setting("NoNewPrivileges") == "yes":
        setpriv.append("--no-new-privs")
    launcher = [sys.executable, "-c", LAUNCHER]
    return [*launcher, "namespace", policy, "--", *setpriv, "--",
            *launcher, "filters", policy, "--", *command]  # fmt: skip


@pytest.fixture
def unit_cgroup() -> Iterator[Path]:
    """The agent's own cgroup, with the unit's device policy as systemd would attach it: on the
    hierarchy that has the devices controller (v1 on a hybrid host, as systemd does), else v2.
    """
    mounts = hierarchy_mounts("v1-devices") or hierarchy_mounts("v2")
    if not mounts:
        pytest.skip("this machine has no cgroup device hierarchy mounted")
    assert setting("DevicePolicy") == "closed", "only DevicePolicy=closed is applied here"
    cgroup = mounts[0] / f"accelguard-unit-{uuid.uuid4().hex[:8]}"
    cgroup.mkdir()
    try:
        fence_for(cgroup).apply(cgroup, device_allow_rules())
        yield cgroup
    finally:
        for _ in range(100):
            pids = (cgroup / "cgroup.procs").read_text().split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(OSError):
                cgroup.rmdir()
                break
            time.sleep(0.05)


PROBE = r"""
import ctypes, errno, json, os, socket, sys

result = {}
with open("/proc/self/status") as status:
    for line in status:
        key, _, value = line.partition(":")
        if key in ("CapBnd", "CapInh", "CapAmb", "CapEff", "NoNewPrivs", "Seccomp", "Umask"):
            result[key] = value.strip()
result["read_only"] = {
    path: bool(os.statvfs(path).f_flag & os.ST_RDONLY) for path in json.loads(sys.argv[1])
}


def outcome(call):
    try:
        call()
    except OSError as error:
        return errno.errorcode[error.errno]
    return "ok"


def mount():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"none", sys.argv[2].encode(), b"tmpfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount")


result["calls"] = {
    "sched_setaffinity": outcome(lambda: os.sched_setaffinity(0, os.sched_getaffinity(0))),
    "mount": outcome(mount),
    "socket_unix": outcome(lambda: socket.socket(socket.AF_UNIX).close()),
    "socket_packet": outcome(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()),
    "open_allowed_node": outcome(lambda: os.close(os.open(sys.argv[3], os.O_RDONLY))),
    "open_other_node": outcome(lambda: os.close(os.open(sys.argv[4], os.O_RDONLY))),
}
print(json.dumps(result))
"""


def _capabilities(mask: str) -> set[str]:
    decoded = _run("capsh", f"--decode={mask}").stdout
    return {name for name in decoded.strip().partition("=")[2].split(",") if name}


@needs_sandbox_tools
def test_the_sandbox_applies_what_the_unit_says(tmp_path: Path, unit_cgroup: Path) -> None:
    """The launcher itself, checked against the kernel, before an agent is trusted to it."""
    (tmp_path / "mountpoint").mkdir()
    allowed_node, other_node = tmp_path / "null", tmp_path / "loop0"
    os.mknod(allowed_node, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(other_node, 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    paths = ["/", "/usr", "/sys", "/sys/fs/cgroup", "/proc/sys", str(tmp_path)]
    command = [sys.executable, "-c", PROBE, json.dumps(paths), str(tmp_path / "mountpoint"),
               str(allowed_node), str(other_node)]  # fmt: skip
    result = subprocess.run(
        sandboxed(command, unit_cgroup), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)

    assert _capabilities(seen["CapBnd"]) <= set(unit_capabilities())
    assert _capabilities(seen["CapEff"]) == _capabilities(seen["CapBnd"])
    assert int(seen["CapInh"], 16) == 0 and int(seen["CapAmb"], 16) == 0
    assert seen["NoNewPrivs"] == "1" and seen["Seccomp"] == "2"  # 2: filter mode
    assert int(seen["Umask"], 8) == int(setting("UMask"), 8)
    assert seen["read_only"] == {
        "/": True, "/usr": True, "/sys": True, "/sys/fs/cgroup": False, "/proc/sys": True,
        str(tmp_path): False,
    }  # fmt: skip
    assert seen["calls"] == {
        "sched_setaffinity": "EPERM",  # ~@resources
        "mount": "EPERM",  # not in @system-service, though CAP_SYS_ADMIN would allow it
        "socket_unix": "ok",
        "socket_packet": "EAFNOSUPPORT",
        "open_allowed_node": "ok",  # /dev/null's number: a pseudo device "closed" allows
        "open_other_node": "EPERM",  # a loop device: the agent's device cgroup refuses it
    }


def _release(agent: RunningAgent, lease: str) -> dict[str, Any]:
    result = agent.cli("lease", "release", lease, "--json")
    assert result.stdout, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    # Exit 0 exactly when free and clean, 3 when it ended quarantined (the CLI's contract).
    assert result.returncode == (0 if document.get("clean") else 3), result.stderr
    return document


@contextmanager
def sandboxed_agent(
    tmp_path: Path, parents: dict[str, Path], unit_cgroup: Path
) -> Iterator[RunningAgent]:
    node = init_sim_node(
        tmp_path / "node", "h100x2", cgroup_parents=list(parents.values()),
        slice_bytes=1 << 20,
    )  # fmt: skip
    # An admin group root is not in: the socket's chown needs CAP_CHOWN and the @chown calls.
    document = config_as_dict(load_config(node.config_path))
    document["admin"]["group"] = ADMIN_GROUP
    node.config_path.write_text(to_toml(parse_config(document)))
    running = RunningAgent(node=node, config=load_config(node.config_path))
    running.log_path = node.root / "agent-sandboxed.log"
    command = [*ACCELGUARD, "--config", str(node.config_path), "agent"]
    with running.log_path.open("w") as log:
        # Every stage execs the next: the pid is the agent's.
        running.process = subprocess.Popen(
            sandboxed(command, unit_cgroup), stdout=log, stderr=subprocess.STDOUT, text=True,
            cwd=REPO,
        )  # fmt: skip
    try:
        running.wait_ready()
        status = Path(f"/proc/{running.process.pid}/status").read_text()
        assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE), running.log()
        assert str(unit_cgroup.name) in Path(f"/proc/{running.process.pid}/cgroup").read_text()
        socket_group = running.config.admin.socket.stat().st_gid
        assert socket_group == grp.getgrnam(ADMIN_GROUP).gr_gid, running.log()
        yield running
    finally:
        if running.process is not None:
            running.stop(signal.SIGKILL)


@needs_sandbox_tools
def test_grant_and_release_under_the_unit(
    tmp_path: Path,
    cgroup_parents: dict[str, Path],  # noqa: F811
    hierarchy: str,  # noqa: F811
    unit_cgroup: Path,
) -> None:
    cgroup = tenant_cgroup(cgroup_parents, hierarchy, "tenant-una")
    with sandboxed_agent(tmp_path, cgroup_parents, unit_cgroup) as agent:
        # A new MIG instance starts dirty: the scrub worker runs under the sandbox too.
        agent.cli_json("layout", "apply", "--gpu", "1", "2g.20gb=1")
        wait_all_clean(agent)
        grant = agent.cli_json(
            "lease", "grant", "--tenant", "una", "--profile", "2g.20gb", "--cgroup", str(cgroup)
        )
        allowed = grant["partition"]["device_nodes"]
        every = all_gpu_nodes(agent.config.devices.dev_root)
        seen = probe(cgroup, every)
        wrong = {
            path: errno.errorcode.get(code, code)
            for path, code in seen.items()
            if code != (errno.ENXIO if path in allowed else errno.EPERM)
        }
        assert not wrong, wrong

        # The tenant's processes: one of another user that goes at SIGTERM, one that ignores it
        # and must be killed (cgroup.kill on v2, the freezer on v1). A bystander of another user
        # outside the cgroup, as on every real node: the census must read it, and leave it be.
        capability = next(n for n in allowed if "/nvidia-caps/" in n)
        stubborn = hold(agent, grant["partition"]["uuid"], "--cgroup", str(cgroup),
                        "--ignore-sigterm")  # fmt: skip
        with (
            other_user_holder("/dev/null") as bystander,
            other_user_holder(capability, cgroup) as holder,
        ):
            released = _release(agent, grant["lease"]["id"])
            assert holder.wait(timeout=30) == -signal.SIGTERM
            assert bystander.poll() is None
        assert reap(stubborn) == -signal.SIGKILL
        assert released["state"] == "free" and released["clean"] is True, released
        assert "scrub_started" in agent.log(), agent.log()[-3000:]
