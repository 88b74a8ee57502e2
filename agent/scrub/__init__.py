"""scrub subsystem."""
