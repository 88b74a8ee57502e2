"""The CUDA scrub backend (hardware nodes), one module per concern, lowest layer first.

- ``driver``: the CUDA driver API through ctypes; every driver error becomes ``ScrubError`` here.
- ``chunks``: allocating all device memory in chunks with back-off (pure; CI tests it).
- ``kernels``: the contract with ``native/scrub/scrub.cu`` and where its PTX is found.
- ``device``: device 0, its context, buffers, the kernels' module, all memory, event timers,
  each released when its block ends.
- ``passes``: the device work: write a pattern, verify it, the on-chip shared-memory pass.
- ``backend``: ``CudaScrubBackend``, what the scrub worker runs.
- ``benchmark``: ``accelguard bench scrub`` on a GPU, against a device-to-device copy.
- ``diagnostics``: plant a word and look for it (the hardware residue test).
"""
