"""Mount detection from mountinfo, and validation of the cgroup path a tenant hands us."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import IsolationError, ValidationError
from agent.isolation.cgroups import (
    Mount,
    cgroup_hierarchy,
    hierarchy_mounts,
    mount_containing,
    parse_mountinfo,
    read_mounts,
    resolve_tenant_cgroup,
    unescape_mount_field,
)

HYBRID = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime shared:9 - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/cpuset,devices rw - cgroup cgroup rw,cpuset,devices
38 31 0:35 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""
UNIFIED = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw
"""


def test_hybrid_layout_is_understood() -> None:
    mounts = parse_mountinfo(HYBRID)
    assert hierarchy_mounts("v2", mounts) == (Path("/sys/fs/cgroup/unified"),)
    assert hierarchy_mounts("v1-devices", mounts) == (
        Path("/sys/fs/cgroup/devices"),
        Path("/sys/fs/cgroup/cpuset,devices"),
    )
    assert cgroup_hierarchy(Path("/sys/fs/cgroup/unified/a/b"), mounts) == "v2"
    assert cgroup_hierarchy(Path("/sys/fs/cgroup/devices/a"), mounts) == "v1-devices"
    assert cgroup_hierarchy(Path("/sys/fs/cgroup/memory/a"), mounts) is None
    assert cgroup_hierarchy(Path("/sys/fs/cgroup/devicesX"), mounts) is None  # tmpfs
    assert cgroup_hierarchy(Path("/srv"), mounts) is None


def test_unified_layout_is_understood() -> None:
    mounts = parse_mountinfo(UNIFIED)
    assert cgroup_hierarchy(Path("/sys/fs/cgroup/tenants/a"), mounts) == "v2"
    assert hierarchy_mounts("v1-devices", mounts) == ()


def test_a_later_mount_on_the_same_point_wins() -> None:
    mounts = parse_mountinfo(
        "30 22 0:26 / /mnt/cg rw - cgroup2 cgroup2 rw\n31 22 0:27 / /mnt/cg rw - tmpfs tmpfs rw\n"
    )
    assert cgroup_hierarchy(Path("/mnt/cg/x"), mounts) is None


def test_escaped_mount_points() -> None:
    (mount,) = parse_mountinfo(r"40 1 0:5 / /mnt/with\040space\134x rw - cgroup2 none rw" + "\n")
    assert mount.mount_point == Path("/mnt/with space\\x")


def test_this_machine_has_a_cgroup_mount() -> None:
    mounts = read_mounts()
    assert any(mount.hierarchy is not None for mount in mounts)


def test_a_mount_made_or_removed_after_a_read_is_seen_at_the_next(tmp_path: Path) -> None:
    """The mount table is kept between reads until the kernel says it changed (poll on
    /proc/self/mountinfo): a cgroup2 mount made after one read is a cgroup at the next, and
    gone after its unmount. Runs in a mount namespace of its own, so the machine's is untouched."""
    script = f"""
import subprocess, sys
from pathlib import Path
from agent.isolation.cgroups import cgroup_hierarchy, read_mounts
target = Path({str(tmp_path / "cg")!r})
target.mkdir()
read_mounts()
before = cgroup_hierarchy(target / "x")
subprocess.run(["mount", "-t", "cgroup2", "none", str(target)], check=True)
during = cgroup_hierarchy(target / "x")
subprocess.run(["umount", str(target)], check=True)
print(before, during, cgroup_hierarchy(target / "x"))
"""
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, check=True,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.stdout.split() == ["None", "v2", "None"], result


@pytest.mark.parametrize(
    "line",
    [
        "garbage",
        "1 2 3 4 5 6",
        "1 2 0:1 / /x rw - cgroup2",
        "1 2 0:1 / /x rw - cgroup2 a b c",
        "x 2 0:1 / /x rw - cgroup2 cgroup2 rw",
        "1 2 0:1 / relative rw - cgroup2 cgroup2 rw",
        "1 2 0:1 / /x\\377 rw - cgroup2 cgroup2 rw",
    ],
)
def test_malformed_mountinfo_is_an_isolation_error(line: str) -> None:
    with pytest.raises(IsolationError, match="line 1"):
        parse_mountinfo(line)


def escape(text: str) -> str:
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in text)


path_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00/"),
    min_size=1,
    max_size=12,
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(path_text, min_size=0, max_size=4),
    st.sampled_from(["cgroup2", "cgroup", "tmpfs"]),
    st.lists(st.sampled_from(["rw", "devices", "memory", "nsdelegate"]), min_size=1, max_size=3),
    st.lists(st.sampled_from(["shared:4", "master:1", "propagate_from:2"]), max_size=2),
)
def test_mountinfo_round_trips(
    parts: list[str], fs_type: str, options: list[str], optional: list[str]
) -> None:
    point = "/" + "/".join(parts)
    line = " ".join(
        [
            "41",
            "31",
            "0:38",
            "/",
            escape(point),
            "rw,relatime",
            *optional,
            "-",
            fs_type,
            "src",
            ",".join(options),
        ]
    )
    (mount,) = parse_mountinfo(line + "\n")
    assert mount.mount_point == Path(point)
    assert mount.fs_type == fs_type
    assert mount.super_options == frozenset(options)


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789 -/:\\\nabcgroup2,"), max_size=60))
def test_mountinfo_parser_only_raises_isolation_error(text: str) -> None:
    with contextlib.suppress(IsolationError):
        parse_mountinfo(text)


