"""TLS and mTLS for the tap -> sidecar gRPC stream: one place that turns certificate paths into gRPC
credentials, for the sidecar (server) and for every client (the tap, tools, tests).

    sidecar flags            --tls-cert, --tls-key     TLS: the sidecar's certificate chain and key
                             --tls-client-ca           mTLS: require client certificates signed by it
    client environment       LENPRED_SIDECAR_TLS_CA           CA bundle that verifies the sidecar
                             LENPRED_SIDECAR_TLS_SERVER_NAME  name expected in the sidecar's
                                                              certificate (default: the dialled host)
                             LENPRED_SIDECAR_TLS_CERT, _KEY   client certificate and key (mTLS)

Files are read by path. Every file is checked when the configuration is built (`check()`), so a
missing, unreadable or non-PEM file stops the start with the path and the reason, instead of a
handshake failure on the first connection. Clients re-read their files on every (re)connect, so a
renewed certificate mounted from a Secret is picked up without a restart; the sidecar reads its
own at start.
"""
from __future__ import annotations

import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc

CA_ENV = "LENPRED_SIDECAR_TLS_CA"
SERVER_NAME_ENV = "LENPRED_SIDECAR_TLS_SERVER_NAME"
CERT_ENV = "LENPRED_SIDECAR_TLS_CERT"
KEY_ENV = "LENPRED_SIDECAR_TLS_KEY"
MAX_PEM_BYTES = 1 << 20  # a certificate bundle is kilobytes; refuse to slurp a mis-pointed large file


class TLSConfigError(ValueError):
    """A TLS setting that cannot work: the message names the file or setting and why."""


def read_pem(path: str, what: str) -> bytes:
    """The bytes of a PEM file, or TLSConfigError saying which setting, which path and why."""
    try:
        size = os.path.getsize(path)
        if size > MAX_PEM_BYTES:
            raise TLSConfigError(f"{what} {path}: {size} bytes, more than {MAX_PEM_BYTES} (not a PEM file?)")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TLSConfigError(f"{what} {path}: cannot read: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise TLSConfigError(f"{what} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


def _check_pair(cert: str, key: str, what: str) -> None:
    """The certificate and key parse and belong together (checked with the ssl module, which
    says why, unlike gRPC's handshake failure later)."""
    read_pem(cert, f"{what} certificate")
    read_pem(key, f"{what} key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as e:
        raise TLSConfigError(f"{what} certificate {cert} / key {key}: unusable: {e}") from None


def _check_ca(path: str, what: str) -> None:
    read_pem(path, what)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError) as e:
        raise TLSConfigError(f"{what} {path}: no usable CA certificate: {e}") from None


# --------------------------------------------------------------------------- server (sidecar)
@dataclass(frozen=True)
class ServerTLS:
    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.client_ca)

    def check(self) -> None:
        if not self.enabled:
            return
        if not (self.cert and self.key):
            raise TLSConfigError("--tls-cert and --tls-key go together (and --tls-client-ca needs both)")
        _check_pair(self.cert, self.key, "--tls-cert/--tls-key: sidecar")
        if self.client_ca:
            _check_ca(self.client_ca, "--tls-client-ca")

    def credentials(self) -> grpc.ServerCredentials:
        self.check()
        ca = read_pem(self.client_ca, "--tls-client-ca") if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(read_pem(self.key, "--tls-key"), read_pem(self.cert, "--tls-cert"))],
            root_certificates=ca, require_client_auth=ca is not None)


def bind(server, address: str, tls: ServerTLS) -> int:
    """Add the listening port: TLS (mTLS with a client CA) when configured, else plaintext.
    Returns the bound port; 0 means gRPC could not bind it."""
    if tls.enabled:
        return server.add_secure_port(address, tls.credentials())
    return server.add_insecure_port(address)


# --------------------------------------------------------------------------- clients (tap, tools)
@dataclass(frozen=True)
class ClientTLS:
    ca: str = ""
    server_name: str = ""
    cert: str = ""
    key: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ClientTLS":
        env = os.environ if env is None else env
        return cls(env.get(CA_ENV, ""), env.get(SERVER_NAME_ENV, ""), env.get(CERT_ENV, ""), env.get(KEY_ENV, ""))

    @property
    def enabled(self) -> bool:
        """TLS is on when a CA or a client certificate is given (a server name alone is an error)."""
        return bool(self.ca or self.cert or self.key)

    def check(self) -> None:
        if not self.enabled:
            if self.server_name:
                raise TLSConfigError(f"{SERVER_NAME_ENV} is set but TLS is off: set {CA_ENV} too")
            return
        if bool(self.cert) != bool(self.key):
            raise TLSConfigError(f"{CERT_ENV} and {KEY_ENV} go together (client certificate for mTLS)")
        if self.ca:
            _check_ca(self.ca, CA_ENV)
        if self.cert:
            _check_pair(self.cert, self.key, f"{CERT_ENV}/{KEY_ENV}: client")

    def credentials(self) -> grpc.ChannelCredentials:
        """Read now (every reconnect), so renewed files are used. Without a CA the system roots
        verify the sidecar."""
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca, CA_ENV) if self.ca else None,
            private_key=read_pem(self.key, KEY_ENV) if self.key else None,
            certificate_chain=read_pem(self.cert, CERT_ENV) if self.cert else None)


def open_channel(target: str, tls: ClientTLS | None = None,
                 options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A (sync) channel to the sidecar: TLS per `tls`, plaintext when it is None or off."""
    opts = list(options)
    if tls is None or not tls.enabled:
        return grpc.insecure_channel(target, options=opts)
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target, tls.credentials(), options=opts)
