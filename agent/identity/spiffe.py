"""Node ids and their SPIFFE ids (``spiffe://<trust-domain>/node/<id>``), shared by both ends."""

from __future__ import annotations

import re
from typing import Final

from cryptography import x509

from agent.errors import LinkProtocolError

# Node ids are what `node.id` holds (a host name by default): one DNS-label-like token.
NODE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
TRUST_DOMAIN: Final = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


def check_node_id(node_id: str) -> str:
    if not isinstance(node_id, str) or NODE_ID.fullmatch(node_id) is None:
        raise LinkProtocolError(
            f"node id {str(node_id)[:80]!r} is invalid: 1-63 characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return node_id


def spiffe_id(trust_domain: str, node_id: str) -> str:
    return f"spiffe://{trust_domain}/node/{check_node_id(node_id)}"


def node_id_of(certificate: x509.Certificate, trust_domain: str | None = None) -> str:
    """The node id in a certificate's one URI SAN; LinkProtocolError when there is not exactly
    one ``spiffe://<trust-domain>/node/<id>`` URI (of ``trust_domain`` when given)."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise LinkProtocolError("certificate has no subject alternative name") from None
    uris = extension.value.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise LinkProtocolError(f"certificate must carry exactly one URI SAN, has {len(uris)}")
    match = re.fullmatch(r"spiffe://([^/]+)/node/([^/]+)", uris[0])
    if match is None:
        raise LinkProtocolError(f"certificate URI SAN {uris[0][:120]!r} is not a node SPIFFE id")
    if trust_domain is not None and match.group(1) != trust_domain:
        raise LinkProtocolError(
            f"certificate is for trust domain {match.group(1)[:64]!r}, not {trust_domain!r}"
        )
    return check_node_id(match.group(2))
