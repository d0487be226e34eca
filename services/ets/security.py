"""Transport security shared by every server and client: TLS from files, bearer-token auth.

Owns, once for all transports (gRPC search and reward servers, their clients, the HTTP front door):

- ``read_token`` / ``bearer_ok``: the shared secret read from a file and the constant-time check of
  an ``authorization: Bearer <token>`` header (``hmac.compare_digest``); every transport calls
  ``bearer_ok``, so a token is verified one way only;
- ``ServerSecurity``: a server's TLS certificate/key, optional client CA (mTLS: clients must
  present a certificate it signed) and token file; ``add_port`` binds a gRPC server with them
  and ``interceptors`` refuses calls without the token (UNAUTHENTICATED), except health and
  reflection, which stay open for probes; ``ssl_context`` / ``token`` give an HTTP transport the
  same setup;
- ``ClientSecurity`` / ``channel``: a client's CA, own certificate/key (mTLS) and token file,
  giving a secure or plaintext ``grpc.aio`` channel that sends the token on every call.

Everything is off by default (plaintext, no token: the loopback development setup). A file that
cannot be read raises ``FieldError`` naming the setting (env var) that points at it.
"""
from __future__ import annotations

import hmac
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import grpc

from ets.errors import FieldError

# Methods any caller may use without a token: Kubernetes/compose probes and tool discovery.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_SCHEME = "bearer "


