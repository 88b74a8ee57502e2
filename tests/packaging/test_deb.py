"""The Debian package: ``make deb`` builds it, dpkg installs it on this machine, and the installed
``/usr/bin/accelguard`` runs a simulated node through the unit's own ExecStart line.

The install is real (dpkg -i against this machine's dpkg database, the Debian packages the .deb
depends on, its maintainer scripts) but happens in a mount namespace of its own in which the
top-level directories the package and dpkg write (/etc, /opt, /usr with /lib, /var, /run) are
overlays whose upper layers are on a tmpfs. So nothing reaches the machine: the tests running
beside this one never see /etc/accelguard/agent.toml or /usr/bin/accelguard appear, a test that
fails halfway leaves nothing to clean (the namespace and its tmpfs go with its last process),
and no systemd unit is started or enabled (systemd is not PID 1 here, and the maintainer scripts
never start a first install anyway). /tmp (the simulated node), /proc, /dev and the cgroup tree
are the machine's, as for every other test. The package is still removed and purged at the end:
what those leave behind is part of what is tested.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
import yaml

from agent import __version__
from agent.admin.client import AdminClient
from agent.errors import AccelguardError
from tests.isolation.test_cdi_spec import validate
from tests.leases.conftest import cgroup_parents  # noqa: F401 - the fixture
from tests.support import REPO

pytestmark = [
    pytest.mark.skipif(
        shutil.which("dpkg-deb") is None or shutil.which("nsenter") is None,
        reason="needs a Debian system (dpkg-deb) and util-linux's nsenter",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="dpkg -i and mount namespaces need root"),
    pytest.mark.skipif(
        "overlay" not in Path("/proc/filesystems").read_text(),
        reason="needs overlayfs to install the package without touching this machine",
    ),
]

PREFIX = Path("/opt/accelguard")
UNIT = Path("/lib/systemd/system/accelguard.service")
CONFFILE = Path("/etc/accelguard/agent.toml")
NVML_SIM = PREFIX / "lib" / "nvml-sim" / "libnvidia-ml.so.1"
DCMI_SIM = PREFIX / "lib" / "dcmi-sim" / "libdcmi.so"
# What the package installs, and what dpkg and the maintainer scripts write.
WRITTEN = ("/etc", "/opt", "/usr", "/lib", "/var", "/run")
# A clean environment for everything run inside: nothing of this checkout's virtualenv.
ENVIRONMENT = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}


def _run(command: Sequence[str | Path], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # Not the flags of a `make test` this may run under: this make is a separate build.
    environment = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MAKELEVEL"}}
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=timeout,
        check=False, cwd=REPO, env=environment,
    )  # fmt: skip


@pytest.fixture(scope="module")
def deb() -> Path:
    """The package, built by `make deb` (nothing to do when it is up to date). Two workers may
    both get here: the lock lets the second find the first's package."""
    lock_path = REPO / "build" / ".deb-test.lock"
    lock_path.parent.mkdir(exist_ok=True)
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = _run(["make", "-s", "deb"])
    assert built.returncode == 0, built.stdout + built.stderr
    name = _run([REPO / "packaging" / "deb" / "build.sh", "--name"]).stdout.strip()
    path = REPO / name
    assert path.is_file(), f"make deb did not write {path}"
    return path


def _field(control: str, name: str) -> str:
    for line in control.splitlines():
        if line.startswith(f"{name}: "):
            return line.split(": ", 1)[1]
    raise AssertionError(f"no {name} in:\n{control}")


def _debian_version(version: str) -> str:
    """PEP 440 pre-releases sort first in Debian with "~": 1.0rc1 -> 1.0~rc1."""
    return re.sub(r"\.?(a|b|rc|dev)(\d*)$", r"~\1\2", version)


def _extract(deb: Path, paths: Sequence[Path], into: Path) -> None:
    """These files of the package's data, under ``into``."""
    tar = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True, timeout=120
    ).stdout
    subprocess.run(
        ["tar", "--extract", "-C", str(into), *(f".{path}" for path in paths)],
        input=tar, capture_output=True, check=True, timeout=120,
    )  # fmt: skip


