"""The reference controller (its own process): enrollment, the node link, the fleet's store."""
