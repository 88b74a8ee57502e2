"""``accelguard scrub certs`` and ``scrub verify-cert``: the node's signed scrub certificates.

``verify-cert`` runs offline (no agent): it checks a certificate against a public key given with
``--public-key``, or this node's own key, never the key the certificate carries. It takes one
certificate or what ``scrub certs --json`` prints (``{"certificates": [...]}``, every one
checked), and exits 0 only when every signature is valid over a scrub that was verified.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from agent.cli.output import add_output, print_json, print_table
from agent.config import Config, load_config
from agent.errors import AccelguardError, ValidationError


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    scrub = commands.add_parser("scrub", help="scrub certificates")
    scrub_verbs = scrub.add_subparsers(dest="verb", required=True)
    certs = scrub_verbs.add_parser("certs", help="the node's signed scrub certificates")
    certs.add_argument("--partition", default="", help="only this partition's")
    add_output(certs, wide=True)
    verify_cert = scrub_verbs.add_parser("verify-cert", help="check certificates offline")
    verify_cert.add_argument(
        "file", type=Path, help="one certificate, or the output of `scrub certs --json`"
    )
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
        print_json({"certificates": documents})
        return 0
    wide = args.output_format == "wide"
    headers: tuple[str, ...] = ("finished", "partition", "scrub", "coverage", "lease")
    if wide:
        headers += ("tenant", "policy", "backend", "gpu serial")
    print_table(headers, (_certificate_row(d["payload"], wide=wide) for d in documents),
                empty="no scrub certificates")  # fmt: skip
    return 0


def _certificate_row(payload: dict[str, Any], *, wide: bool) -> tuple[Any, ...]:
    verdict = "verified" if payload["verified"] else "NOT verified"
    row: tuple[Any, ...] = (payload["finished_at"], payload["partition_uuid"], verdict,
                            payload["coverage"], payload["previous_lease_id"])  # fmt: skip
    if wide:
        row += (payload["previous_tenant"], payload["policy"], payload["backend"],
                payload["gpu_serial"])  # fmt: skip
    return row


def _verify_certificate(args: argparse.Namespace, config: Config | None) -> int:
    from agent.runtime.inputs import read_bounded  # noqa: PLC0415
    from agent.scrub.certificate import (  # noqa: PLC0415
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
    certificates = _read_certificates(args.file)
    all_verified = True
    for index, certificate in enumerate(certificates):
        where = f"certificate {index + 1} of {len(certificates)}: " if len(certificates) > 1 else ""
        try:
            checked = verify_certificate(certificate, trusted)
        except AccelguardError as error:
            if len(certificates) == 1:
                raise
            raise type(error)(f"{where}{error}") from error
        payload = checked.payload
        all_verified = all_verified and checked.scrub_verified
        print(
            f"{where}signature OK ({source}, {checked.key_fingerprint}): "
            f"{payload['partition_uuid']} "
            f"scrubbed {'and verified' if checked.scrub_verified else 'but NOT verified'}, "
            f"coverage {payload['coverage']}"
        )
    return 0 if all_verified else 1


def _read_certificates(path: Path) -> list[object]:
    """One certificate, held to its own limits; or, when the file is not that, what `scrub certs
    --json` prints: {"certificates": [...]} (or the bare array older agents printed), each
    element then held to one certificate's limits."""
    from agent.runtime.inputs import parse_json, read_bounded  # noqa: PLC0415
    from agent.scrub.certificate import (  # noqa: PLC0415
        CERTIFICATE_JSON_LIMITS,
        CERTIFICATE_LIST_JSON_LIMITS,
    )

    raw = read_bounded(path, CERTIFICATE_LIST_JSON_LIMITS.max_bytes, "certificate")
    try:
        single = parse_json(raw, CERTIFICATE_JSON_LIMITS, f"certificate {path}")
    except ValidationError as refused_as_one:
        try:
            listed = parse_json(raw, CERTIFICATE_LIST_JSON_LIMITS, f"certificate file {path}")
        except ValidationError:
            raise refused_as_one from None
        if not _is_list_document(listed):
            raise refused_as_one from None
        single = listed
    if not _is_list_document(single):
        return [single]
    certificates = single["certificates"] if isinstance(single, dict) else single
    if not isinstance(certificates, list):  # _is_list_document said it is; for the type checker
        raise ValidationError(f"certificate file {path}: no list of certificates")
    if not certificates:
        raise ValidationError(f"certificate file {path}: holds no certificates")
    for index, certificate in enumerate(certificates, start=1):
        encoded = json.dumps(certificate).encode()
        parse_json(encoded, CERTIFICATE_JSON_LIMITS, f"certificate {index} in {path}")
    return certificates


def _is_list_document(document: object) -> bool:
    if isinstance(document, dict):
        return set(document) == {"certificates"} and isinstance(document["certificates"], list)
    return isinstance(document, list)


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
