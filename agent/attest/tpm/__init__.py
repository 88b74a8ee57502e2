"""TPM 2.0: algorithms, structures on the wire, quote and AK checks, credentials, the TSS client.

Only ``client.py`` imports tpm2-pytss; everything else here is pure and runs on the controller.
"""