def test_the_package_holds_the_agent_its_unit_config_and_docs(deb: Path, tmp_path: Path) -> None:
    arch = _run(["dpkg", "--print-architecture"]).stdout.strip()
    version = _debian_version(__version__)
    assert deb.name == f"accelguard_{version}_{arch}.deb"
    control = _run(["dpkg-deb", "--field", deb]).stdout
    assert _field(control, "Package") == "accelguard"
    assert _field(control, "Version") == version
    assert _field(control, "Architecture") == arch
    depends = {item.split()[0] for item in _field(control, "Depends").split(", ")}
    python = Path(os.path.realpath("/usr/bin/python3")).name
    # The interpreter the virtualenv was made with, the native IMA parser's libcrypto, the TPM
    # stack of tpm2-pytss and its device TCTI (dlopen), pyudev's libudev (ctypes).
    assert {python, "libc6", "libssl3", "libtss2-esys-3.0.2-0", "libtss2-tcti-device0"} <= depends
    assert "libudev1" in depends
    assert _run(["dpkg-deb", "--info", deb, "conffiles"]).stdout.split() == [str(CONFFILE)]

    listing = _run(["dpkg-deb", "--contents", deb]).stdout.splitlines()
    entries = {line.split()[5].removeprefix("."): line for line in listing}
    for wanted in (
        f"{PREFIX}/bin/accelguard", f"{PREFIX}/pyvenv.cfg", f"{PREFIX}/lib/libaccelguard-ima.so",
        str(NVML_SIM), str(DCMI_SIM), str(UNIT), str(CONFFILE),
        "/usr/lib/accelguard/slurm/prolog", "/usr/lib/accelguard/slurm/epilog",
        "/usr/lib/accelguard/slurm/accelguard_spank.so",
        "/usr/share/doc/accelguard/operations.md", "/usr/share/doc/accelguard/npu.md",
        "/usr/share/doc/accelguard/copyright",
    ):  # fmt: skip
        assert wanted in entries, f"{wanted} is not in the package"
    assert entries["/usr/bin/accelguard"].endswith(f"-> {PREFIX}/bin/accelguard")
    assert all(line.split()[1] == "root/root" for line in listing)
    # Nothing from the checkout that is not the product: tests, tools, build outputs.
    assert not [p for p in entries if "/tests/" in p or "/build/deb" in p or p.endswith(".o")]

    launcher, venv = PREFIX / "bin" / "accelguard", PREFIX / "pyvenv.cfg"
    _extract(deb, [UNIT, CONFFILE, launcher, venv], tmp_path)

    def extracted(path: Path) -> str:
        return (tmp_path / path.relative_to("/")).read_text()

    assert extracted(UNIT) == (REPO / "systemd" / "accelguard.service").read_text()
    assert extracted(CONFFILE) == (REPO / "agent" / "config_template.toml").read_text()
    # The staging tree's paths are gone from the virtualenv: it lives in /opt/accelguard.
    assert extracted(launcher).splitlines()[0] == f"#!{PREFIX}/bin/python"
    settings = dict(line.split(" = ", 1) for line in extracted(venv).splitlines())
    assert settings["home"] == "/usr/bin"
    assert settings["executable"] == os.path.realpath("/usr/bin/python3")
    assert settings.get("command", str(PREFIX)).endswith(f" {PREFIX}")


# --- installed ---------------------------------------------------------------------------------


