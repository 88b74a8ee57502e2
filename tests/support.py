"""Helpers shared by test areas: the CLI as a subprocess and the agent as a real process."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.admin.client import AdminClient
from agent.config import Config, load_config
from agent.errors import AccelguardError
from agent.sim.node import SimNode

REPO = Path(__file__).resolve().parent.parent
ACCELGUARD = [sys.executable, "-m", "agent.cli"]


def run_cli(
    *args: str, config: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    command = [*ACCELGUARD]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO
    )


def cli_json(*args: str, config: Path | None = None) -> Any:
    result = run_cli(*args, "--json", config=config)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@dataclass
class RunningAgent:
    node: SimNode
    config: Config
    process: subprocess.Popen[str] | None = None
    log_path: Path = field(default_factory=Path)

    @property
    def config_path(self) -> Path:
        return self.node.config_path

    def start(self, env: dict[str, str] | None = None, wait: bool = True) -> None:
        self.log_path = self.node.root / f"agent-{time.monotonic_ns()}.log"
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [*ACCELGUARD, "--config", str(self.config_path), "agent"],
            stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited {self.process.returncode}:\n{self.log()}")
            try:
                with AdminClient(self.config.admin.socket, timeout_s=2) as client:
                    client.ping()
                    return
            except AccelguardError:
                time.sleep(0.05)
        raise AssertionError(f"agent not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.process is not None
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, config=self.config_path)

    def cli_json(self, *args: str) -> Any:
        return cli_json(*args, config=self.config_path)

    def partitions(self) -> list[dict[str, Any]]:
        """The partition list through the admin API in-process (cheap enough to poll)."""
        from google.protobuf.json_format import MessageToDict  # noqa: PLC0415

        with AdminClient(self.config.admin.socket, timeout_s=30) as client:
            response = client.list_partitions()
        document = MessageToDict(
            response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        return list(document.get("partitions", []))

    def mutating_calls(self) -> int:
        return mutating_calls(Path(self.config.nvml.sim_dir))


def _wait_partitions(
    agent: RunningAgent, done: Callable[[dict[str, Any]], bool], what: str, timeout: float
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    partitions: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        partitions = agent.partitions()
        if all(done(p) for p in partitions):
            return partitions
        time.sleep(0.1)
    raise AssertionError(f"partitions never {what}: {partitions}\n{agent.log()[-3000:]}")


def _clean(partition: dict[str, Any]) -> bool:
    return partition["state"] == "free" and bool(partition["clean"])


def wait_all_clean(agent: RunningAgent, timeout: float = 60) -> list[dict[str, Any]]:
    """Wait until every partition is free and clean (new partitions are scrubbed first)."""
    return _wait_partitions(agent, _clean, "all clean", timeout)


PROBE = """
import json, os, sys
cgroup, paths = sys.argv[1], json.loads(sys.argv[2])
with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
    procs.write(str(os.getpid()))
result = {}
for path in paths:
    try:
        os.close(os.open(path, os.O_RDWR))
        result[path] = 0
    except OSError as error:
        result[path] = error.errno
print(json.dumps(result))
"""


def probe(cgroup: Path, paths: list[str]) -> dict[str, int]:
    """Open each path from a fresh process inside ``cgroup``; errno per path (0 = opened)."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(cgroup), json.dumps(paths)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return {k: int(v) for k, v in json.loads(result.stdout).items()}


@contextmanager
def ready_child(process: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """A child that prints "ready" once set up (stdout piped, text): waits for that, and kills
    and reaps it when the block ends."""
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        yield process
    finally:
        process.kill()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


@contextmanager
def machine_uevents() -> Iterator[None]:
    """Holds the machine's uevents for one test: the kernel's uevents are shared by every pytest
    worker, and a device's events within one coalescing window are merged into one (carrying the
    last one's tag), so a test that writes a device's ``uevent`` file while another worker's test
    waits for its own tagged event on that device can swallow it."""
    with (Path(tempfile.gettempdir()) / "accelguard-tests-uevents.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def wait_until(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Poll ``check`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"never {what}")


def assert_fenced_to(cgroup: Path, allowed: list[str], every: list[str]) -> None:
    """From inside ``cgroup``: each of ``allowed`` opens as far as the cgroup lets it (ENXIO: no
    driver behind the simulated majors), every other node of ``every`` is EPERM, and the
    baseline (/dev/null) stays open."""
    result = probe(cgroup, [*every, "/dev/null"])
    assert result.pop("/dev/null") == 0, "the baseline must stay open"
    wrong = {
        path: errno.errorcode.get(code, code)
        for path, code in result.items()
        if code != (errno.ENXIO if path in allowed else errno.EPERM)
    }
    assert not wrong, wrong


def all_gpu_nodes(dev_root: Path) -> list[str]:
    nodes = [p for p in dev_root.iterdir() if p.name.startswith("nvidia") and not p.is_dir()]
    nodes += list((dev_root / "nvidia-caps").iterdir())
    return sorted(str(p) for p in nodes)


def wait_settled(agent: RunningAgent, timeout: float = 60) -> list[dict[str, Any]]:
    """Wait until every partition is free and clean, or quarantined with a reason."""
    return _wait_partitions(
        agent,
        lambda p: _clean(p) or (p["state"] == "quarantined" and bool(p["reason"])),
        "settled",
        timeout,
    )


@contextmanager
def restored_environment(names: Sequence[str]) -> Iterator[None]:
    """Whatever the block sets or removes of ``names`` in os.environ is undone after it."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def running_agent(node: SimNode) -> Iterator[RunningAgent]:
    """The agent of ``node`` as a real process for the duration of the block."""
    running = RunningAgent(node=node, config=load_config(node.config_path))
    running.start()
    try:
        yield running
    finally:
        if running.process is not None:
            running.stop(signal.SIGKILL)


# Simulators' state directories on tmpfs when there is one: every mutating call renames files
# and fsyncs one, which costs milliseconds on a disk and microseconds in memory.
_FAST_TMP = Path("/dev/shm")


def fast_temp_dir(prefix: str) -> Path:
    """A new temporary directory, on /dev/shm where it is writable."""
    base = _FAST_TMP if _FAST_TMP.is_dir() and os.access(_FAST_TMP, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def mutating_calls(sim_dir: Path) -> int:
    """A simulator's (nvml-sim, dcmi-sim) count of mutating calls, from its ``counters`` file."""
    counters = sim_dir / "counters"
    if not counters.exists():
        return 0
    name, value = counters.read_text().split()
    assert name == "mutating_calls"
    return int(value)
