"""Huawei Ascend NPUs through DCMI (libdcmi.so): the bindings, the backend, vNPU templates, the
vNPU planner and the device nodes a partition needs. dcmi-sim (docs/dcmi-sim.md) stands in for
the library on a simulated node and in CI."""
