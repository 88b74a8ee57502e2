"""verify_certificate on hostile input: whatever JSON arrives, the only exception is ScrubError;
whatever bytes a certificate file holds, the reader adds only ValidationError.

Certificates come from nodes and sit in files and queues the controller reads; a verifier that
crashes with a TypeError on a malformed one is a verifier that can be knocked over.
"""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import ScrubError, ValidationError
from agent.identity.node_key import NodeKey
from agent.runtime.inputs import parse_json
from agent.scrub.certificate import CERTIFICATE_JSON_LIMITS, verify_certificate
from tests.fuzzing import MUTATIONS, fuzz, mutate
from tests.scrub_cert.support import certify, resign

pytestmark = pytest.mark.slow  # about 10,000 hypothesis examples in all

KEY = NodeKey.generate()
TRUSTED = KEY.public_pem()
VALID = json.loads(json.dumps(certify(KEY)))

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["", "Ed25519", "0.000000", "1.000000", "zero", "multi-pass", "gpu", "mig"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(sorted(VALID["payload"])) | st.text(max_size=8), children, max_size=4
    ),
    max_leaves=12,
)


def _verify_refuses_or_accepts(document: Any, trusted: str = TRUSTED) -> None:
    with contextlib.suppress(ScrubError):
        verify_certificate(document, trusted)


@settings(max_examples=1000, deadline=None)
@given(json_values)
def test_any_json_value(document: Any) -> None:
    _verify_refuses_or_accepts(document)


@settings(max_examples=1000, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "payload": json_values,
            "signature": json_values | st.just(VALID["signature"]),
            "public_key": json_values | st.just(VALID["public_key"]),
            "algorithm": json_values | st.just("Ed25519"),
        }
    ),
    st.just(KEY.public_pem()) | st.text(max_size=200),
)
def test_any_document_shape(document: dict[str, Any], trusted: str) -> None:
    _verify_refuses_or_accepts(document, trusted)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


PATHS = _paths(VALID)[1:]


def _replaced(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    changed = copy.deepcopy(document)
    parent = changed
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return changed


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), json_values)
def test_one_field_replaced_by_anything(path: tuple[Any, ...], value: Any) -> None:
    """A changed field is refused unless it is the same value (JSON-wise) as before."""
    document = _replaced(VALID, path, value)
    try:
        verify_certificate(document, KEY.public_pem())
    except ScrubError:
        return
    assert json.dumps(document, sort_keys=True) == json.dumps(VALID, sort_keys=True)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([p for p in PATHS if p[0] == "payload"]), json_values)
def test_resigned_field_replaced_by_anything(path: tuple[Any, ...], value: Any) -> None:
    """Even with a valid signature, an arbitrary value in any payload field is either refused or
    is a well-formed, consistent certificate (never an exception other than ScrubError)."""
    payload = _replaced(VALID, path, value)["payload"]
    try:
        document = resign(KEY, payload)
    except ScrubError:
        return  # not encodable canonically (a lone surrogate, NaN): cannot be signed at all
    try:
        checked = verify_certificate(document, KEY.public_pem())
    except ScrubError:
        return
    assert isinstance(checked.scrub_verified, bool)


FILE = json.dumps(certify(KEY), indent=2, ensure_ascii=False).encode()


@fuzz(3000)
@given(MUTATIONS)
def test_mutated_file_is_refused_or_means_the_same(mutations: Any) -> None:
    """Bytes of a certificate file flipped, cut, inserted: read as verify-cert reads it."""
    try:
        document = parse_json(mutate(FILE, mutations), CERTIFICATE_JSON_LIMITS, "certificate c")
        verify_certificate(document, TRUSTED)
    except (ValidationError, ScrubError):
        return
    assert document == VALID