def _read(path: str, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FieldError(setting, f"cannot read {path!r}: {exc.strerror or exc}") from None
    if not data.strip():
        raise FieldError(setting, f"{path!r} is empty")
    return data


def read_token(path: str, setting: str) -> str:
    """The token in file ``path`` (surrounding whitespace dropped; a Secret often ends in a newline)."""
    token = _read(path, setting).decode("utf-8", "replace").strip()
    if any(c.isspace() for c in token):
        raise FieldError(setting, f"the token in {path!r} must not contain whitespace")
    return token


def _check_readable(env_prefix: str, files: Sequence[tuple[str, str]], token_file: str) -> None:
    """Read each configured (setting suffix, path) and the token file, so that a missing or empty
    one fails at startup naming its env var (``env_prefix`` + suffix); "" paths are off."""
    for suffix, path in files:
        if path:
            _read(path, f"{env_prefix}{suffix}")
    if token_file:
        read_token(token_file, f"{env_prefix}AUTH_TOKEN_FILE")


def bearer_ok(header: str | None, token: str) -> bool:
    """Whether ``header`` (an ``authorization`` value) is ``Bearer <token>``; constant-time in the
    token so its content cannot be guessed byte by byte from response times."""
    if not header or header[: len(_SCHEME)].lower() != _SCHEME:
        return False
    return hmac.compare_digest(header[len(_SCHEME):].strip().encode(), token.encode())


class _FileSettings:
    """What server and client security share: settings named ``env_prefix`` + suffix in errors,
    a certificate that needs its key, and the bearer-token file."""

    env_prefix: str
    token_file: str

    def _name(self, suffix: str) -> str:
        return f"{self.env_prefix}{suffix}"

    def _check_pair(self, cert: tuple[str, str], key: tuple[str, str], message: str) -> None:
        """(setting suffix, path) of a certificate and its key: one without the other fails
        naming the missing one's setting."""
        (cert_suffix, cert_file), (key_suffix, key_file) = cert, key
        if bool(cert_file) != bool(key_file):
            raise FieldError(self._name(key_suffix if cert_file else cert_suffix), message)

    def token(self) -> str | None:
        """The bearer token (None: no auth): what a server checks with ``bearer_ok`` on every
        non-health call, and what a client sends."""
        return read_token(self.token_file, self._name("AUTH_TOKEN_FILE")) if self.token_file else None


# ---- servers -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerSecurity(_FileSettings):
    """A server's TLS and token settings (paths; "" = off) and the env vars naming them (errors)."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    token_file: str = ""
    env_prefix: str = "ETS_SEARCH_"

    def check(self) -> None:
        """Raise ``FieldError`` naming the env var for a half-configured or unreadable setup."""
        self._check_pair(("TLS_CERT_FILE", self.cert_file), ("TLS_KEY_FILE", self.key_file),
                         "TLS needs both a certificate and its key")
        if self.client_ca_file and not self.cert_file:
            raise FieldError(self._name("TLS_CLIENT_CA_FILE"),
                             f"client certificates need server TLS ({self._name('TLS_CERT_FILE')})")
        _check_readable(self.env_prefix, (("TLS_CERT_FILE", self.cert_file), ("TLS_KEY_FILE", self.key_file),
                                          ("TLS_CLIENT_CA_FILE", self.client_ca_file)), self.token_file)

    @property
    def tls(self) -> bool:
        return bool(self.cert_file)

    def credentials(self) -> grpc.ServerCredentials | None:
        if not self.cert_file:
            return None
        key = _read(self.key_file, self._name("TLS_KEY_FILE"))
        cert = _read(self.cert_file, self._name("TLS_CERT_FILE"))
        ca = _read(self.client_ca_file, self._name("TLS_CLIENT_CA_FILE")) if self.client_ca_file else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=ca is not None)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The same TLS/mTLS setup for an HTTP transport (aiohttp's ``ssl_context``); None: plaintext."""
        if not self.cert_file:
            return None
        self.check()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file:
            ctx.load_verify_locations(cafile=self.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if not self.token_file:
            return []
        token = self.token()
        return [BearerAuth(token)] if token else []

    def describe(self) -> str:
        parts = ["mTLS" if self.client_ca_file else "TLS" if self.cert_file else "plaintext"]
        parts.append("token auth" if self.token_file else "no auth")
        return ", ".join(parts)


def add_port(server: grpc.aio.Server, address: str, security: ServerSecurity) -> int:
    """Bind ``server`` to ``address`` (TLS when configured); the bound port, 0 if binding failed."""
    creds = security.credentials()
    if creds is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, creds)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that refuses the call without reading the request."""
    message = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - an async generator for the streaming kinds

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary)
    return grpc.stream_stream_rpc_method_handler(stream)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuses every call but health and reflection unless it carries the bearer token."""

    def __init__(self, token: str, open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES) -> None:
        self._token = token
        self._open = tuple(open_prefixes)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if details.method.startswith(self._open):
            return await continuation(details)
        header = next((str(v) for k, v in (details.invocation_metadata or ()) if k == "authorization"), None)
        handler = await continuation(details)
        if handler is None or bearer_ok(header, self._token):
            return handler
        return _denied(handler)


# ---- clients -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientSecurity(_FileSettings):
    """A client's view: CA to trust ("" = plaintext unless a client cert is set), its own
    certificate/key for mTLS, the token file, and the env vars naming them (for errors)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    token_file: str = ""
    env_prefix: str = "ETS_SEARCH_"

    @property
    def tls(self) -> bool:
        return bool(self.ca_file or self.cert_file)

    def check(self) -> None:
        self._check_pair(("TLS_CLIENT_CERT_FILE", self.cert_file), ("TLS_CLIENT_KEY_FILE", self.key_file),
                         "a client certificate needs both the certificate and its key")
        _check_readable(self.env_prefix, (("TLS_CA_FILE", self.ca_file), ("TLS_CLIENT_CERT_FILE", self.cert_file),
                                          ("TLS_CLIENT_KEY_FILE", self.key_file)), self.token_file)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        ca = _read(self.ca_file, self._name("TLS_CA_FILE")) if self.ca_file else None
        key = _read(self.key_file, self._name("TLS_CLIENT_KEY_FILE")) if self.key_file else None
        cert = _read(self.cert_file, self._name("TLS_CLIENT_CERT_FILE")) if self.cert_file else None
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class _WithToken:
    """Adds ``authorization: Bearer <token>`` to every call (plaintext or TLS alike)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(tuple(d.metadata) if d.metadata else ()), self._header)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


# grpc.aio files an interceptor under the first kind it is an instance of: one class per kind.
class _UnaryWithToken(_WithToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamWithToken(_WithToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


def channel(address: str, security: ClientSecurity | None = None,
            options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``address``: TLS when ``security`` names a CA or a client
    certificate, the bearer token on every call when it names a token file."""
    security = security or ClientSecurity()
    token = security.token()
    interceptors: list[grpc.aio.ClientInterceptor] | None = (
        [_UnaryWithToken(token), _StreamWithToken(token)] if token else None)
    creds = security.credentials()
    if creds is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(address, creds, options=list(options), interceptors=interceptors)