@dataclass
class Namespace:
    """A process holding a mount namespace whose WRITTEN directories are overlays."""

    holder: subprocess.Popen[str]

    def command(self, argv: Sequence[str | Path]) -> list[str]:
        # nsenter enters the mount namespace only, then execs: same process, same PID namespace.
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--", *map(str, argv)]

    def run(self, *argv: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(argv), capture_output=True, text=True, timeout=timeout, check=False,
            env=ENVIRONMENT, cwd="/",
        )  # fmt: skip

    def accelguard(
        self, *argv: str | Path, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        return self.run("/usr/bin/accelguard", *argv, timeout=timeout)

    def exists(self, path: str | Path) -> bool:
        return self.run("test", "-e", path).returncode == 0


_HOLDER = r"""
set -eu
scratch=$1
shift
mount -t tmpfs -o mode=0700 accelguard-deb-test "$scratch"
for top in "$@"; do
    layer="$scratch/$(printf '%s' "$top" | tr / _)"
    mkdir "$layer" "$layer/upper" "$layer/work"
    mount -t overlay overlay \
        -o "lowerdir=$top,upperdir=$layer/upper,workdir=$layer/work" "$top"
done
echo ready
exec sleep infinity
"""


@contextlib.contextmanager
def overlay_namespace(scratch: Path) -> Iterator[Namespace]:
    # /lib is a link to /usr/lib on Debian 12: the top directory behind each name is overlaid.
    tops = sorted({"/" + os.path.realpath(top).split("/")[1] for top in WRITTEN})
    scratch.mkdir()
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--",
         "sh", "-c", _HOLDER, "sh", str(scratch), *tops],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != "ready":
            holder.kill()
            _, errors = holder.communicate(timeout=30)
            pytest.fail(f"cannot set up the overlay namespace: {errors}")
        yield Namespace(holder)
    finally:
        holder.kill()
        holder.communicate(timeout=30)


def _host_state() -> dict[str, bool]:
    return {
        path: os.path.lexists(path)
        for path in ("/usr/bin/accelguard", "/opt/accelguard", "/etc/accelguard", str(UNIT))
    }


@contextlib.contextmanager
def _agent(namespace: Namespace, argv: list[str], socket: Path, log: Path) -> Iterator[int]:
    """The installed agent as a real process in the namespace, ready; stopped with SIGTERM
    at the end of the block, where it must exit 0."""
    with log.open("w") as output:
        process = subprocess.Popen(
            namespace.command(argv), stdout=output, stderr=subprocess.STDOUT, env=ENVIRONMENT,
            cwd="/",
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"the agent exited {process.returncode}:\n{log.read_text()}")
            try:
                with AdminClient(socket, timeout_s=2) as client:
                    client.ping()
                break
            except AccelguardError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the agent is not ready after 60 s:\n{log.read_text()}")
                time.sleep(0.1)
        yield process.pid
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        assert code == 0, f"the agent exited {code} on SIGTERM:\n{log.read_text()[-3000:]}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_installed_package_runs_a_simulated_node(
    deb: Path,
    tmp_path: Path,
    cgroup_parents: dict[str, Path],  # noqa: F811 - the fixture
) -> None:
    host_before = _host_state()
    with overlay_namespace(tmp_path / "overlay") as inside:
        # The namespace is this machine's root, with writes kept apart.
        assert inside.run("dpkg-query", "--show", "dpkg").returncode == 0
        installed = inside.run("dpkg", "--install", deb)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert "neither enabled nor started" in installed.stdout
        status = inside.run("dpkg-query", "--show", "--showformat=${Status}", "accelguard")
        assert status.stdout == "install ok installed"
        assert not inside.exists("/etc/systemd/system/multi-user.target.wants/accelguard.service")
        assert _host_state() == host_before, "the install reached the machine's own files"

        _check_installed_python(inside)
        _check_config_verbs(inside, tmp_path)
        _check_upgrade_keeps_the_config(inside, deb)
        state_dir = _run_the_unit_on_a_simulated_node(inside, tmp_path, cgroup_parents)
        _check_remove_and_purge(inside, state_dir)
    assert _host_state() == host_before


