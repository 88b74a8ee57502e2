"""CDI specs: complete for CUDA, and valid by the CDI project's own schema.

Driver discovery runs against driver trees built here from real files (ELF headers of both
classes, relative and absolute symlinks, include loops in ld.so.conf); the spec is checked with
the container-device-interface project's JSON schema (cdi-schema.json, v0.7.0), tightened to
refuse unknown fields as the project's Go loader does; and one test runs a real agent on a
simulated node and checks the spec a grant writes.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.errors import IsolationError
from agent.hw.devnodes import DeviceNode
from agent.isolation import cdi
from agent.isolation.driver_files import (
    DriverFile,
    DriverSearch,
    LdcacheHook,
    discover,
    linker_directories,
)
from agent.sim.node import init_sim_node
from tests.link.support import wait_for
from tests.support import RunningAgent, running_agent, wait_all_clean

SCHEMA = json.loads((Path(__file__).parent / "cdi-schema.json").read_text())
LIB64 = "/usr/lib/x86_64-linux-gnu"
LIB32 = "/usr/lib/i386-linux-gnu"
NODES = [
    DeviceNode(Path("/dev/nvidiactl"), 195, 255),
    DeviceNode(Path("/dev/nvidia0"), 195, 0),
    DeviceNode(Path("/dev/nvidia-caps/nvidia-cap12"), 238, 12),
]
MIG_UUID = "MIG-4b3f1d2e-5c6a-5e7f-8a9b-0c1d2e3f4a5b"


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists an object's fields: the CDI
    loader fails on unknown fields (SPEC.md), which the published schema does not say."""
    if isinstance(schema, dict):
        tightened = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            tightened["additionalProperties"] = False
        return tightened
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def validate(spec: dict[str, object]) -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(spec)
    jsonschema.Draft7Validator(_strict(SCHEMA)).validate(spec)
    for device in spec["devices"]:  # type: ignore[attr-defined]
        # Upstream's schema leaves env unchecked (a "ref" typo): an OCI env entry is KEY=VALUE.
        for entry in device["containerEdits"].get("env", []):
            assert isinstance(entry, str)
            assert entry.partition("=")[0] and "=" in entry, entry


