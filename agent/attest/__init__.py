"""attest subsystem."""
