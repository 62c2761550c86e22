"""Optional API keys (Bearer, or the api-key / x-api-key headers); the per-key limit is gateway/ratelimit.py.

Keys are compared in constant time (``hmac.compare_digest`` against every configured key) and
never logged: logs and cache namespaces only see ``key_id``, a short hash of the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping

from gateway.config import AuthConfig
from gateway.errors import OpenAIError


def key_id(key: str | None) -> str:
    """A stable, non-reversible name for a key (cache namespace, rate-limit bucket, logs)."""
    if not key:
        return "anon"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# Which request headers may carry the key, in the order they are read (README, "Authentication"):
# OpenAI's `Authorization: Bearer <key>`, Azure OpenAI's `api-key: <key>`, and `x-api-key: <key>`
# (Anthropic-style clients, LiteLLM). The first one present is the one checked.
KEY_HEADERS = ("authorization", "api-key", "x-api-key")
HOW_TO_SEND = "send 'Authorization: Bearer <key>' (or 'api-key: <key>', or 'x-api-key: <key>')"
REALM = 'Bearer realm="octoroute"'


class Authenticator:
    def __init__(self, config: AuthConfig, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        keys = list(config.api_keys)
        if config.api_keys_env and env.get(config.api_keys_env):
            keys += [k.strip() for k in env[config.api_keys_env].split(",") if k.strip()]
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check_request(self, headers: Mapping[str, str]) -> str | None:
        """``check`` on whichever of ``KEY_HEADERS`` the request carries (a plain key becomes a Bearer one)."""
        authorization = headers.get("authorization")
        if authorization is None or not authorization.lower().startswith("bearer "):
            plain = headers.get("api-key") or headers.get("x-api-key")
            if plain:
                authorization = f"Bearer {plain}"
        return self.check(authorization)

    def check(self, authorization: str | None) -> str | None:
        """Returns the presented key (None when auth is off); raises a 401 in OpenAI's shape, with the
        ``WWW-Authenticate`` challenge of RFC 6750 §3."""
        if not self._keys:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(401, f"Missing API key: {HOW_TO_SEND}.", "invalid_request_error", None,
                              "invalid_api_key", headers={"WWW-Authenticate": REALM})
        presented = token.strip().encode()
        match = False
        for candidate in self._keys:  # no early exit: time does not depend on which key matched
            match |= hmac.compare_digest(presented, candidate)
        if not match:
            raise OpenAIError(401, f"Incorrect API key provided; {HOW_TO_SEND} with a key this gateway knows.",
                              "invalid_request_error", None, "invalid_api_key",
                              headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'})
        return token.strip()

