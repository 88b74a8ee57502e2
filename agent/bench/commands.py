"""``accelguard bench link``'s remote-command part: ``ctl`` to result, beside the local admin call
doing the same work, in one run (docs/commands.md).

One controller process and one agent process on a simulated node with its own swtpm, enrolled
for real (``accelguard enroll``: TPM credential activation) and attested by the controller on
connect. Rounds alternate, so drift hits both sides alike:

* **grant**: ``RunCommand(grant_lease)`` on the controller's admin socket (sign, queue, send down
  the link, the node's checks and replay cache, the grant, the result report committed at the
  controller, the waiter woken) against ``GrantLease`` on the node's own admin socket. Each
  lease is released between rounds (untimed). Aim: remote p50 within 15 ms of local p50.
* **attest**: ``RunCommand(attest)`` (fresh nonce, quote by the enrolled AK, the evidence sent
  up and verified by the controller) against the node's own quote of the same PCRs
  (``TpmAttester`` in this process: the same TPM work, no link and no verification).
* **ping**: the node's no-op admin call, the floor of any local call.

The node's firmware log is the Spec ID header alone (a fresh swtpm's PCRs are all initial), so
the controller's verification passes and the node stays trusted and uncordoned.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Final

from agent.bench.common import latency, start_agent, wait_all_clean, wait_for_agent
from agent.errors import LinkError, ValidationError

AIM_EXTRA_MS: Final = 15.0
START_TIMEOUT_S: Final = 60.0
COMMAND_TIMEOUT_S: Final = 120.0


def _wait(condition: Any, what: str, timeout: float = START_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise LinkError(f"bench link commands: timed out waiting for {what}")


def _cgroup_parent(stack: contextlib.ExitStack) -> Path:
    from agent.isolation.cgroups import hierarchy_mounts  # noqa: PLC0415

    mounts = hierarchy_mounts("v2") or hierarchy_mounts("v1-devices")
    if not mounts:
        raise ValidationError("no cgroup v2 or v1 devices hierarchy is mounted: nothing to fence")
    parent = mounts[0] / f"accelguard-bench-{uuid.uuid4().hex[:8]}"
    parent.mkdir()

    def remove() -> None:
        for path in [*parent.iterdir(), parent]:
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()

    stack.callback(remove)
    return parent


def bench_commands(directory: Path, rounds: int) -> dict[str, Any]:
    """Run the command benchmark in ``directory`` (a short path: it holds Unix sockets)."""
    import shutil  # noqa: PLC0415

    if shutil.which("swtpm") is None:
        return {"skipped": "no swtpm binary: the node needs a TPM to enroll and attest"}
    if rounds < 1:
        raise ValidationError("rounds must be positive")
    with contextlib.ExitStack() as stack:
        return _run(stack, directory, rounds)


def _run(stack: contextlib.ExitStack, directory: Path, rounds: int) -> dict[str, Any]:
    import json  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from agent.admin.client import AdminClient  # noqa: PLC0415
    from agent.bench.attest import synthetic_event_log  # noqa: PLC0415
    from agent.bench.link import BenchController  # noqa: PLC0415
    from agent.config import config_as_dict, load_config, parse_config, to_toml  # noqa: PLC0415
    from agent.controller.client import ControllerClient  # noqa: PLC0415
    from agent.controller.pki import ControllerPki  # noqa: PLC0415
    from agent.link.attestation import TpmAttester  # noqa: PLC0415
    from agent.proto.accelguard.v1 import admin_pb2, controller_pb2, link_pb2  # noqa: PLC0415
    from agent.runtime.executor import BlockingExecutor  # noqa: PLC0415
    from agent.runtime.process import stop_process  # noqa: PLC0415
    from agent.sim.node import init_sim_node  # noqa: PLC0415
    from agent.sim.swtpm import Swtpm  # noqa: PLC0415

    parent = _cgroup_parent(stack)
    controller = BenchController(directory / "controller", None)
    controller.init()
    controller.start()
    stack.callback(controller.stop)
    ports = json.loads((controller.directory / "listening.json").read_text())
    swtpm = Swtpm(directory / "swtpm")
    swtpm.start()
    stack.callback(swtpm.stop)

    node = init_sim_node(directory / "node", "h100x2", [parent], mig_enabled=False)
    (node.root / "eventlog.bin").write_bytes(synthetic_event_log(0))
    document = config_as_dict(load_config(node.config_path))
    document["link"].update(
        {"controller": controller.link_address, "cert_dir": str(node.root / "link")}
    )
    document["attest"].update(
        {"tcti": swtpm.tcti, "event_log": str(node.root / "eventlog.bin"),
         "ima_log": str(node.root / "no-ima-list")}
    )  # fmt: skip
    config = parse_config(document)
    node.config_path.write_text(to_toml(config))
    cli = [sys.executable, "-m", "agent.cli", "--config", str(node.config_path)]
    agent = start_agent(node.config_path, node.root / "agent.log")
    stack.callback(stop_process, agent)
    admin = stack.enter_context(AdminClient(config.admin.socket))
    wait_for_agent(admin, agent)
    ctl = stack.enter_context(ControllerClient(controller.admin_socket, timeout_s=60))
    token = ctl.create_token(config.node.id, 600).token
    fingerprint = ControllerPki(controller.pki_dir, "bench.fleet").fingerprint
    enrolled = subprocess.run(
        [*cli, "enroll", "--controller", f"127.0.0.1:{ports['enroll_port']}", "--token", token,
         "--ca-fingerprint", fingerprint],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if enrolled.returncode != 0:
        raise LinkError(f"bench link commands: enrollment failed: {enrolled.stderr.strip()}")

    def trusted() -> bool:
        summary = ctl.node(config.node.id).summary
        if summary.trust == "untrusted":
            detail = ctl.node(config.node.id)
            raise LinkError(f"the bench node failed attestation: {list(detail.trust_reasons)}")
        return bool(summary.connected and summary.trust == "trusted")

    _wait(trusted, "the node to connect and pass attestation", timeout=120)
    wait_all_clean(admin)
    tenant = parent / "tenant"
    tenant.mkdir()
    executor = BlockingExecutor()
    stack.callback(executor.shutdown)
    attester = TpmAttester(config.attest, executor)

    def remote(body: str, message: Any) -> float:
        request = controller_pb2.RunCommandRequest(
            node_id=config.node.id, timeout_s=COMMAND_TIMEOUT_S
        )
        getattr(request, body).CopyFrom(message)
        started = time.perf_counter()
        status = ctl.run_command(request)
        elapsed = time.perf_counter() - started
        if status.state != "done":
            raise LinkError(f"bench: remote {body} ended {status.state}: {status.result.error}")
        if body == "grant_lease":
            _release(admin, status.result.grant.lease.id)
        return elapsed

    def local_grant() -> float:
        request = admin_pb2.GrantLeaseRequest(tenant="bench", profile="gpu", cgroup=str(tenant))
        started = time.perf_counter()
        response = admin.grant_lease(request)
        elapsed = time.perf_counter() - started
        _release(admin, response.lease.id)
        return elapsed

    def local_quote() -> float:
        import asyncio  # noqa: PLC0415

        command = link_pb2.AttestCommand(nonce=os.urandom(32))
        started = time.perf_counter()
        asyncio.run(attester.attest(command))
        return time.perf_counter() - started

    def ping() -> float:
        started = time.perf_counter()
        admin.ping()
        return time.perf_counter() - started

    grant = link_pb2.GrantLeaseCommand(tenant="bench", profile="gpu", cgroup=str(tenant))
    kinds = ("remote_grant", "local_grant", "remote_attest", "local_quote", "ping")
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    for index in range(rounds + 2):
        taken = {
            "remote_grant": remote("grant_lease", grant),
            "local_grant": local_grant(),
            "remote_attest": remote("attest", link_pb2.AttestCommand()),
            "local_quote": local_quote(),
            "ping": ping(),
        }
        if index >= 2:  # the first two rounds warm up both paths
            for key, value in taken.items():
                samples[key].append(value)
    result: dict[str, Any] = {key: latency(values) for key, values in samples.items()}
    extra = result["remote_grant"]["p50_ms"] - result["local_grant"]["p50_ms"]
    result["rounds"] = {"count": rounds}
    result["remote_grant_extra_p50_ms"] = {"value": extra}
    result["aim"] = {
        "remote_grant_p50_within_ms_of_local": AIM_EXTRA_MS,
        "met": extra <= AIM_EXTRA_MS,
    }
    return result


def _release(admin: Any, lease_id: str) -> None:
    admin.release_lease(lease_id)
    wait_all_clean(admin)
