"""The node's TPM 2.0, through tpm2-pytss ESAPI: keys, PCRs, quotes and credential activation.

This is the attest subsystem's boundary with the TSS: nothing outside it sees a tpm2-pytss type
or a ``TSS2_Exception``; every TPM failure becomes a :class:`~agent.errors.TpmError` that says
which command failed. ESAPI calls block and an ESAPI context is not thread-safe, so the daemon
drives one :class:`TpmClient` from one executor thread at a time.

Why this module is over 600 lines: it is one class around one ESAPI context, whose methods share
that context, its loaded-object caches and ``_translated``. Splitting it would spread the TSS
boundary over several modules; what needs no TSS (key values, decoding, checks) is already
elsewhere in ``tpm/``.

Keys (see docs/attestation-tpm.md; their value types and recognition rules are in ``keys.py``):

* The endorsement key is the TCG EK Credential Profile default RSA-2048 key (template L-1),
  taken from the persistent handle 0x81010001 when a matching one is there, else re-created (it
  is a primary key, so re-creating it from the same template yields the same key).
* The attestation key is a restricted signing child of the EK, built from an explicit template
  (never a tpm2-tools style string, which gives different attributes). Being in the endorsement
  hierarchy matters: the TPM only reports clock, resetCount, restartCount and firmwareVersion
  unobfuscated in attestations signed by keys of the endorsement or platform hierarchy (Part 1
  "Timing Components"; Part 3 TPM2_Quote), and the verifier relies on those counters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any, Final

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_PT_NV,
    TPM2_SE,
    TPMA_NV,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_PCR_SELECTION,
    TPMT_HA,
    TPMT_PUBLIC,
    TPMT_SYM_DEF,
    TPMU_HA,
)

from agent.attest.tpm.algorithms import PCR_COUNT, bank_name, digest_size, hash_algorithm_id
from agent.attest.tpm.checks import AK_ATTRIBUTES, check_ak_attributes
from agent.attest.tpm.keys import (
    DEFAULT_AK_HANDLE,
    EK_CERTIFICATE_NV_INDEX,
    EK_PERSISTENT_HANDLE,
    AkAlgorithm,
    AttestationKey,
    AttestationKeyBlob,
    EndorsementKey,
    algorithm_of,
    check_persistent_handle,
    der_length,
    parse_ak_algorithm,
    same_key_template,
)
from agent.attest.tpm.wire import (
    PcrBankSelection,
    compute_name,
    decode_attest,
    decode_public,
    normalise_selection,
    pcr_digest,
)
from agent.errors import QuoteError, TpmError

__all__ = ["Quote", "TpmClient"]

# TCG EK Credential Profile, policy A: PolicySecret(TPM_RH_ENDORSEMENT). Using the EK (to create
# or load its children, or to activate a credential) needs a policy session that satisfies it.
_EK_POLICY_A: Final = bytes.fromhex(
    "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
)
# TPML_DIGEST holds at most 8 digests, so TPM2_PCR_Read returns at most 8 PCRs per call.
_PCR_READ_ATTEMPTS: Final = 5
_QUOTE_ATTEMPTS: Final = 3
_MAX_NONCE: Final = 64
_MAX_CREDENTIAL_BLOB: Final = 2 + 64 + 2 + 64  # sizeof(TPMS_ID_OBJECT) with SHA-512
_MAX_ENCRYPTED_SECRET: Final = 512  # sizeof(TPMU_ENCRYPTED_SECRET) with RSA-4096
_MAX_EK_CERTIFICATE: Final = 16384


@dataclass(frozen=True)
class Quote:
    """TPM2_Quote output: TPMS_ATTEST bytes, TPMT_SIGNATURE bytes, and the PCR values quoted."""

    attest: bytes
    signature: bytes
    pcrs: dict[str, dict[int, bytes]]
    nonce: bytes


def _ak_template(algorithm: AkAlgorithm) -> Any:
    attributes = (
        TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.SIGN_ENCRYPT
        | TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
    )
    if int(attributes) != AK_ATTRIBUTES:  # pragma: no cover - guards the two constant tables
        raise TpmError("internal error: AK attribute tables disagree")
    if algorithm == AkAlgorithm.ECC_P256:
        area = TPMT_PUBLIC(type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes)
        ecc = area.parameters.eccDetail
        ecc.symmetric.algorithm = TPM2_ALG.NULL
        ecc.scheme.scheme = TPM2_ALG.ECDSA
        ecc.scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
        ecc.curveID = TPM2_ECC.NIST_P256
        ecc.kdf.scheme = TPM2_ALG.NULL
    else:
        area = TPMT_PUBLIC(type=TPM2_ALG.RSA, nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes)
        rsa = area.parameters.rsaDetail
        rsa.symmetric.algorithm = TPM2_ALG.NULL
        rsa.scheme.scheme = TPM2_ALG.RSASSA
        rsa.scheme.details.rsassa.hashAlg = TPM2_ALG.SHA256
        rsa.keyBits = 2048
        rsa.exponent = 0
    return TPM2B_PUBLIC(publicArea=area)


def _ek_template() -> Any:
    # TCG EK Credential Profile 2.x, template L-1 (RSA 2048, "low range"): these exact fields
    # make the TPM re-derive the key that the manufacturer certified.
    area = TPMT_PUBLIC(
        type=TPM2_ALG.RSA,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=(
            TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.ADMINWITHPOLICY
            | TPMA_OBJECT.RESTRICTED
            | TPMA_OBJECT.DECRYPT
        ),
        authPolicy=TPM2B_DIGEST(_EK_POLICY_A),
    )
    rsa = area.parameters.rsaDetail
    rsa.symmetric.algorithm = TPM2_ALG.AES
    rsa.symmetric.keyBits.aes = 128
    rsa.symmetric.mode.aes = TPM2_ALG.CFB
    rsa.scheme.scheme = TPM2_ALG.NULL
    rsa.keyBits = 2048
    rsa.exponent = 0
    area.unique.rsa = b"\0" * 256
    return TPM2B_PUBLIC(publicArea=area)


def _selection_structure(selection: Mapping[int, tuple[int, ...]]) -> Any:
    entries = []
    for hash_alg, indices in selection.items():
        # Part 2 TPMS_PCR_SELECTION: at least PCR_SELECT_MIN (3) octets, the PC Client minimum.
        size = max(3, max(indices) // 8 + 1)
        bitmap = bytearray(size)
        for index in indices:
            bitmap[index // 8] |= 1 << (index % 8)
        entries.append(
            TPMS_PCR_SELECTION(hash=hash_alg, sizeofSelect=size, pcrSelect=bytes(bitmap))
        )
    return TPML_PCR_SELECTION(entries)


def _indices_of(selection: Any) -> list[tuple[int, list[int]]]:
    """Unpack a TPML_PCR_SELECTION the TPM returned into [(hash_alg, [indices ascending])]."""
    result = []
    for position in range(int(selection.count)):
        entry = selection.pcrSelections[position]
        bitmap = bytes(entry.pcrSelect)[: int(entry.sizeofSelect)]
        indices = [
            8 * i + bit for i, octet in enumerate(bitmap) for bit in range(8) if octet >> bit & 1
        ]
        result.append((int(entry.hash), indices))
    return result


class TpmClient:
    """One ESAPI connection to a TPM, e.g. ``TpmClient("device:/dev/tpmrm0")``.

    ``tcti`` is a tpm2-tools style TCTI string (``swtpm:port=2321``, ``device:/dev/tpmrm0``).
    ``endorsement_auth`` and ``owner_auth`` are the hierarchy passwords, empty on most machines.
    Close it (or use it as a context manager) to flush what it loaded.
    """

    def __init__(
        self, tcti: str, *, endorsement_auth: bytes = b"", owner_auth: bytes = b""
    ) -> None:
        self._tcti = tcti
        with self._translated(f"connecting to the TPM through TCTI {tcti!r}"):
            self._esys: Any = ESAPI(tcti)
        self._ek: tuple[Any, EndorsementKey] | None = None
        self._ek_transient = False
        self._transient_aks: dict[int, Any] = {}
        # ESYS_TR objects of persistent handles, made once each (ESAPI keeps them until close).
        self._persistent: dict[int, Any] = {}
        with self._translated("setting hierarchy authorisation values"):
            self._esys.tr_set_auth(ESYS_TR.ENDORSEMENT, endorsement_auth)
            self._esys.tr_set_auth(ESYS_TR.OWNER, owner_auth)

    def __enter__(self) -> TpmClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush transient objects this client loaded and end the ESAPI context."""
        if self._esys is None:
            return
        handles = list(self._transient_aks.values())
        if self._ek is not None and self._ek_transient:
            handles.append(self._ek[0])
        # Best effort: the TPM resource manager flushes a closed connection's objects anyway.
        for handle in handles:
            with suppress(TSS2_Exception):
                self._esys.flush_context(handle)
        self._transient_aks.clear()
        self._persistent.clear()
        self._ek = None
        with self._translated("closing the ESAPI context"):
            self._esys.close()
        self._esys = None

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        try:
            yield
        except TSS2_Exception as exc:
            raise TpmError(f"{what} failed: {exc} (TSS rc 0x{int(exc.rc):x})") from exc

    def _context(self) -> Any:
        if self._esys is None:
            raise TpmError("TPM client is closed")
        return self._esys

    # --- endorsement key ------------------------------------------------------------------

    def endorsement_key(self) -> EndorsementKey:
        """The EK (TCG default RSA-2048 template) and its certificate from NV, if present."""
        return self._endorsement()[1]

    def _endorsement(self) -> tuple[Any, EndorsementKey]:
        if self._ek is not None:
            return self._ek
        esys = self._context()
        template = _ek_template()
        persisted = self._persistent_object(EK_PERSISTENT_HANDLE)
        if persisted is not None and same_key_template(persisted[1], template.marshal()):
            handle, public, persistent = persisted[0], persisted[1], EK_PERSISTENT_HANDLE
            self._ek_transient = False
        else:
            with self._translated("TPM2_CreatePrimary of the endorsement key"):
                handle, created, *_ = esys.create_primary(
                    TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
                )
            public, persistent = bytes(created.marshal()), None
            self._ek_transient = True
        key = EndorsementKey(
            public=public,
            name=compute_name(public),
            certificate=self._ek_certificate(),
            persistent_handle=persistent,
        )
        self._ek = (handle, key)
        return self._ek

    def _persistent_object(self, tpm_handle: int) -> tuple[Any, bytes] | None:
        esys = self._context()
        with self._translated(f"TPM2_GetCapability(handles) looking for 0x{tpm_handle:08x}"):
            _, data = esys.get_capability(TPM2_CAP.HANDLES, tpm_handle, 1)
        handles = data.data.handles
        if int(handles.count) == 0 or int(handles.handle[0]) != tpm_handle:
            return None
        with self._translated(f"reading the public area of 0x{tpm_handle:08x}"):
            esys_handle = self._persistent.get(tpm_handle)
            if esys_handle is None:
                esys_handle = esys.tr_from_tpmpublic(tpm_handle)
                self._persistent[tpm_handle] = esys_handle
            public, _, _ = esys.read_public(esys_handle)
        return esys_handle, bytes(public.marshal())

    def _ek_certificate(self) -> bytes | None:
        esys = self._context()
        index = EK_CERTIFICATE_NV_INDEX
        with self._translated("looking for the EK certificate NV index"):
            _, data = esys.get_capability(TPM2_CAP.HANDLES, index, 1)
        handles = data.data.handles
        if int(handles.count) == 0 or int(handles.handle[0]) != index:
            return None
        with self._translated(f"reading the EK certificate from NV index 0x{index:08x}"):
            nv_handle = esys.tr_from_tpmpublic(index)
            try:
                certificate = self._read_nv(nv_handle)
            finally:
                esys.tr_close(nv_handle)
        if certificate is None:
            return None
        length = der_length(bytes(certificate))
        if length is not None and length <= len(certificate):
            return bytes(certificate[:length])
        return bytes(certificate)

    def _read_nv(self, nv_handle: Any) -> bytes | None:
        """The contents of a written NV index, in TPM2_NV_Read-sized pieces; None if unwritten."""
        esys = self._context()
        nv_public, _ = esys.nv_read_public(nv_handle)
        attributes = int(nv_public.nvPublic.attributes)
        size = int(nv_public.nvPublic.dataSize)
        if not attributes & TPMA_NV.WRITTEN or size == 0:
            return None
        if size > _MAX_EK_CERTIFICATE:
            raise TpmError(f"NV index claims {size} bytes for a certificate; refusing to read it")
        _, capability = esys.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT_NV.BUFFER_MAX, 1)
        properties = capability.data.tpmProperties
        chunk = 512  # the smallest MAX_NV_BUFFER_SIZE TPMs ship with
        if int(properties.count) and int(properties.tpmProperty[0].property) == int(
            TPM2_PT_NV.BUFFER_MAX
        ):
            chunk = max(1, int(properties.tpmProperty[0].value))
        # The TCG profile makes EK certificate indices readable with their own empty authValue
        # (AUTHREAD), so no owner password is needed; otherwise fall back to owner read.
        auth = nv_handle if attributes & TPMA_NV.AUTHREAD else ESYS_TR.OWNER
        contents = bytearray()
        while len(contents) < size:
            length = min(chunk, size - len(contents))
            contents += bytes(esys.nv_read(nv_handle, length, len(contents), auth_handle=auth))
        return bytes(contents)

    @contextmanager
    def _ek_policy_session(self) -> Iterator[Any]:
        """A policy session satisfying EK policy A, flushed afterwards."""
        esys = self._context()
        with self._translated("starting the EK policy session (PolicySecret endorsement)"):
            session = esys.start_auth_session(
                ESYS_TR.NONE,
                ESYS_TR.NONE,
                TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                TPM2_ALG.SHA256,
            )
            try:
                esys.policy_secret(ESYS_TR.ENDORSEMENT, session, expiration=0)
            except TSS2_Exception:
                with suppress(TSS2_Exception):
                    esys.flush_context(session)
                raise
        try:
            yield session
        finally:
            # ESAPI starts sessions with continueSession set, so it outlives the command.
            with suppress(TSS2_Exception):
                esys.flush_context(session)

    # --- attestation key ------------------------------------------------------------------

    def create_attestation_key(
        self, algorithm: AkAlgorithm = AkAlgorithm.ECC_P256
    ) -> AttestationKey:
        """Create a new AK under the EK and load it (transient; see :meth:`persist_attestation_key`
        or keep :attr:`AttestationKey.blob` to reload it after a restart)."""
        algorithm = parse_ak_algorithm(algorithm)
        ek_handle, _ = self._endorsement()
        esys = self._context()
        with (
            self._ek_policy_session() as session,
            self._translated(f"TPM2_Create of an {algorithm} attestation key under the EK"),
        ):
            private, public, *_ = esys.create(
                ek_handle, TPM2B_SENSITIVE_CREATE(), _ak_template(algorithm), session1=session
            )
        blob = AttestationKeyBlob(bytes(public.marshal()), bytes(private.marshal()))
        return self.load_attestation_key(blob)

    def load_attestation_key(self, blob: AttestationKeyBlob) -> AttestationKey:
        """Load an AK created earlier by this TPM (TpmError if the blob is not an AK)."""
        try:
            violations = check_ak_attributes(blob.public)
            algorithm = algorithm_of(blob.public)
            name = compute_name(blob.public)
        except QuoteError as exc:
            raise TpmError(f"saved attestation key is malformed: {exc}") from exc
        if violations or algorithm is None:
            reasons = "; ".join(v.message for v in violations) or "unsupported key type"
            raise TpmError(f"refusing to load a key that is not an AK: {reasons}")
        ek_handle, _ = self._endorsement()
        esys = self._context()
        try:
            public, _ = TPM2B_PUBLIC.unmarshal(blob.public)
            private, _ = TPM2B_PRIVATE.unmarshal(blob.private)
        except (TSS2_Exception, ValueError) as exc:
            raise TpmError(f"saved attestation key is malformed: {exc}") from exc
        with (
            self._ek_policy_session() as session,
            self._translated("TPM2_Load of the attestation key under the EK"),
        ):
            handle = esys.load(ek_handle, private, public, session1=session)
        with self._translated("TPM2_Load of the attestation key under the EK"):
            tpm_handle = int(esys.tr_get_tpm_handle(handle))
        self._transient_aks[tpm_handle] = handle
        return AttestationKey(tpm_handle, blob.public, name, algorithm, False, blob)

    def persist_attestation_key(
        self, key: AttestationKey, handle: int = DEFAULT_AK_HANDLE
    ) -> AttestationKey:
        """Make a loaded AK persistent at ``handle`` (TPM2_EvictControl with owner auth)."""
        check_persistent_handle(handle)
        if key.persistent:
            raise TpmError(f"attestation key is already persistent at 0x{key.handle:08x}")
        esys = self._context()
        transient = self._esys_handle(key)
        with self._translated(f"TPM2_EvictControl making the AK persistent at 0x{handle:08x}"):
            esys.evict_control(ESYS_TR.OWNER, transient, handle)
        self.flush_attestation_key(key)
        return replace(key, handle=handle, persistent=True)

    def attestation_key_at(self, handle: int = DEFAULT_AK_HANDLE) -> AttestationKey | None:
        """The AK persisted at ``handle``, None if the handle is empty, TpmError if not an AK."""
        check_persistent_handle(handle)
        found = self._persistent_object(handle)
        if found is None:
            return None
        public = found[1]
        try:
            violations = check_ak_attributes(public)
            algorithm = algorithm_of(public)
            name = compute_name(public)
        except QuoteError as exc:
            raise TpmError(f"object at 0x{handle:08x} has an unusable public area: {exc}") from exc
        if violations or algorithm is None:
            reasons = "; ".join(v.message for v in violations) or "unsupported key type"
            raise TpmError(
                f"object at persistent handle 0x{handle:08x} is not an attestation key "
                f"({reasons}); evict it (tpm2_evictcontrol) or configure another handle"
            )
        return AttestationKey(handle, public, name, algorithm, True, None)

    def ensure_attestation_key(
        self, handle: int = DEFAULT_AK_HANDLE, algorithm: AkAlgorithm = AkAlgorithm.ECC_P256
    ) -> AttestationKey:
        """The AK at ``handle``, creating and persisting one there first if the handle is empty."""
        algorithm = parse_ak_algorithm(algorithm)
        existing = self.attestation_key_at(handle)
        if existing is not None:
            if existing.algorithm != algorithm:
                raise TpmError(
                    f"the AK at 0x{handle:08x} is {existing.algorithm}, not {algorithm}; evict it "
                    "to rotate (the controller must then enroll the new AK)"
                )
            return existing
        return self.persist_attestation_key(self.create_attestation_key(algorithm), handle)

    def evict_attestation_key(self, handle: int) -> None:
        """Remove the AK persisted at ``handle`` (key rotation)."""
        key = self.attestation_key_at(handle)
        if key is None:
            raise TpmError(f"no object is persisted at 0x{handle:08x}")
        esys = self._context()
        with self._translated(f"TPM2_EvictControl removing the AK at 0x{handle:08x}"):
            esys.evict_control(ESYS_TR.OWNER, self._esys_handle(key), handle)
        # ESAPI invalidates the ESYS_TR of an evicted persistent object.
        self._persistent.pop(handle, None)

    def flush_attestation_key(self, key: AttestationKey) -> None:
        """Unload a transient AK (persistent ones stay)."""
        handle = self._transient_aks.pop(key.handle, None)
        if handle is None:
            return
        with self._translated("TPM2_FlushContext of the attestation key"):
            self._context().flush_context(handle)

    def _esys_handle(self, key: AttestationKey) -> Any:
        if not key.persistent:
            handle = self._transient_aks.get(key.handle)
            if handle is None:
                raise TpmError(f"attestation key 0x{key.handle:08x} is not loaded by this client")
            return handle
        found = self._persistent_object(key.handle)
        if found is None:
            raise TpmError(f"no attestation key is persisted at 0x{key.handle:08x} any more")
        return found[0]

    # --- PCRs -----------------------------------------------------------------------------

    def read_pcrs(self, selection: Mapping[str, Iterable[int]]) -> dict[str, dict[int, bytes]]:
        """Read every selected PCR, e.g. ``{"sha256": range(24)}`` -> ``{"sha256": {0: ...}}``.

        All values come from one PCR generation: if the update counter moves between the
        TPM2_PCR_Read calls (one returns at most 8 PCRs), the whole read starts again.
        """
        wanted = _normalised(selection)
        esys = self._context()
        for _ in range(_PCR_READ_ATTEMPTS):
            remaining = {alg: list(indices) for alg, indices in wanted.items()}
            values: dict[str, dict[int, bytes]] = {bank_name(alg): {} for alg in wanted}
            counter: int | None = None
            while remaining:
                with self._translated("TPM2_PCR_Read"):
                    update_counter, returned, digests = esys.pcr_read(
                        _selection_structure({a: tuple(i) for a, i in remaining.items()})
                    )
                    digest_list = [bytes(digests.digests[i]) for i in range(int(digests.count))]
                    returned_indices = _indices_of(returned)
                if counter is None:
                    counter = int(update_counter)
                elif counter != int(update_counter):
                    break
                got = sum(len(indices) for _, indices in returned_indices)
                if got == 0:
                    missing = ", ".join(
                        f"{bank_name(a)}:{i}" for a, indices in remaining.items() for i in indices
                    )
                    raise TpmError(
                        f"TPM2_PCR_Read returned nothing for {missing}: the bank is not "
                        "allocated or the PCR is not implemented"
                    )
                if got != len(digest_list):
                    raise TpmError(
                        f"TPM2_PCR_Read selected {got} PCRs but returned {len(digest_list)} values"
                    )
                position = 0
                for hash_alg, indices in returned_indices:
                    for index in indices:
                        if hash_alg not in remaining or index not in remaining[hash_alg]:
                            raise TpmError(f"TPM2_PCR_Read returned unrequested PCR {index}")
                        values[bank_name(hash_alg)][index] = digest_list[position]
                        position += 1
                        remaining[hash_alg].remove(index)
                    if not remaining.get(hash_alg, True):
                        del remaining[hash_alg]
            else:
                return values
        raise TpmError(
            f"PCRs kept changing while being read ({_PCR_READ_ATTEMPTS} attempts); try again"
        )

    def extend_pcr(self, index: int, digests: Mapping[str, bytes]) -> None:
        """TPM2_PCR_Extend PCR ``index`` with one digest per bank, e.g. ``{"sha256": d}``."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < PCR_COUNT:
            raise TpmError(f"PCR index {index!r} is outside 0..{PCR_COUNT - 1}")
        if not digests:
            raise TpmError("extend_pcr needs at least one bank digest")
        entries = []
        for bank, digest in digests.items():
            try:
                hash_alg = hash_algorithm_id(bank)
                size = digest_size(hash_alg)
            except QuoteError as exc:
                raise TpmError(f"cannot extend PCR {index}: {exc}") from exc
            if not isinstance(digest, bytes) or len(digest) != size:
                raise TpmError(f"cannot extend PCR {index}: the {bank} digest must be {size} bytes")
            # TPMU_HA is a union; its largest member takes any digest and the TPM reads as many
            # bytes as hashAlg says.
            entries.append(TPMT_HA(hashAlg=hash_alg, digest=TPMU_HA(sha512=digest)))
        with self._translated(f"TPM2_PCR_Extend of PCR {index}"):
            self._context().pcr_extend(ESYS_TR(index), TPML_DIGEST_VALUES(entries))

    # --- quote ----------------------------------------------------------------------------

    def quote(
        self, key: AttestationKey, selection: Mapping[str, Iterable[int]], nonce: bytes
    ) -> Quote:
        """TPM2_Quote over ``selection`` with ``nonce`` as qualifyingData, plus the PCR values.

        The values are read right after the quote; if a PCR was extended in between (the values
        no longer hash to the quoted pcrDigest) the quote is taken again.
        """
        if not isinstance(nonce, bytes) or len(nonce) > _MAX_NONCE:
            raise TpmError(f"quote nonce must be at most {_MAX_NONCE} bytes")
        wanted = _normalised(selection)
        requested = {bank_name(alg): list(indices) for alg, indices in wanted.items()}
        signing_hash = decode_public(key.public).scheme_hash
        esys = self._context()
        handle = self._esys_handle(key)
        for _ in range(_QUOTE_ATTEMPTS):
            with self._translated(f"TPM2_Quote with the AK at 0x{key.handle:08x}"):
                attested, signature = esys.quote(handle, _selection_structure(wanted), nonce)
                attest_bytes = bytes(attested.marshal())[2:]
                signature_bytes = bytes(signature.marshal())
            pcrs = self.read_pcrs(requested)
            try:
                info = decode_attest(attest_bytes).quote_info
                if info is None:
                    raise TpmError("TPM2_Quote returned an attestation that is not a quote")
                if info.pcr_digest == pcr_digest(
                    [PcrBankSelection(a, i) for a, i in wanted.items()], pcrs, signing_hash
                ):
                    return Quote(attest_bytes, signature_bytes, pcrs, nonce)
            except QuoteError as exc:
                raise TpmError(f"TPM2_Quote returned an undecodable quote: {exc}") from exc
        raise TpmError(
            f"PCRs kept changing between the quote and the read ({_QUOTE_ATTEMPTS} attempts)"
        )

    # --- credential activation ------------------------------------------------------------

    def activate_credential(
        self, key: AttestationKey, credential_blob: bytes, encrypted_secret: bytes
    ) -> bytes:
        """TPM2_ActivateCredential: recover the secret a verifier wrapped for (EK, AK name).

        Succeeds only if ``key`` is loaded in the TPM that holds the EK the credential was made
        for, and its Name is the one the verifier used.
        """
        if not isinstance(credential_blob, bytes) or len(credential_blob) > _MAX_CREDENTIAL_BLOB:
            raise TpmError(f"credential blob must be at most {_MAX_CREDENTIAL_BLOB} bytes")
        if not isinstance(encrypted_secret, bytes) or len(encrypted_secret) > _MAX_ENCRYPTED_SECRET:
            raise TpmError(f"encrypted secret must be at most {_MAX_ENCRYPTED_SECRET} bytes")
        ek_handle, _ = self._endorsement()
        esys = self._context()
        ak_handle = self._esys_handle(key)
        with (
            self._ek_policy_session() as session,
            self._translated(
                "TPM2_ActivateCredential (the credential must be made for this TPM's EK "
                "and this AK's Name)"
            ),
        ):
            secret = esys.activate_credential(
                ak_handle,
                ek_handle,
                TPM2B_ID_OBJECT(credential=credential_blob),
                TPM2B_ENCRYPTED_SECRET(secret=encrypted_secret),
                session1=ESYS_TR.PASSWORD,
                session2=session,
            )
        return bytes(secret)


def _normalised(selection: Mapping[str, Iterable[int]]) -> dict[int, tuple[int, ...]]:
    try:
        return normalise_selection({bank: list(indices) for bank, indices in selection.items()})
    except (QuoteError, AttributeError, TypeError) as exc:
        raise TpmError(f"invalid PCR selection {selection!r}: {exc}") from exc
