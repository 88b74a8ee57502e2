"""link subsystem."""
