"""The node's link identity: its TLS key and certificate, the pinned controller CA, enrollment."""
