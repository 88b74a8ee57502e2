#!/usr/bin/env bash
# `make demo`: a simulated 2-GPU H100 node, a mixed MIG layout applied through the agent, and the
# resulting inventory. Safe to run again: the layout is then already in place and nothing changes.
set -euo pipefail
cd "$(dirname "$0")/.."
AG=.venv/bin/accelguard
DIR=${ACCELGUARD_DEMO_DIR:-/tmp/accelguard-demo}

$AG sim init --dir "$DIR" --topology h100x2
CONFIG="$DIR/agent.toml"

$AG --config "$CONFIG" agent 2>"$DIR/agent.log" &
AGENT=$!
trap 'kill -TERM $AGENT 2>/dev/null; wait $AGENT 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  $AG --config "$CONFIG" status --json >/dev/null 2>&1 && break
  kill -0 $AGENT 2>/dev/null || { cat "$DIR/agent.log"; exit 1; }
  sleep 0.1
done

echo "== layout: GPU0 3g.40gb=1 2g.20gb=1 1g.10gb=2, GPU1 7g.80gb=1"
$AG --config "$CONFIG" layout apply --gpu 0 3g.40gb=1 2g.20gb=1 1g.10gb=2
$AG --config "$CONFIG" layout apply --gpu 1 7g.80gb=1
echo
echo "== inventory"
$AG --config "$CONFIG" status
echo
echo "agent log: $DIR/agent.log"
