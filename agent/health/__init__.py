"""GPU health: what a driver-reported fault means for the partitions and leases on a GPU."""
