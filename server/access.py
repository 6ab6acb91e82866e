"""Who may call what: TLS / mutual-TLS credentials, per-caller tokens with roles, request decoding
that cannot crash a handler, and keyed pseudonyms for user ids.

- TLS: `server_credentials(config)` builds gRPC server credentials from PEM files; with a client CA
  the server requires client certificates signed by it (mutual TLS).
- Tokens: a JSON file `{"callers": [{"name": "storefront", "token_sha256": "<hex>", "roles": ["read"]}, ...]}`
  (`"token": "<plain>"` is accepted too; hashes are better on disk). A call carries
  `authorization: Bearer <token>`. No or unknown token -> UNAUTHENTICATED; a known caller without the
  RPC's role -> PERMISSION_DENIED. Roles: read (Search, Suggest, Recommend, SimilarItems, GetInfo, Classify, ListRules,
  reflection), write (Feedback, UpsertItems, DeleteItems, PutRules, DeleteRules), reload (ReloadBundle), ads
  (PutCampaigns, SetCampaignStatus, ListCampaigns, AdsReport). A caller with `"advertiser": "NAME"` sees and
  changes that advertiser's campaigns only; an ads caller without one is ad operations (every advertiser).
  Health checks need no token, so load balancers can probe.
- Decoding: a request that is not a valid protobuf message (for example strings that are not UTF-8)
  reaches the handler as `Undecodable` and is answered INVALID_ARGUMENT instead of gRPC's INTERNAL.
- Pseudonyms: `Pseudonymiser(key)(user_id)` is an HMAC-SHA256 of the id, so the event store and logs
  never hold the raw id while the same user still maps to the same history.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

ROLES = ("read", "write", "reload", "ads")
SERVICE_PREFIX = "/searchrec.v1.SearchRecommend/"
# The role each RPC of the service needs; anything not listed (reflection) needs "read".
RPC_ROLE = {"Search": "read", "Recommend": "read", "SimilarItems": "read", "GetInfo": "read", "Classify": "read", "Suggest": "read",
            "ListRules": "read", "Feedback": "write", "UpsertItems": "write", "DeleteItems": "write",
            "PutRules": "write", "DeleteRules": "write", "ReloadBundle": "reload",
            "PutCampaigns": "ads", "SetCampaignStatus": "ads", "ListCampaigns": "ads", "AdsReport": "ads"}
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class AccessConfigError(ValueError):
    """A TLS or tokens file cannot be used; the message names the file and the problem."""


def _read(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AccessConfigError(f"{what} {path}: cannot read it ({exc.strerror})") from exc
    if not data.strip():
        raise AccessConfigError(f"{what} {path}: the file is empty")
    return data


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS credentials; with client_ca, clients must present a certificate signed by it (mTLS)."""
    chain, private = _read(cert, "--tls-cert"), _read(key, "--tls-key")
    if b"-----BEGIN" not in chain or b"-----BEGIN" not in private:
        raise AccessConfigError(f"--tls-cert {cert} / --tls-key {key}: expected PEM files")
    root = _read(client_ca, "--tls-client-ca") if client_ca is not None else None
    return grpc.ssl_server_credentials([(private, chain)], root_certificates=root,
                                       require_client_auth=root is not None)