def _elf(path: Path, elf_class: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(57))
    return path


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def _symlink(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


@pytest.fixture
def driver_root(tmp_path: Path) -> Path:
    """A driver install as a distribution lays it out, with the traps discovery must avoid."""
    root = tmp_path / "driver"
    conf = root / "etc" / "ld.so.conf.d"
    conf.mkdir(parents=True)
    (root / "etc" / "ld.so.conf").write_text(
        "# distribution default\ninclude ld.so.conf.d/*.conf\n"
    )
    # i386 sorts first: its 32-bit libnvidia-ml must lose to the 64-bit one listed after it.
    (conf / "i386-linux-gnu.conf").write_text(f"{LIB32}\n")
    (conf / "x86_64-linux-gnu.conf").write_text(f"# multiarch\n{LIB64}\n")
    # A loop of includes ends.
    (conf / "zz-loop.conf").write_text("include /etc/ld.so.conf\n")
    lib32, lib64 = root / LIB32.lstrip("/"), root / LIB64.lstrip("/")
    _elf(lib32 / "libnvidia-ml.so.1", elf_class=1)
    _elf(lib64 / "libnvidia-ml.so.550.54.15")
    _symlink(lib64 / "libnvidia-ml.so.1", "libnvidia-ml.so.550.54.15")
    _elf(lib64 / "libcuda.so.550.54.15")
    _symlink(lib64 / "libcuda.so.1", "libcuda.so.550.54.15")
    # An absolute link means the driver root's file, never the host's.
    _elf(lib64 / "libnvidia-nvvm.so.550.54.15")
    _symlink(lib64 / "libnvidia-nvvm.so.4", f"{LIB64}/libnvidia-nvvm.so.550.54.15")
    # Only in a standard directory, which no ld.so.conf names.
    _elf(root / "usr" / "lib64" / "libnvidia-ptxjitcompiler.so.1")
    # Not ELF, and a dangling link: neither is mounted.
    (lib64 / "libnvidia-allocator.so.1").write_text("not a library")
    _symlink(lib64 / "libcudadebugger.so.1", "libcudadebugger.so.550.54.15")
    _executable(root / "usr" / "bin" / "nvidia-smi")
    _executable(root / "usr" / "bin" / "nvidia-ctk")
    (root / "usr" / "bin" / "nvidia-debugdump").write_text("not executable")
    return root


def test_linker_directories_follow_ld_so_conf_then_the_standard_ones(driver_root: Path) -> None:
    directories = linker_directories(driver_root)
    assert directories[:2] == [LIB32, LIB64]
    assert "/usr/lib64" in directories
    assert len(directories) == len(set(directories))


def _installed_long_ago(root: Path) -> None:
    """Every file and directory of the tree dated an hour back, as on an installed system (a
    search answer is cached only from files that have not changed for seconds)."""
    past = time.time() - 3600
    for path in [root, *root.rglob("*")]:
        os.utime(path, (past, past), follow_symlinks=False)


def test_linker_directories_see_a_new_include_file(driver_root: Path) -> None:
    """The answer is kept between grants while nothing it read changed; a driver package that
    drops a file into an included directory, or edits one, changes it at the next call."""
    _installed_long_ago(driver_root)
    before = linker_directories(driver_root)
    assert linker_directories(driver_root) == before
    conf_d = driver_root / "etc" / "ld.so.conf.d"
    (conf_d / "x9-new-driver.conf").write_text("/opt/new-driver/lib\n")
    after = linker_directories(driver_root)
    assert after == [*before[:2], "/opt/new-driver/lib", *before[2:]], after
    _installed_long_ago(driver_root)
    assert linker_directories(driver_root) == after
    first = conf_d / "i386-linux-gnu.conf"
    first.write_text(first.read_text() + "/opt/edited/lib\n")
    assert "/opt/edited/lib" in linker_directories(driver_root)


def test_discovery_finds_what_exists_by_soname(driver_root: Path) -> None:
    files = discover(DriverSearch(root=driver_root))
    lib64 = driver_root / LIB64.lstrip("/")
    assert files.libraries == (
        DriverFile(lib64 / "libnvidia-ml.so.550.54.15", Path(LIB64, "libnvidia-ml.so.1")),
        DriverFile(lib64 / "libcuda.so.550.54.15", Path(LIB64, "libcuda.so.1")),
        DriverFile(
            driver_root / "usr/lib64/libnvidia-ptxjitcompiler.so.1",
            Path("/usr/lib64/libnvidia-ptxjitcompiler.so.1"),
        ),
        DriverFile(lib64 / "libnvidia-nvvm.so.550.54.15", Path(LIB64, "libnvidia-nvvm.so.4")),
    )
    assert files.binaries == (
        DriverFile(driver_root / "usr/bin/nvidia-smi", Path("/usr/bin/nvidia-smi")),
    )
    assert files.ldcache_hook == LdcacheHook(
        driver_root / "usr/bin/nvidia-ctk", ("nvidia-ctk", "hook", "update-ldcache")
    )
    assert files.library_folders == [LIB64, "/usr/lib64"]


def test_the_dedicated_hook_is_preferred(driver_root: Path) -> None:
    hook = _executable(driver_root / "usr" / "local" / "bin" / "nvidia-cdi-hook")
    files = discover(DriverSearch(root=driver_root))
    assert files.ldcache_hook == LdcacheHook(hook, ("nvidia-cdi-hook", "update-ldcache"))


def test_a_pinned_library_replaces_the_search(driver_root: Path, tmp_path: Path) -> None:
    sim = _elf(tmp_path / "sim" / "libnvidia-ml.so.1")
    files = discover(DriverSearch(root=driver_root, pinned={"libnvidia-ml.so.1": sim}))
    assert files.libraries[0] == DriverFile(sim, sim)
    assert [f.container_path.name for f in files.libraries].count("libnvidia-ml.so.1") == 1


def test_complete_spec_with_the_hook(driver_root: Path) -> None:
    files = discover(DriverSearch(root=driver_root))
    spec = cdi.cdi_spec("lease-0123456789abcdef", NODES, MIG_UUID, files)
    validate(spec)
    assert spec["cdiVersion"] == "0.3.0"  # nothing newer is used
    [device] = spec["devices"]  # type: ignore[misc]
    assert device["name"] == "lease-0123456789abcdef"
    assert "annotations" not in device
    edits = device["containerEdits"]
    assert [n["path"] for n in edits["deviceNodes"]] == [str(n.path) for n in NODES]
    assert edits["env"] == [
        f"NVIDIA_VISIBLE_DEVICES={MIG_UUID}",
        f"CUDA_VISIBLE_DEVICES={MIG_UUID}",
    ]
    mounts = {m["containerPath"]: m for m in edits["mounts"]}
    assert set(mounts) == {str(f.container_path) for f in (*files.libraries, *files.binaries)}
    for mount in mounts.values():
        assert mount["options"] == ["ro", "nosuid", "nodev", "bind"]
        assert Path(mount["hostPath"]).is_file() and not Path(mount["hostPath"]).is_symlink()
    assert mounts[f"{LIB64}/libcuda.so.1"]["hostPath"] == str(
        driver_root / LIB64.lstrip("/") / "libcuda.so.550.54.15"
    )
    assert edits["hooks"] == [
        {
            "hookName": "createContainer",
            "path": str(driver_root / "usr/bin/nvidia-ctk"),
            "args": [
                "nvidia-ctk", "hook", "update-ldcache", "--folder", LIB64, "--folder", "/usr/lib64"
            ],
        }
    ]  # fmt: skip


def test_without_a_hook_the_spec_says_why(driver_root: Path) -> None:
    (driver_root / "usr" / "bin" / "nvidia-ctk").unlink()
    spec = cdi.cdi_spec("lease-a", NODES, MIG_UUID, discover(DriverSearch(root=driver_root)))
    validate(spec)
    assert spec["cdiVersion"] == "0.6.0"  # annotations came with 0.6.0
    [device] = spec["devices"]  # type: ignore[misc]
    assert "hooks" not in device["containerEdits"]
    note = device["annotations"][cdi.LDCACHE_ANNOTATION]
    assert "nvidia-ctk" in note and f"{LIB64}:/usr/lib64" in note


def test_a_node_without_driver_files(tmp_path: Path) -> None:
    spec = cdi.cdi_spec("lease-a", NODES, "GPU-1", discover(DriverSearch(root=tmp_path)))
    validate(spec)
    [device] = spec["devices"]  # type: ignore[misc]
    assert set(device) == {"name", "containerEdits"}
    assert set(device["containerEdits"]) == {"deviceNodes", "env"}
    assert spec["cdiVersion"] == "0.3.0"


def _edits(spec: Any) -> Any:
    return spec["devices"][0]["containerEdits"]


@pytest.mark.parametrize(
    ("change", "version"),
    [
        (lambda s: s, "0.3.0"),
        (lambda s: _edits(s)["mounts"][0].update(type="none"), "0.4.0"),
        (lambda s: _edits(s)["deviceNodes"][0].update(hostPath="/x"), "0.5.0"),
        (lambda s: s["devices"][0].update(name="0lease"), "0.5.0"),
        (lambda s: s.update(kind="accelguard.io/mig.partition"), "0.6.0"),
        (lambda s: s.update(annotations={"a.io/b": "c"}), "0.6.0"),
    ],
)
def test_minimum_version_follows_the_fields_used(change: Any, version: str) -> None:
    spec: Any = cdi.cdi_spec("lease-a", NODES, "GPU-1")
    _edits(spec)["mounts"] = [{"hostPath": "/a", "containerPath": "/a", "options": ["ro", "bind"]}]
    change(spec)
    assert cdi.minimum_version(spec) == version


def test_write_is_atomic_and_reports_failure(driver_root: Path, tmp_path: Path) -> None:
    cdi_dir = tmp_path / "cdi"
    search = DriverSearch(root=driver_root)
    path = cdi.write_spec(cdi_dir, "lease-a", NODES, MIG_UUID, search)
    assert path == cdi.spec_path(cdi_dir, "lease-a")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert json.loads(path.read_text()) == cdi.cdi_spec(
        "lease-a", NODES, MIG_UUID, discover(search)
    )
    assert [p.name for p in cdi_dir.iterdir()] == [path.name]
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the directory should be")
    with pytest.raises(IsolationError, match="cannot write CDI spec"):
        cdi.write_spec(blocked, "lease-a", NODES, MIG_UUID, search)


@pytest.fixture
def sim_agent(tmp_path: Path, v2_cgroup: Path) -> Iterator[RunningAgent]:
    node = init_sim_node(
        tmp_path / "node", "h100x2", cgroup_parents=[v2_cgroup], slice_bytes=1 << 20
    )
    with running_agent(node) as running:
        yield running


def test_a_grant_writes_a_valid_complete_spec(sim_agent: RunningAgent, v2_cgroup: Path) -> None:
    sim_agent.cli_json("layout", "apply", "--gpu", "0", "3g.40gb=2")
    wait_all_clean(sim_agent)
    tenant = v2_cgroup / "tenant"
    tenant.mkdir()
    granted = sim_agent.cli_json(
        "lease", "grant", "--tenant", "alice", "--profile", "3g.40gb", "--cgroup", str(tenant)
    )
    lease_id = granted["lease"]["id"]
    assert granted["cdi_device"] == f"accelguard.io/partition={lease_id}"
    spec = json.loads(cdi.spec_path(sim_agent.config.leases.cdi_dir, lease_id).read_text())
    validate(spec)
    assert f"{spec['kind']}={spec['devices'][0]['name']}" == granted["cdi_device"]
    edits = spec["devices"][0]["containerEdits"]
    uuid = granted["partition"]["uuid"]
    assert uuid.startswith("MIG-")
    assert f"NVIDIA_VISIBLE_DEVICES={uuid}" in edits["env"]
    assert sorted(n["path"] for n in edits["deviceNodes"]) == sorted(
        granted["partition"]["device_nodes"]
    )
    library = Path(sim_agent.config.nvml.library)
    nvml = [m for m in edits["mounts"] if m["containerPath"] == str(library)]
    assert nvml == [
        {"hostPath": str(library.resolve()), "containerPath": str(library),
         "options": ["ro", "nosuid", "nodev", "bind"]}
    ]  # fmt: skip

    other = v2_cgroup / "tenant-b"
    other.mkdir()
    text = sim_agent.cli(
        "lease", "grant", "--tenant", "bob", "--profile", "3g.40gb", "--cgroup", str(other)
    ).stdout
    second = text.split()[0]
    assert f"CDI device: accelguard.io/partition={second}" in text.splitlines()


def test_start_up_rewrites_the_complete_spec(sim_agent: RunningAgent, v2_cgroup: Path) -> None:
    sim_agent.cli_json("layout", "apply", "--gpu", "0", "7g.80gb=1")
    wait_all_clean(sim_agent)
    tenant = v2_cgroup / "tenant"
    tenant.mkdir()
    granted = sim_agent.cli_json(
        "lease", "grant", "--tenant", "alice", "--profile", "7g.80gb", "--cgroup", str(tenant)
    )
    path = cdi.spec_path(sim_agent.config.leases.cdi_dir, granted["lease"]["id"])
    complete = json.loads(path.read_text())
    # As an older agent left it: device nodes only.
    old = json.loads(path.read_text())
    old["devices"][0]["containerEdits"] = {"deviceNodes": _edits(complete)["deviceNodes"]}
    path.write_text(json.dumps(old))
    sim_agent.stop()
    # A spec no lease of the journal stands behind (a lost journal's), and another vendor's.
    stale = cdi.spec_path(sim_agent.config.leases.cdi_dir, "lease-00000000deadbeef")
    stale.write_text(path.read_text())
    vendor = sim_agent.config.leases.cdi_dir / "nvidia.yaml"
    vendor.write_text("cdiVersion: 0.5.0\n")
    sim_agent.start()
    # The rewrite is part of start-up reconciliation, which may finish after the admin socket
    # answers (grants wait for it; a reader of the spec may not).
    wait_for(lambda: json.loads(path.read_text()) == complete, "the spec rewritten complete")
    wait_for(lambda: not stale.exists(), "the stale spec removed")
    assert vendor.read_text() == "cdiVersion: 0.5.0\n"
    assert path.exists()


def test_sweep_removes_only_our_specs_of_leases_not_live(tmp_path: Path) -> None:
    cdi_dir = tmp_path / "cdi"
    assert cdi.sweep_specs(cdi_dir, []) == []  # no directory yet: nothing to do
    cdi_dir.mkdir()
    live = cdi.spec_path(cdi_dir, "lease-live")
    gone = cdi.spec_path(cdi_dir, "lease-gone")
    half = gone.with_suffix(".tmp")
    for ours in (live, gone, half):
        ours.write_text("{}")
    others = [cdi_dir / "nvidia.yaml", cdi_dir / "accelguard.io-partition-notes.txt"]
    for other in others:
        other.write_text("kept")
    assert cdi.sweep_specs(cdi_dir, ["lease-live"]) == sorted([gone.name, half.name])
    assert sorted(p.name for p in cdi_dir.iterdir()) == sorted(
        [live.name, *(o.name for o in others)]
    )


def test_a_driver_upgrade_reaches_the_next_discovery(driver_root: Path) -> None:
    """Discovery is kept while the searched directories are unchanged; adding a library (or a
    binary) changes its directory, and the next spec has it."""
    search = DriverSearch(root=driver_root)
    # Just written: too fresh to keep (a change in the same clock tick would not show).
    assert discover(search) is not discover(search)
    _installed_long_ago(driver_root)
    before = discover(search)
    assert discover(search) is before  # nothing changed: the kept result
    lib64 = driver_root / LIB64.lstrip("/")
    _elf(lib64 / "libcudadebugger.so.550.54.15")  # the dangling link now resolves
    after = discover(search)
    assert "libcudadebugger.so.1" in {f.container_path.name for f in after.libraries}
    assert "libcudadebugger.so.1" not in {f.container_path.name for f in before.libraries}


def test_a_kept_discovery_sees_an_edit_of_the_linker_configuration(driver_root: Path) -> None:
    """A kept answer is watched (inotify) on everything it read, the linker's configuration
    included: a file edited in place, which changes no directory, reaches the next discovery."""
    _elf(driver_root / "opt" / "edited" / "lib" / "libcudadebugger.so.1")
    _installed_long_ago(driver_root)
    search = DriverSearch(root=driver_root)
    before = discover(search)
    assert discover(search) is before
    assert "libcudadebugger.so.1" not in {f.container_path.name for f in before.libraries}
    first = driver_root / "etc" / "ld.so.conf.d" / "i386-linux-gnu.conf"
    with first.open("a") as handle:  # in place: same inode, same directory mtime
        handle.write("/opt/edited/lib\n")
    after = discover(search)
    assert Path("/opt/edited/lib/libcudadebugger.so.1") in {
        f.container_path for f in after.libraries
    }


MOUNTED_OVER = """
import json, subprocess, sys
from pathlib import Path
from agent.isolation.driver_files import DriverSearch, discover
root, other = Path(sys.argv[1]), sys.argv[2]
search = DriverSearch(root=root)
names = lambda files: sorted(f.container_path.name for f in files.libraries)
before = discover(search)
kept = discover(search) is before
subprocess.run(["mount", "--bind", other, str(root / "usr" / "lib64")], check=True)
print(json.dumps({"kept": kept, "before": names(before), "after": names(discover(search))}))
"""


def test_a_kept_discovery_sees_a_mount_over_a_searched_directory(
    driver_root: Path, tmp_path: Path
) -> None:
    """A mount over a searched directory (a driver container's, say) changes no watched inode:
    the kept answer is dropped because the mount table changed. In a mount namespace of its own,
    so the machine's is untouched."""
    other = tmp_path / "driver-container-lib64"
    _elf(other / "libnvidia-ptxjitcompiler.so.1")
    _elf(other / "libcudadebugger.so.1")
    _installed_long_ago(driver_root)
    _installed_long_ago(other)
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", MOUNTED_OVER,
         str(driver_root), str(other)],
        capture_output=True, text=True, timeout=60, check=True,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["kept"], report
    assert "libcudadebugger.so.1" not in report["before"], report
    assert "libcudadebugger.so.1" in report["after"], report
