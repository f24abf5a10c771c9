"""Tokens signed with private keys (RS256, ES256) beside shared secrets, attacked against a real
server: the key decides the algorithm, never the token's header."""

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from config.settings import Settings, SettingsError
from tests.helpers import SECRET

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())


def pem(private_key) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def claims(**extra):
    now = int(time.time())
    return {"sub": "origin-user", "exp": now + 600, "subscribe": ["rooms/*"], "publish": ["rooms/*"], **extra}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed_hs256(header: dict, payload: dict, secret: bytes) -> str:
    """An HS256 token made by hand (PyJWT refuses to use a PEM as an HMAC secret)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


@pytest.fixture
def keyed_server(make_server, database_url):
    keys = json.dumps({"rsa1": pem(RSA_KEY), "ec1": pem(EC_KEY)})
    srv = make_server(database_url, SLUICE_PUBLIC_KEYS=keys, TOKEN_LEEWAY_S="2")
    return srv


def status(srv, token):
    return srv.get(
        "/api/v1/poll",
        params={"stream": "rooms/1", "timeout": "0"},
        headers={"Authorization": f"Bearer {token}"},
    ).status_code


def test_private_key_tokens_verify_and_forgeries_do_not(keyed_server):
    srv = keyed_server
    rs = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa1"})
    es = jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec1"})
    es_no_kid = jwt.encode(claims(), EC_KEY, algorithm="ES256")
    hs = jwt.encode(claims(), SECRET, algorithm="HS256")  # the shared secret still works
    r = srv.post(
        "/api/v1/events", json={"stream": "rooms/1", "data": 1}, headers={"Authorization": f"Bearer {es}"}
    )
    assert r.status_code == 201, r.text
    assert [status(srv, t) for t in (rs, es, es_no_kid, hs)] == [200] * 4

    forged = {
        # signed by a key the server does not know, claiming a kid it does
        "wrong key": jwt.encode(claims(), OTHER_EC_KEY, algorithm="ES256", headers={"kid": "ec1"}),
        # algorithm confusion: the RSA public key (which anyone has) used as an HMAC secret
        "confusion": hand_signed_hs256(
            {"alg": "HS256", "typ": "JWT", "kid": "rsa1"}, claims(), pem(RSA_KEY).encode()
        ),
        "confusion, no kid": hand_signed_hs256(
            {"alg": "HS256", "typ": "JWT"}, claims(), pem(RSA_KEY).encode()
        ),
        # an RS256 token presented under the EC key's id
        "kid/alg mismatch": jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "ec1"}),
        "alg none": jwt.encode(claims(), None, algorithm="none"),
        "alg none, kid": jwt.encode(claims(), None, algorithm="none", headers={"kid": "rsa1"}),
        "PS256 not configured": jwt.encode(claims(), RSA_KEY, algorithm="PS256", headers={"kid": "rsa1"}),
        "expired": jwt.encode(claims(exp=int(time.time()) - 30), EC_KEY, algorithm="ES256"),
        "not yet valid": jwt.encode(claims(nbf=int(time.time()) + 60), EC_KEY, algorithm="ES256"),
        "tampered payload": es.rsplit(".", 2)[0]
        + "."
        + b64(json.dumps(claims(subscribe=["**"])).encode())
        + "."
        + es.rsplit(".", 1)[1],
    }
    answers = {name: status(srv, t) for name, t in forged.items()}
    assert answers == {name: 401 for name in forged}
    # Within the leeway an expiry just passed is still accepted (clock skew), and beyond it not.
    just_expired = jwt.encode(claims(exp=int(time.time()) - 1), EC_KEY, algorithm="ES256")
    assert status(srv, just_expired) == 200


def test_public_key_settings_are_checked_at_startup():
    with pytest.raises(SettingsError):
        Settings.from_env({"SLUICE_PUBLIC_KEYS": "not json"})
    with pytest.raises(SettingsError):
        Settings.from_env({"SLUICE_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"})
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(SettingsError):
        Settings.from_env({"SLUICE_PUBLIC_KEY": pem(weak)})
    # A PEM pasted with literal \n (as some config UIs need) works; production accepts it alone.
    s = Settings.from_env({"SLUICE_PUBLIC_KEY": pem(EC_KEY).replace("\n", "\\n"), "SLUICE_ENV": "production"})
    assert list(s.public_keys) == ["public"] and not s.secrets