@dataclass(frozen=True)
class Caller:
    name: str
    roles: frozenset[str]
    advertiser: str = ""  # an advertiser's token: its own campaigns and reports only


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def load_tokens(path: Path) -> dict[str, Caller]:
    """token sha256 -> Caller, from the JSON tokens file (see module docstring)."""
    try:
        doc = json.loads(_read(path, "--tokens"))
    except json.JSONDecodeError as exc:
        raise AccessConfigError(f"--tokens {path}: not JSON ({exc})") from exc
    callers = doc.get("callers") if isinstance(doc, dict) else None
    if not isinstance(callers, list) or not callers:
        raise AccessConfigError(f"--tokens {path}: expected {{\"callers\": [...]}} with at least one caller")
    out: dict[str, Caller] = {}
    for i, c in enumerate(callers):
        where = f"--tokens {path}: callers[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
            raise AccessConfigError(f"{where}: needs a non-empty name")
        digest = c.get("token_sha256") or (hash_token(c["token"]) if isinstance(c.get("token"), str) and c["token"] else None)
        if not isinstance(digest, str) or len(digest) != 64:
            raise AccessConfigError(f"{where} ({c['name']}): needs token_sha256 (64 hex digits) or a non-empty token")
        roles = c.get("roles", ["read"])
        bad = [r for r in roles if r not in ROLES] if isinstance(roles, list) else [roles]
        if bad:
            raise AccessConfigError(f"{where} ({c['name']}): unknown roles {bad}; roles are {list(ROLES)}")
        if digest.lower() in out:
            raise AccessConfigError(f"{where} ({c['name']}): the same token as {out[digest.lower()].name}")
        advertiser = c.get("advertiser", "")
        if not isinstance(advertiser, str):
            raise AccessConfigError(f"{where} ({c['name']}): advertiser must be a string")
        out[digest.lower()] = Caller(c["name"], frozenset(roles), advertiser)
    return out


class Undecodable:
    """Stands in for a request whose bytes are not a valid message of the RPC's type."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return Undecodable(str(exc) or type(exc).__name__)

    return decode


def _deny(code: grpc.StatusCode, message: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def unary(request, context):
        await context.abort(code, message)

    async def stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)


class Gatekeeper(grpc.aio.ServerInterceptor):
    """Checks tokens and roles (when configured) and makes the service's request decoding safe."""

    def __init__(self, tokens: dict[str, Caller] | None, on_denied: Callable[[str, str], None] | None = None) -> None:
        self.tokens = tokens
        self.on_denied = on_denied

    def caller(self, metadata) -> Caller | None:
        """The caller a call's metadata names (None: tokens are not checked, or none was sent)."""
        if self.tokens is None:
            return None
        auth = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(auth, str) or not auth.startswith("Bearer "):
            return None
        return self.tokens.get(hash_token(auth[7:].strip()))

    def _check(self, method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
        if self.tokens is None or method.startswith(OPEN_PREFIXES):
            return None
        auth = next((v for k, v in metadata if k == "authorization"), None)
        if not isinstance(auth, str) or not auth.startswith("Bearer ") or not auth[7:].strip():
            return grpc.StatusCode.UNAUTHENTICATED, "this server needs a token: send metadata 'authorization: Bearer <token>'"
        caller = self.tokens.get(hash_token(auth[7:].strip()))
        if caller is None:
            return grpc.StatusCode.UNAUTHENTICATED, "unknown token"
        rpc = method[len(SERVICE_PREFIX):] if method.startswith(SERVICE_PREFIX) else ""
        role = RPC_ROLE.get(rpc, "read")
        if role not in caller.roles:
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"caller {caller.name!r} may not call {rpc or method}: it needs the {role!r} role")
        return None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        denied = self._check(method, handler_call_details.invocation_metadata or ())
        if denied is not None:
            if self.on_denied is not None:
                self.on_denied(method, denied[0].name)
            log.info("denied %s: %s", method, denied[1])
            return _deny(*denied, handler)
        if method.startswith(SERVICE_PREFIX) and handler.unary_unary is not None:
            return handler._replace(request_deserializer=_safe(handler.request_deserializer))
        return handler


class Pseudonymiser:
    """Keyed, stable pseudonyms for user ids (HMAC-SHA256, 128 bits shown)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise AccessConfigError("the user id key must be at least 16 bytes")
        self.key = key

    @classmethod
    def from_file(cls, path: Path) -> "Pseudonymiser":
        return cls(_read(path, "--user-id-key").strip())

    def __call__(self, user_id: str) -> str:
        if not user_id:
            return user_id
        return "p_" + hmac.new(self.key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]
