"""isolation subsystem."""