def test_unescape_leaves_plain_text() -> None:
    assert unescape_mount_field("/sys/fs/cgroup") == "/sys/fs/cgroup"
    assert unescape_mount_field(r"a\011b") == "a\tb"


def test_mount_containing_needs_whole_components() -> None:
    mounts = (Mount(1, "/", Path("/a/b"), "cgroup2", frozenset()),)
    assert mount_containing(Path("/a/bc"), mounts) is None
    assert mount_containing(Path("/a/b"), mounts) == mounts[0]


# --- resolve_tenant_cgroup --------------------------------------------------------------------


def test_a_real_cgroup_under_the_parent_is_accepted(tenant_cgroup: Path) -> None:
    tenant = tenant_cgroup / "job-1"
    tenant.mkdir()
    assert resolve_tenant_cgroup(str(tenant), [tenant_cgroup]) == tenant
    assert resolve_tenant_cgroup(f"{tenant}/", [tenant_cgroup]) == tenant
    assert resolve_tenant_cgroup(str(tenant).replace("/", "//"), [tenant_cgroup]) == tenant


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "empty"),
        ("relative/cgroup", "not absolute"),
        ("/sys/fs/cgroup/x\x00y", "NUL"),
        ("{parent}/../{parent_name}/job", r"'\.\.'"),
        ("{parent}/job/..", r"'\.\.'"),
        ("{parent}/./job", r"'\.'"),
        ("{parent}", "not strictly under"),
        ("/sys/fs/cgroup", "not strictly under"),
        ("{parent}x/job", "not strictly under"),
        ("{parent}/missing", "does not exist"),
        ("{parent}/job/cgroup.procs", "not a directory"),
    ],
)
def test_bad_paths_are_rejected(tenant_cgroup: Path, path: str, reason: str) -> None:
    (tenant_cgroup / "job").mkdir()
    text = path.format(parent=tenant_cgroup, parent_name=tenant_cgroup.name)
    with pytest.raises(ValidationError, match=reason):
        resolve_tenant_cgroup(text, [tenant_cgroup])


def test_symlink_escape_is_rejected(tenant_cgroup: Path, tmp_path: Path) -> None:
    # The allowed parent holds a link to a real cgroup: lexically under the parent, really not.
    parent = tmp_path / "tenants"
    parent.mkdir()
    (parent / "job").symlink_to(tenant_cgroup)
    with pytest.raises(ValidationError, match="symlink"):
        resolve_tenant_cgroup(str(parent / "job"), [parent])


def test_symlink_in_a_leading_component_is_rejected(tenant_cgroup: Path, tmp_path: Path) -> None:
    link = tmp_path / "cgroups"
    link.symlink_to(tenant_cgroup.parent)
    (tenant_cgroup / "job").mkdir()
    through_link = link / tenant_cgroup.name / "job"
    with pytest.raises(ValidationError, match="symlink"):
        resolve_tenant_cgroup(str(through_link), [link / tenant_cgroup.name])


def test_a_directory_that_is_not_a_cgroup_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "job").mkdir()
    with pytest.raises(ValidationError, match="not a cgroup"):
        resolve_tenant_cgroup(str(tmp_path / "job"), [tmp_path])


def test_a_cgroup_of_another_controller_is_rejected() -> None:
    others = [
        mount.mount_point
        for mount in read_mounts()
        if mount.fs_type == "cgroup" and mount.hierarchy is None
    ]
    if not others:
        pytest.skip("no cgroup v1 hierarchy without the devices controller is mounted here")
    child = others[0] / f"accelguard-test-{uuid.uuid4().hex[:12]}"
    child.mkdir()
    try:
        with pytest.raises(ValidationError, match="not a cgroup"):
            resolve_tenant_cgroup(str(child), [others[0]])
    finally:
        child.rmdir()


def test_no_allowed_parents_rejects_everything(tenant_cgroup: Path) -> None:
    with pytest.raises(ValidationError, match="no allowed parent"):
        resolve_tenant_cgroup(str(tenant_cgroup), [])


def test_non_string_path_is_rejected(tenant_cgroup: Path) -> None:
    with pytest.raises(ValidationError, match="path string"):
        resolve_tenant_cgroup(tenant_cgroup, [tenant_cgroup.parent])  # type: ignore[arg-type]
