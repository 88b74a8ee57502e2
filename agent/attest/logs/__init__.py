"""The logs a node ships with its quote: the TCG firmware event log and the IMA list."""
