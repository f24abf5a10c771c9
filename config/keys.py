"""Public keys for token verification, checked when the settings are read (a bad key stops the
process at startup, never later)."""

from __future__ import annotations

from typing import Any


def load_public_key(pem: str) -> tuple[Any, str]:
    """A PEM public key and the one algorithm it verifies (RS256 or ES256)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise ValueError(f"not a PEM public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError("RSA public keys must have at least 2048 bits")
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise ValueError("public keys must be RSA (RS256) or EC P-256 (ES256)")
