"""The simulated node: nvml-sim state, a /dev tree made with mknod, proc files, device memory."""