def _check_installed_python(inside: Namespace) -> None:
    assert _ok(inside.accelguard("--version")).strip() == f"accelguard {__version__}"
    # PEP 552 header: flags 0 means "valid while the source's mtime and size are these".
    probe = """
import json, marshal, os, struct, sys
import agent, agent.config
from agent.attest.logs import ima_native
with open(agent.config.__cached__, "rb") as pyc:
    header, code = pyc.read(16), pyc.read()
flags, mtime, size = struct.unpack("<III", header[4:16])
source = os.stat(agent.config.__file__)
current = flags != 0 or (mtime, size) == (int(source.st_mtime), source.st_size)
print(json.dumps({"prefix": sys.prefix, "agent": agent.__file__, "current": current,
                  "compiled_as": marshal.loads(code).co_filename,
                  "cached": agent.config.__cached__, "ima_native": ima_native.active()}))
"""
    found = json.loads(_ok(inside.run(PREFIX / "bin" / "python", "-c", probe)))
    site = f"{PREFIX}/lib/python{_python_version()}/site-packages"
    assert found["prefix"] == str(PREFIX)
    assert found["agent"] == f"{site}/agent/__init__.py"
    # The native IMA parser is found and loads (OpenSSL from libssl3).
    assert found["ima_native"] is True
    # Byte-code shipped, compiled for its installed path (tracebacks name the real file), and
    # still current after dpkg unpacked it: the agent, whose /opt is read-only under the unit,
    # does not compile every module again at each start.
    assert found["cached"].startswith(f"{site}/agent/__pycache__/config.cpython-")
    assert found["compiled_as"] == f"{site}/agent/config.py"
    assert found["current"] is True


def _python_version() -> str:
    return Path(os.path.realpath("/usr/bin/python3")).name.removeprefix("python")


def _check_config_verbs(inside: Namespace, tmp_path: Path) -> None:
    # The conffile is the template, and it is a valid config as shipped.
    template = (REPO / "agent" / "config_template.toml").read_text()
    assert inside.run("cat", CONFFILE).stdout == template
    _ok(inside.accelguard("config", "check"))
    refused = inside.accelguard("config", "init")
    assert refused.returncode == 2 and f"{CONFFILE} exists" in refused.stderr

    path = tmp_path / "config" / "agent.toml"
    _ok(inside.accelguard("config", "init", "--path", path))
    assert path.read_text() == template
    assert _ok(inside.accelguard("--config", path, "config", "check")).startswith("[node]\n")
    again = inside.accelguard("config", "init", "--path", path)
    assert again.returncode == 2, again.stdout + again.stderr
    assert f"{path} exists" in again.stderr and "--force" in again.stderr


def _check_upgrade_keeps_the_config(inside: Namespace, deb: Path) -> None:
    """The same package again is an upgrade to dpkg (prerm upgrade, postinst configure with
    the old version): the operator's edit of the conffile stays, and no first-install note."""
    edited = (REPO / "agent" / "config_template.toml").read_text() + "# edited on this node\n"
    assert inside.run("sh", "-c", f"cat > {CONFFILE} <<'EOF'\n{edited}EOF\n").returncode == 0
    again = inside.run("dpkg", "--install", deb)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "neither enabled nor started" not in again.stdout
    assert inside.run("cat", CONFFILE).stdout == edited


def _exec_start(inside: Namespace) -> list[str]:
    # The installed unit as systemd reads it: every command it names exists where it says.
    verified = inside.run("systemd-analyze", "verify", "--man=no", UNIT)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    lines = inside.run("cat", UNIT).stdout.splitlines()
    (line,) = [line for line in lines if line.startswith("ExecStart=")]
    argv = shlex.split(line.removeprefix("ExecStart="))
    assert argv[0] == "/usr/bin/accelguard" and inside.exists(argv[0])
    assert argv[argv.index("--config") + 1] == str(CONFFILE)
    return argv


