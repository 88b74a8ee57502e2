#!/usr/bin/env bash
# `make demo`: the main job on a simulated 2-GPU H100 node. A mixed MIG layout is applied through
# the agent, a tenant gets a partition fenced by the kernel, leaves a secret in its memory, and the
# release revokes, evicts, scrubs and signs a certificate; the next tenant finds nothing.
# Safe to run again: the layout is then already in place and nothing is re-created.
set -euo pipefail
cd "$(dirname "$0")/.."
AG=.venv/bin/accelguard
DIR=${ACCELGUARD_DEMO_DIR:-/tmp/accelguard-demo}

CGROUP_ROOT=$(.venv/bin/python -c 'from agent.isolation.cgroups import hierarchy_mounts as m; r = m("v2") or m("v1-devices"); print(r[0] if r else "")')
PARENT=""
if [ -n "$CGROUP_ROOT" ]; then
  PARENT="$CGROUP_ROOT/accelguard-demo"
  mkdir -p "$PARENT/tenant-a"
fi

$AG sim init --dir "$DIR" --topology h100x2 ${PARENT:+--cgroup-parent "$PARENT"}
CONFIG="$DIR/agent.toml"
ag() { $AG --config "$CONFIG" "$@"; }

# Started directly (not through the `ag` function) so that $! is the agent itself.
$AG --config "$CONFIG" agent >"$DIR/agent.log" 2>&1 &
AGENT=$!
cleanup() {
  kill -TERM $AGENT 2>/dev/null || true
  wait $AGENT 2>/dev/null || true
  [ -n "$PARENT" ] && rmdir "$PARENT/tenant-a" "$PARENT" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 300); do
  ag status --json >/dev/null 2>&1 && break
  kill -0 $AGENT 2>/dev/null || { cat "$DIR/agent.log"; exit 1; }
  sleep 0.1
done
echo "== layout: GPU0 3g.40gb=1 2g.20gb=1 1g.10gb=2, GPU1 7g.80gb=1 (--wait: until scrubbed and clean)"
ag layout apply --gpu 0 3g.40gb=1 2g.20gb=1 1g.10gb=2 --wait 60
ag layout apply --gpu 1 7g.80gb=1 --wait 60
echo
echo "== the node matches the layout (layout assert: exit 0), and the same as a mig-parted file"
ag layout assert --gpu 0 3g.40gb=1 2g.20gb=1 1g.10gb=2
ag layout export
echo
echo "== inventory (new instances are scrubbed before they are free)"
ag status

if [ -z "$PARENT" ]; then
  echo; echo "no cgroup v2 or v1 devices hierarchy here: skipping the tenant lease part"; exit 0
fi
echo
echo "== tenant A leases a 3g.40gb instance; its cgroup can open exactly these nodes"
LEASE_JSON=$(ag lease grant --tenant alice --profile 3g.40gb --cgroup "$PARENT/tenant-a" --json)
LEASE=$(echo "$LEASE_JSON" | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["lease"]["id"])')
PART=$(echo "$LEASE_JSON" | .venv/bin/python -c 'import json, sys; d = json.load(sys.stdin)["partition"]; print(d["uuid"]); [print("  " + n, file=sys.stderr) for n in d["device_nodes"]]')
CDI=$(echo "$LEASE_JSON" | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["cdi_device"])')
echo "lease $LEASE on $PART, for containers: CDI device $CDI"
ag sim write --partition "$PART" --pattern "alice-secret-weights"
echo -n "tenant A reads back: "; ag sim read --partition "$PART" --find "alice-secret-weights"
echo
echo "== release: fence revoked, holders evicted, memory scrubbed and verified"
ag lease release "$LEASE"
echo -n "the next tenant reads: "; ag sim read --partition "$PART" --find "alice-secret-weights"
echo
echo "== signed scrub certificates"
ag scrub certs --partition "$PART"
echo
echo "== the audit log: who did what (the last records), and its chain and signed checkpoints"
ag audit show --limit 8
ag audit verify
echo
echo "agent log: $DIR/agent.log"
