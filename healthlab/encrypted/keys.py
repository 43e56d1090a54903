"""The key holder's CKKS keys and the public context everyone else works with.

The researcher is the key holder: :class:`KeyHolder` creates the CKKS context, exports a
:class:`PublicContext` without the secret key, and decrypts only aggregates across
sites. The secret key never leaves the object: it cannot be pickled, printed or
serialized through this API.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from healthlab.errors import HealthLabError, InvalidInput

__all__ = [
    "MAX_LOG_Q_128",
    "CKKSParams",
    "IntegrityError",
    "KeyHolder",
    "PublicContext",
    "WeakParameters",
]

#: Largest total coefficient modulus (bits) for 128-bit classical security with a
#: ternary secret, per the HomomorphicEncryption.org standard (Albrecht et al., 2018).
MAX_LOG_Q_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


class WeakParameters(InvalidInput):
    """CKKS parameters below the 128-bit security bound."""


class IntegrityError(HealthLabError):
    """A ciphertext or aggregate failed a check (wrong key, tampering, overflow)."""


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters; the defaults give 4096 slots, depth 2, 128-bit security.

    Examples
    --------
    >>> CKKSParams().check()
    >>> CKKSParams(
    ...     poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 40, 40, 60)
    ... ).check()
    Traceback (most recent call last):
    ...
    healthlab.encrypted.keys.WeakParameters: ...
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    scale_bits: int = 40

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        return self.poly_modulus_degree // 2

    def check(self) -> None:
        """Refuse parameters weaker than 128-bit security or inconsistent ones."""
        n, bits = self.poly_modulus_degree, sum(self.coeff_mod_bit_sizes)
        if n not in MAX_LOG_Q_128:
            raise WeakParameters(
                f"poly_modulus_degree {n} is not a power of two from 1024 to 32768"
            )
        if bits > MAX_LOG_Q_128[n]:
            raise WeakParameters(
                f"log Q = {bits} bits exceeds {MAX_LOG_Q_128[n]} for N = {n}: below "
                "128-bit security (HomomorphicEncryption.org); use a larger "
                "poly_modulus_degree or fewer/smaller coefficient moduli"
            )
        if len(self.coeff_mod_bit_sizes) < 2 or self.scale_bits > min(
            self.coeff_mod_bit_sizes
        ):
            raise InvalidInput(
                "need at least two coefficient moduli, none smaller than the scale"
            )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (for receipts)."""
        return {
            "scheme": "CKKS",
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "security_bits": 128,
        }


@dataclass(frozen=True)
class PublicContext:
    """The serialized public CKKS context (no secret key) and its fingerprint.

    This is what sites and the aggregator receive. ``fingerprint`` is the sha256 of
    the serialized context, so it names the public key; ciphertexts are tagged with it.
    """

    data: bytes = field(repr=False)
    params: CKKSParams

    @cached_property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the serialized public context."""
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def load(self) -> ts.Context:
        """The context, deserialized once (sites and aggregators reuse it); refuses
        a context that carries a secret key."""
        return self._loaded

    @cached_property
    def _loaded(self) -> ts.Context:
        context = ts.context_from(self.data)
        if context.is_private() or context.has_secret_key():
            raise IntegrityError(
                "a public context must not carry the secret key; export it with "
                "KeyHolder.public_context()"
            )
        return context

    @cached_property
    def parms_id(self) -> tuple[int, ...]:
        """SEAL's hash of the encryption parameters."""
        return tuple(self.load().seal_context().data.key_parms_id())


