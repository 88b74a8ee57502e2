"""Benchmarks behind ``accelguard bench``: one module per benchmark, one set of helpers.

``common`` measures and reduces (elapsed time, interleaved rounds, medians, latency percentiles,
bandwidth); ``layout``, ``lease``, ``scrub`` and ``attest`` each run one benchmark and return one
JSON-able document with a baseline measured in the same run and the ratios to it. Benchmarks sit
at the top of the tree beside the CLI: they may use the simulated node (agent/sim), and nothing
below them imports them.
"""
