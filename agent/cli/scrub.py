"""``accelguard scrub certs`` and ``scrub verify-cert``: the node's signed scrub certificates.

``verify-cert`` runs offline (no agent): it checks a certificate against a public key given with
``--public-key``, or this node's own key, never the key the certificate carries. It exits 0 only
for a valid signature over a scrub that was verified.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from agent.cli.output import print_json
from agent.config import Config, load_config
from agent.errors import AccelguardError, ValidationError


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    scrub = commands.add_parser("scrub", help="scrub certificates")
    scrub_verbs = scrub.add_subparsers(dest="verb", required=True)
    certs = scrub_verbs.add_parser("certs", help="the node's signed scrub certificates")
    certs.add_argument("--partition", default="", help="only this partition's")
    certs.add_argument("--json", action="store_true")
    verify_cert = scrub_verbs.add_parser("verify-cert", help="check a certificate offline")
    verify_cert.add_argument("file", type=Path, help="one certificate (an element of certs --json)")
    verify_cert.add_argument(
        "--public-key", type=Path, help="the signing node's public key PEM (default: this node's)"
    )


def run(args: argparse.Namespace, config: Config | None = None) -> int:
    if args.verb == "verify-cert":  # offline: no agent, and a config only for this node's key
        return _verify_certificate(args, config)
    if config is None:
        config = load_config(args.config)
    from agent.admin.client import AdminClient  # noqa: PLC0415

    with AdminClient(config.admin.socket) as client:
        documents = [json.loads(text) for text in client.certificates(args.partition)]
    if args.json:
        print_json(documents)
        return 0
    for document in documents:
        payload = document["payload"]
        verdict = "verified" if payload["verified"] else "NOT verified"
        print(
            f"{payload['finished_at']}  {payload['partition_uuid']}  {verdict}  "
            f"coverage {payload['coverage']}  lease {payload['previous_lease_id'] or '-'}"
        )
    return 0


def _verify_certificate(args: argparse.Namespace, config: Config | None) -> int:
    from agent.runtime.inputs import read_bounded, read_json_file  # noqa: PLC0415
    from agent.scrub.certificate import (  # noqa: PLC0415
        CERTIFICATE_JSON_LIMITS,
        MAX_PUBLIC_KEY_FILE_BYTES,
        verify_certificate,
    )

    if args.public_key is not None:
        raw = read_bounded(args.public_key, MAX_PUBLIC_KEY_FILE_BYTES, "public key")
        try:
            trusted = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ValidationError(f"public key {args.public_key}: not a PEM file") from None
        source = f"the key in {args.public_key}"
    else:
        trusted, source = _own_node_public_key(args, config)
    document = read_json_file(args.file, CERTIFICATE_JSON_LIMITS, "certificate")
    checked = verify_certificate(document, trusted)
    payload = checked.payload
    print(
        f"signature OK ({source}, {checked.key_fingerprint}): {payload['partition_uuid']} "
        f"scrubbed {'and verified' if checked.scrub_verified else 'but NOT verified'}, "
        f"coverage {payload['coverage']}"
    )
    return 0 if checked.scrub_verified else 1


def _own_node_public_key(args: argparse.Namespace, config: Config | None) -> tuple[str, str]:
    """This node's public key, for verify-cert without --public-key. The certificate's embedded
    key is never the fallback: anyone can re-sign an edited payload and embed their own key."""
    from agent.identity.node_key import NODE_KEY_FILE, NodeKey  # noqa: PLC0415

    hint = "pass --public-key FILE with the signing node's key (`accelguard status` prints it)"
    try:
        path = (config or load_config(args.config)).node.state_dir / NODE_KEY_FILE
        key = NodeKey.load(path)
    except AccelguardError as error:
        raise ValidationError(f"no key to verify against ({error}); {hint}") from error
    return key.public_pem(), f"this node's key {path}"
