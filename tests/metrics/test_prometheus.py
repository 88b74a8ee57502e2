"""The metrics against the Prometheus project's own tools: ``promtool check metrics`` lints a
scrape, a real Prometheus server scrapes the real endpoint and answers PromQL with the journal's
numbers, and the alert rules in docs/metrics.md pass ``promtool check rules``, their unit tests
(``promtool test rules``) and evaluate against the scraped series."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import Metrics
from agent.runtime.net import free_port
from tests.metrics.support import SOURCES, Journal, fetch, populate, promtool, serve
from tests.support import REPO

DOCS = REPO / "docs" / "metrics.md"
PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or shutil.which("promtool") is None,
    reason="the Prometheus server and promtool are not installed (Debian: apt install prometheus)",
)
# How long Prometheus gets to start, scrape and evaluate: a liveness bound, not a measurement.
WAIT_S = 90.0


def _docs_block(marker: str) -> str:
    """The fenced YAML block of docs/metrics.md whose text contains ``marker``."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"docs/metrics.md: expected one yaml block with {marker!r}"
    return found[0]


def _exposition(journal: Journal) -> str:
    metrics = Metrics(journal.store.path, SOURCES)
    populate(journal)
    journal.refuse("signature")
    metrics.observe_grant(0.02)
    metrics.observe_release(3.0)
    with serve(metrics.registry) as url:
        return fetch(url)


@needs_prometheus
def test_promtool_finds_nothing_to_lint(journal: Journal) -> None:
    checked = promtool("check", "metrics", stdin=_exposition(journal))
    output = (checked.stdout + checked.stderr).strip()
    assert checked.returncode == 0, output
    assert not output, f"promtool lint problems:\n{output}"


def test_every_metric_is_documented_and_every_documented_one_exists(journal: Journal) -> None:
    served = set()
    for family in text_string_to_metric_families(_exposition(journal)):
        if family.name.endswith("_created"):
            continue  # prometheus_client's own, for the in-process histograms
        served.add(family.name + ("_total" if family.type == "counter" else ""))
    documented = set(re.findall(r"^\| `(accelguard_[a-z_]+)` \|", DOCS.read_text(), re.MULTILINE))
    assert served - documented == set(), "served but not in docs/metrics.md"
    assert documented - served == set(), "in docs/metrics.md but not served"


@needs_prometheus
def test_the_documented_scrape_config_and_alert_rules_pass_promtool(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(_docs_block("scrape_configs:"))
    checked = promtool("check", "config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = tmp_path / "alerts.yml"
    rules.write_text(_docs_block("groups:"))
    checked = promtool("check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 9 rules found" in checked.stdout, checked.stdout


def _expected(alertname: str, summary: str, **labels: str) -> dict[str, Any]:
    """An alert as promtool should render it: the rule's annotations, its summary rendered."""
    rules = yaml.safe_load(_docs_block("groups:"))["groups"][0]["rules"]
    rule = next(r for r in rules if r["alert"] == alertname)
    return {
        "exp_labels": {**rule["labels"], **labels},
        "exp_annotations": {**rule["annotations"], "summary": summary},
    }


def _rule_tests() -> dict[str, Any]:
    """Unit tests of a few rules (promtool's format), on series as an agent exposes them."""
    n1 = {"instance": "n1"}
    return {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'accelguard_gpu_healthy{instance="n1", gpu="0"}',
                     "values": "1x5 0x5"},
                    # Written at t=0 and never acknowledged.
                    {"series": "accelguard_link_outbox_oldest_unacked_timestamp_seconds"
                               '{instance="n1"}', "values": "0x30"},
                    {"series": 'accelguard_scrub_failures_total{instance="n1", reason="deadline"}',
                     "values": "0 1 2 3 3 3"},
                    {"series": 'accelguard_command_refusals_journaled_total{instance="n1"}',
                     "values": "5x5 5+30x5"},
                ],
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": "AccelguardGpuUnhealthy", "exp_alerts": []},
                    {"eval_time": "8m", "alertname": "AccelguardGpuUnhealthy", "exp_alerts": [
                        _expected("AccelguardGpuUnhealthy",
                                  "GPU 0 on n1 is failed, lost or unreadable", gpu="0", **n1)]},
                    {"eval_time": "14m", "alertname": "AccelguardOutboxNotAcknowledged",
                     "exp_alerts": []},
                    {"eval_time": "16m", "alertname": "AccelguardOutboxNotAcknowledged",
                     "exp_alerts": [_expected(
                         "AccelguardOutboxNotAcknowledged",
                         "n1: reports not acknowledged for 15 minutes", **n1)]},
                    {"eval_time": "2m", "alertname": "AccelguardScrubFailuresRising",
                     "exp_alerts": []},
                    {"eval_time": "5m", "alertname": "AccelguardScrubFailuresRising",
                     "exp_alerts": [_expected(
                         "AccelguardScrubFailuresRising",
                         "n1: 3 scrubs failed (deadline) in 1h", reason="deadline",
                         **n1)]},
                    {"eval_time": "5m", "alertname": "AccelguardCommandRefusalsSpike",
                     "exp_alerts": []},
                    {"eval_time": "10m", "alertname": "AccelguardCommandRefusalsSpike",
                     "exp_alerts": [_expected(
                         "AccelguardCommandRefusalsSpike",
                         "n1 refused 120 remote commands in 10 minutes", **n1)]},
                ],
            }
        ],
    }  # fmt: skip


