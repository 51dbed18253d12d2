"""What every client shares: the channel (plaintext or TLS), the call metadata (a bearer
token, the trace context), deadlines, retries of the calls that are safe to repeat, and errors
turned into :class:`agentmesh.errors.AgentmeshError`."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc
from google.protobuf import duration_pb2

from . import tracing
from .errors import from_rpc_error

T = TypeVar("T")

#: How long a unary call may take unless the caller says otherwise, seconds.
DEFAULT_TIMEOUT = 5.0
#: Attempts of a call that is safe to repeat, when the service is UNAVAILABLE.
RETRY_ATTEMPTS = 3


def duration(seconds: float) -> duration_pb2.Duration:
    """A protobuf Duration of ``seconds``."""
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def seconds(d: duration_pb2.Duration) -> float:
    """A protobuf Duration in seconds."""
    return float(d.ToNanoseconds()) / 1e9


def split_address(address: str) -> tuple[str, bool]:
    """``http://host:port`` → (``host:port``, plaintext); ``https://…`` → TLS; a bare
    ``host:port`` is plaintext."""
    for scheme, tls in (("https://", True), ("http://", False)):
        if address.startswith(scheme):
            return address[len(scheme) :].rstrip("/"), tls
    return address.rstrip("/"), False


def open_channel(
    address: str,
    *,
    tls_ca_file: str | None = None,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
) -> grpc.aio.Channel:
    """A channel to ``address``; TLS for ``https://`` or when a CA file is given (a client
    certificate for mutual TLS with ``tls_cert_file``/``tls_key_file``)."""
    target, tls = split_address(address)
    options = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ]
    if not (tls or tls_ca_file):
        return grpc.aio.insecure_channel(target, options=options)

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(tls_ca_file),
        private_key=read(tls_key_file),
        certificate_chain=read(tls_cert_file),
    )
    return grpc.aio.secure_channel(target, credentials, options=options)


class Client:
    """Base of every client: ``async with Client(...) as c`` closes the channel on exit.

    ``token`` (or ``token_file``, re-read on every call) is sent as ``authorization: Bearer``;
    ``timeout`` (seconds) bounds each unary call.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        token_file: str | None = None,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._token = token
        self._token_file = token_file
        self.channel = open_channel(
            address,
            tls_ca_file=tls_ca_file,
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
        )

    def metadata(self) -> list[tuple[str, str]]:
        """Metadata of the next call: the token and the current trace context."""
        metadata: list[tuple[str, str]] = []
        token = self._token
        if self._token_file:
            token = Path(self._token_file).read_text().strip()
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        tracing.inject(metadata)
        return metadata

    async def call(
        self,
        method: Callable[..., Awaitable[T]],
        request: object,
        *,
        timeout: float | None = None,
        retry: bool = False,
    ) -> T:
        """Runs a unary call with the metadata and a deadline; repeats it (up to 3 times, with
        jittered back-off) on UNAVAILABLE when ``retry`` says the call is safe to repeat."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(
                    request,
                    metadata=self.metadata(),
                    timeout=self.timeout if timeout is None else timeout,
                )
            except grpc.aio.AioRpcError as e:
                if retry and attempt < RETRY_ATTEMPTS and e.code() == grpc.StatusCode.UNAVAILABLE:
                    await asyncio.sleep(0.1 * 2**attempt * random.uniform(0.5, 1.0))
                    continue
                raise from_rpc_error(e) from None

    async def close(self) -> None:
        """Closes the channel (calls in flight are cancelled)."""
        await self.channel.close()

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
