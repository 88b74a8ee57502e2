"""The admin API: gRPC over the daemon's local Unix socket, the only way the CLI reaches it.

``server`` is the gRPC servicer, one guard per call, served by ``unix_socket`` (owner, group
and mode of the socket, which any local admin API can use); ``handlers`` does the work of each
call against the small interfaces it declares for the lease manager, the inventory and layout;
``convert`` builds the protobuf messages; ``status`` is the one table between accelguard's
errors and gRPC status codes, read by ``server`` one way and by ``client`` (the CLI's side) the
other. The package sits above ``partitions/`` and below ``daemon.py``, which
wires it; nothing here is imported on import of the package, so the CLI pays only for the client.
"""
