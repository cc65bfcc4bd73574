"""ServerConfig: how the HTTP server listens and whom it lets in (frozen; ``validate()`` -> ConfigError)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mlxserve.errors import ConfigError

__all__ = ["DEFAULT_MAX_BODY_BYTES", "LOOPBACK_HOSTNAMES", "ServerConfig", "is_loopback_host"]

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
# Host header names a loopback-bound server answers to; anything else is DNS rebinding or a proxy.
LOOPBACK_HOSTNAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ServerConfig:
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None  # when set, every route but /health needs "Authorization: Bearer <key>"
    insecure_no_auth: bool = False  # allow a non-loopback bind without a key (explicit opt-out)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; none: CORS off
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    write_timeout_s: float = 30.0  # a stream whose client reads nothing this long is dropped

    def validate(self) -> ServerConfig:
        if not self.served_model_name:
            raise ConfigError("the served model name must not be empty", param="served_model_name")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"`port` must be in [0, 65535], got {self.port}", param="port")
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise ConfigError("the API key must be non-empty, without surrounding spaces", param="api_key")
        if not self.is_loopback and self.api_key is None and not self.insecure_no_auth:
            raise ConfigError(
                f"binding {self.host} exposes the server beyond this machine: give --api-key, "
                "or pass --insecure-no-auth to serve without one", param="host",
            )
        if "*" in self.cors_origins:
            raise ConfigError("list CORS origins explicitly; '*' is not allowed", param="cors_origins")
        if self.max_body_bytes < 1024:
            raise ConfigError("`max_body_bytes` must be at least 1024", param="max_body_bytes")
        if not self.write_timeout_s > 0:
            raise ConfigError("`write_timeout_s` must be positive", param="write_timeout_s")
        return self

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"
