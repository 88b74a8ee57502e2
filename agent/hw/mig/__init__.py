"""MIG: the geometry NVML reports, the exact placement planner, reference profile tables and
the NVIDIA mig-parted config reader."""