def _run_the_unit_on_a_simulated_node(
    inside: Namespace, tmp_path: Path, parents: dict[str, Path]
) -> Path:
    parent = parents.get("v2") or parents.get("v1")
    if parent is None:
        pytest.skip("this machine has no cgroup v2 or v1 devices hierarchy mounted")
    root = tmp_path / "node"
    _ok(inside.accelguard(
        "sim", "init", "--dir", root, "--cgroup-parent", parent, "--slice-mib", "1"
    ))  # fmt: skip
    settings = tomllib.loads((root / "agent.toml").read_text())
    # The installed nvml-sim, not this checkout's.
    assert Path(settings["nvml"]["library"]).is_relative_to(PREFIX)
    # And the installed dcmi-sim for an NPU node.
    npu_root = tmp_path / "npu-node"
    _ok(inside.accelguard("sim", "init", "--dir", npu_root, "--topology", "ascend910x1"))
    npu_settings = tomllib.loads((npu_root / "agent.toml").read_text())
    assert Path(npu_settings["dcmi"]["library"]).is_relative_to(PREFIX)
    # The state in the default place (inside the namespace), for purge to find.
    state_dir = Path("/var/lib/accelguard")
    settings["node"]["state_dir"] = str(state_dir)
    config = root / "agent.toml"
    config.write_text(tomli_w.dumps(settings))

    argv = _exec_start(inside)
    argv[argv.index("--config") + 1] = str(config)
    socket = Path(settings["admin"]["socket"])
    with _agent(inside, argv, socket, tmp_path / "agent.log"):

        def accelguard(*args: str | Path) -> subprocess.CompletedProcess[str]:
            return inside.accelguard("--config", config, *args)

        status = json.loads(_ok(accelguard("status", "--json")))
        assert status["agent_version"] == __version__
        assert [gpu["index"] for gpu in status["gpus"]] == [0, 1]

        _ok(accelguard("layout", "apply", "--gpu", "0", "3g.40gb=2", "--wait", "60"))
        _ok(accelguard("layout", "assert", "--gpu", "0", "3g.40gb=2"))
        assert accelguard("layout", "assert", "--gpu", "0", "7g.80gb=1").returncode == 1
        exported = tmp_path / "current.yaml"
        exported.write_text(_ok(accelguard("layout", "export", "-f", "mig-parted")))
        configs = yaml.safe_load(exported.read_text())["mig-configs"]
        assert configs["current"][0] == {
            "devices": [0], "mig-enabled": True, "mig-devices": {"3g.40gb": 2}
        }  # fmt: skip
        _ok(accelguard("layout", "assert", "-f", exported, "-c", "current"))
        # Round trip: another layout, then the exported file brings the node back to it.
        _ok(accelguard("layout", "apply", "--gpu", "0", "7g.80gb=1", "--wait", "60"))
        differs = accelguard("layout", "assert", "-f", exported, "-c", "current")
        assert differs.returncode == 1, differs.stdout + differs.stderr
        _ok(accelguard("layout", "apply", "-f", exported, "-c", "current", "--wait", "60"))
        _ok(accelguard("layout", "assert", "-f", exported, "-c", "current"))
        _ok(accelguard("layout", "assert", "--gpu", "0", "3g.40gb=2"))

        tenant = parent / "tenant"
        tenant.mkdir()
        granted = json.loads(_ok(accelguard(
            "lease", "grant", "--tenant", "alice", "--profile", "3g.40gb", "--cgroup", tenant,
            "--json",
        )))  # fmt: skip
        lease = granted["lease"]["id"]
        assert granted["cdi_device"] == f"accelguard.io/partition={lease}"
        spec_path = Path(settings["leases"]["cdi_dir"]) / f"accelguard.io-partition-{lease}.json"
        spec = json.loads(spec_path.read_text())
        validate(spec)
        # The driver library a container gets is the installed nvml-sim.
        mounts = spec["devices"][0]["containerEdits"]["mounts"]
        nvml = [m["hostPath"] for m in mounts if m["containerPath"] == settings["nvml"]["library"]]
        assert nvml == [str(NVML_SIM)]
        released = accelguard("lease", "release", lease)
        assert released.returncode == 0, released.stdout + released.stderr
        assert not spec_path.exists()
    return state_dir


