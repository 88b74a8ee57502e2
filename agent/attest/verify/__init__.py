"""Verifier side of attestation: one evidence document against quote, logs and policy."""
