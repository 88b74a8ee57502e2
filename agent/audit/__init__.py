"""The tamper-evident audit log (docs/audit.md).

Records are written by the journal itself (agent/store/audit.py), in the transaction of the
action they record. This package signs checkpoints over the chain with the node key
(``checkpoint``), runs the daemon's audit service (``trail``: checkpoints, rotation, the agent's
start and stop), and verifies a log against its checkpoints (``verify``).
"""