@needs_prometheus
def test_the_documented_alerts_fire_when_they_should(tmp_path: Path) -> None:
    (tmp_path / "alerts.yml").write_text(_docs_block("groups:"))
    cases = tmp_path / "alerts_test.yml"
    cases.write_text(yaml.safe_dump(_rule_tests()))
    checked = subprocess.run(
        ["promtool", "test", "rules", cases.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- a real Prometheus server ---------------------------------------------------------------------


def _api(port: int, path: str, **query: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - http://127.0.0.1
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]


@contextmanager
def _prometheus(tmp_path: Path, target: str, rules: Path) -> Iterator[int]:
    assert PROMETHEUS is not None
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {"job_name": "accelguard", "static_configs": [{"targets": [target]}]}
                ],
            }
        )
    )
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _eventually(what: str, check: Any, log: Path) -> Any:
    deadline = time.monotonic() + WAIT_S
    last: object = None
    while time.monotonic() < deadline:
        try:
            found = check()
        except (urllib.error.URLError, ConnectionError) as error:
            found, last = None, error
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"{what}: not after {WAIT_S}s (last: {last})\n{log.read_text()[-4000:]}")


@needs_prometheus
def test_a_real_prometheus_scrapes_the_agent_and_evaluates_the_alerts(
    tmp_path: Path, journal: Journal
) -> None:
    metrics = Metrics(journal.store.path, SOURCES)
    populate(journal)
    rules = tmp_path / "alerts.yml"
    rules.write_text(_docs_block("groups:"))
    log = tmp_path / "prometheus.log"
    with serve(metrics.registry) as url:
        target = url.removeprefix("http://").removesuffix("/metrics")
        with _prometheus(tmp_path, target, rules) as port:

            def value_of(query: str) -> float | None:
                result = _api(port, "query", query=query)["result"]
                return float(result[0]["value"][1]) if result else None

            assert (
                _eventually(
                    "free partitions", lambda: value_of('accelguard_partitions{state="free"}'), log
                )
                == 2
            )
            assert value_of('accelguard_partitions{state="quarantined"}') == 3
            assert value_of("accelguard_leases_granted_total") == 4
            assert value_of('accelguard_scrub_failures_total{reason="deadline"}') == 1
            # The scrub histogram is one Prometheus understands: a median from its buckets.
            median = value_of("histogram_quantile(0.5, accelguard_scrub_duration_seconds_bucket)")
            assert median is not None
            assert 0.1 <= median <= 5.0
            target_health = _api(port, "targets")["activeTargets"][0]
            assert target_health["health"] == "up", target_health

            # Every rule evaluates without error on the real series; those whose condition holds
            # on this node (a lost GPU, quarantined partitions, the cordon, the link down) are
            # pending or firing.
            def evaluated() -> list[dict[str, Any]] | None:
                rules_now = [r for g in _api(port, "rules")["groups"] for r in g["rules"]]
                done = all(
                    not r.get("lastEvaluation", "0001").startswith("0001") for r in rules_now
                )
                return rules_now if rules_now and done else None

            for rule in _eventually("rule evaluation", evaluated, log):
                assert rule["health"] == "ok", rule

            def alerting() -> set[str] | None:
                names = {alert["labels"]["alertname"] for alert in _api(port, "alerts")["alerts"]}
                return names if len(names) >= 4 else None

            names = _eventually("pending alerts", alerting, log)
            assert {
                "AccelguardGpuUnhealthy",
                "AccelguardPartitionsQuarantined",
                "AccelguardNodeCordoned",
                "AccelguardLinkDown",
            } <= names