def _check_remove_and_purge(inside: Namespace, state_dir: Path) -> None:
    files = inside.run("ls", "-A", state_dir).stdout.split()
    assert {"agent.db", "node-key.pem"} <= set(files), files

    removed = inside.run("dpkg", "--remove", "accelguard")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    for gone in (PREFIX, "/usr/bin/accelguard", UNIT):
        assert not inside.exists(gone), f"{gone} is still there after remove"
    # Kept until purge: the configuration and the state.
    assert inside.exists(CONFFILE) and inside.exists(state_dir / "agent.db")

    purged = inside.run("dpkg", "--purge", "accelguard")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert not inside.exists("/etc/accelguard")
    status = inside.run("dpkg-query", "--show", "--showformat=${Status}", "accelguard")
    assert status.returncode != 0 or status.stdout.endswith(" not-installed"), status.stdout
    # The journal is gone; the node key stays, so a later agent knows its journal was lost.
    assert inside.run("ls", "-A", state_dir).stdout.split() == ["node-key.pem"]
    assert "kept this node's identity" in purged.stderr


# --- the maintainer scripts and systemd ------------------------------------------------------

# systemd is not PID 1 here. Stand-ins for the two commands the maintainer scripts use, in
# /usr/local/sbin (first on the PATH dpkg passes them) and only inside the namespace: each call
# is logged, and the unit is "active" while /run/fake-unit-active exists.
_FAKE_SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >> /run/fake-systemd.log
case "$*" in
*is-active*) test -e /run/fake-unit-active ;;
esac
"""
_FAKE_INVOKE = """#!/bin/sh
echo "deb-systemd-invoke $*" >> /run/fake-systemd.log
case "$1" in
stop) rm -f /run/fake-unit-active ;;
start) touch /run/fake-unit-active ;;
esac
"""


def test_maintainer_scripts_never_start_a_first_install_and_restart_an_upgrade(
    deb: Path, tmp_path: Path
) -> None:
    with overlay_namespace(tmp_path / "overlay") as inside:
        setup = (
            "mkdir -p /run/systemd/system && "
            f"printf '%s' '{_FAKE_SYSTEMCTL}' > /usr/local/sbin/systemctl && "
            f"printf '%s' '{_FAKE_INVOKE}' > /usr/local/sbin/deb-systemd-invoke && "
            "chmod 0755 /usr/local/sbin/systemctl /usr/local/sbin/deb-systemd-invoke"
        )
        assert inside.run("sh", "-c", setup).returncode == 0

        def calls() -> list[str]:
            log = inside.run("cat", "/run/fake-systemd.log").stdout.splitlines()
            inside.run("rm", "-f", "/run/fake-systemd.log")
            return log

        def dpkg(*args: str | Path) -> None:
            result = inside.run("dpkg", *args)
            assert result.returncode == 0, result.stdout + result.stderr

        # First install: the unit is made known to systemd, and nothing else.
        dpkg("--install", deb)
        assert calls() == ["systemctl --system daemon-reload"]

        # An upgrade (the same package again) of a running agent: stopped before any file
        # changes, started again after.
        inside.run("touch", "/run/fake-unit-active")
        dpkg("--install", deb)
        assert calls() == [
            "systemctl is-active --quiet accelguard.service",
            "deb-systemd-invoke stop accelguard.service",
            "systemctl --system daemon-reload",
            "deb-systemd-invoke start accelguard.service",
        ]
        assert inside.exists("/run/fake-unit-active")
        assert not inside.exists("/run/accelguard.dpkg-restart")

        # An upgrade of a stopped agent leaves it stopped.
        inside.run("rm", "/run/fake-unit-active")
        dpkg("--install", deb)
        assert calls() == [
            "systemctl is-active --quiet accelguard.service",
            "systemctl --system daemon-reload",
        ]

        # Remove stops a running agent and does not start it again; purge removes the link an
        # operator's `systemctl enable` made.
        inside.run("touch", "/run/fake-unit-active")
        wants = "/etc/systemd/system/multi-user.target.wants/accelguard.service"
        link = f"mkdir -p {Path(wants).parent} && ln -s {UNIT} {wants}"
        assert inside.run("sh", "-c", link).returncode == 0
        dpkg("--remove", "accelguard")
        assert calls() == [
            "systemctl is-active --quiet accelguard.service",
            "deb-systemd-invoke stop accelguard.service",
            "systemctl --system daemon-reload",
        ]
        assert not inside.exists("/run/accelguard.dpkg-restart")
        dpkg("--purge", "accelguard")
        assert inside.run("test", "-L", wants).returncode != 0