class KeyHolder:
    """The researcher's CKKS keys.

    Parameters
    ----------
    params:
        CKKS parameters, checked against the 128-bit security bound.

    Examples
    --------
    >>> keys = KeyHolder()
    >>> public = keys.public_context()  # send this to sites and the aggregator
    >>> public.load().is_private()
    False
    """

    def __init__(self, params: CKKSParams | None = None) -> None:
        self.params = params or CKKSParams()
        self.params.check()
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            self.params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(self.params.coeff_mod_bit_sizes),
        )
        context.global_scale = 2.0**self.params.scale_bits
        self.__context = context

    def public_context(self) -> PublicContext:
        """The public context: public key only (no secret, relin or Galois keys)."""
        return self._public

    @cached_property
    def _public(self) -> PublicContext:
        data = self.__context.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        return PublicContext(data=data, params=self.params)

    def evaluation_context(self) -> PublicContext:
        """Public context plus relinearization and Galois keys (~35 MB), for an
        aggregator that computes on rows (every-value mode). No secret key.

        Products are left unrelinearized and unrescaled (the aggregator relinearizes
        once, on the sum), so the exported context has those automatic steps off.
        """
        return self._evaluation

    @cached_property
    def _evaluation(self) -> PublicContext:
        if not self.__context.has_galois_keys():
            self.__context.generate_galois_keys()
        export = self.__context.copy()
        # set before export: TenSEAL ignores these flags set on a loaded context
        export.auto_relin = False
        export.auto_rescale = False
        export.auto_mod_switch = False
        data = export.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=True,
            save_relin_keys=True,
        )
        return PublicContext(data=data, params=self.params)

    @property
    def fingerprint(self) -> str:
        """Fingerprint of this key holder's public context."""
        return self._public.fingerprint

    def decrypt(self, ciphertext: bytes, *, fingerprint: str) -> np.ndarray:
        """Decrypt one serialized aggregate made under this key (raw slot values).

        Use only on aggregates across sites: callers round what they return to a
        precision well above the noise before it leaves the key holder.
        """
        if fingerprint not in (self.fingerprint, self._evaluation_fingerprint):
            raise IntegrityError(
                "this aggregate was made under another public key; it cannot be "
                "decrypted here"
            )
        vector = ts.ckks_vector_from(self.__context, ciphertext)
        return np.asarray(vector.decrypt(), dtype=np.float64)

    def decrypt_folded(self, ciphertext: bytes, *, fingerprint: str) -> float:
        """Slot 0 of a folded SEAL ciphertext (every slot holds the same total)."""
        total, _ = self.decrypt_folded_pair(ciphertext, fingerprint=fingerprint)
        return total

    def decrypt_folded_pair(
        self, ciphertext: bytes, *, fingerprint: str
    ) -> tuple[float, float]:
        """The real and imaginary parts of slot 0 of a folded SEAL ciphertext (every
        slot holds the same complex total: two sums folded at once)."""
        if fingerprint not in (self.fingerprint, self._evaluation_fingerprint):
            raise IntegrityError("this total was made under another public key")
        seal = self.__context.seal_context().data
        with tempfile.TemporaryDirectory(prefix="healthlab-key-") as tmp:
            path = Path(tmp) / "ct"
            path.write_bytes(ciphertext)
            loaded = sealapi.Ciphertext()
            loaded.load(seal, str(path))
        plain = sealapi.Plaintext()
        sealapi.Decryptor(seal, self.__context.secret_key().data).decrypt(loaded, plain)
        slots = np.asarray(sealapi.CKKSEncoder(seal).decode_complex(plain))
        for part in (slots.real, slots.imag):
            if float(np.ptp(part)) > 1e-3 * max(1.0, abs(float(part[0]))):
                raise IntegrityError(
                    "the folded total differs across slots: tampering?"
                )
        return float(slots[0].real), float(slots[0].imag)

    @property
    def _evaluation_fingerprint(self) -> str | None:
        ready = self.__dict__.get("_evaluation")
        return ready.fingerprint if ready is not None else None

    def __getstate__(self) -> None:
        raise TypeError("a KeyHolder holds a secret key and cannot be pickled")

    def __repr__(self) -> str:
        return f"KeyHolder({self.params!r}, fingerprint={self.fingerprint[:19]}…)"
