"""Process-level plumbing shared by the daemon and the CLI: the state-directory lock."""
