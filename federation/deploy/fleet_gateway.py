"""The fleet gateway: the one part of the operator's SuperLink that faces the network.

Flower 1.41 serves its Fleet API (SuperNodes), Control API (`flwr run`, `flwr ls`, `flwr log`, `flwr
supernode register`) and Runtime API (the ServerApp) on ONE HTTPS port, and the open-source Control API
has no authentication: whoever reaches that port can submit apps to every SuperNode, list runs and read
their logs. So `secure-kd deploy superlink` binds `flower-superlink` to 127.0.0.1 and runs this gateway
on the public interface:

    python -m federation.deploy.fleet_gateway --listen 0.0.0.0:9092 --upstream 127.0.0.1:9093 \\
        --ca ca.pem --cert server.pem --key server.key

It terminates TLS with the SuperLink's own certificate, forwards a request to the SuperLink (over TLS,
verified with the operator's CA) only when it is a POST to one of the Fleet API's paths in
`FLEET_PATHS` (exactly; the canonical path is forwarded, never the client's raw one, and there is no
query string), and answers everything else, the Control and Runtime APIs included, with 403 without
contacting the SuperLink. Behind it the SuperLink still checks every Fleet call's node signature
(`--enable-supernode-auth`). Fleet requests are unary protobuf over HTTP/1.1 (Flower's httpx client), so
the gateway streams each request body through and the response back.

The operator reaches the Control API on the SuperLink machine itself, or from elsewhere through an SSH
tunnel to 127.0.0.1 (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

logger = logging.getLogger("secure_kd.fleet_gateway")

# The Fleet API routes a SuperNode with an authentication key uses (Flower 1.41 FleetHttpClient). Fleet's
# register-node/unregister-node are left out: with --enable-supernode-auth the SuperLink refuses them, and
# nodes are registered by the operator through the (local) Control API.
FLEET_PATHS = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "activate-node",
        "deactivate-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
DEFAULT_MAX_REQUEST_BYTES = 2**31 - 1  # Flower's own limit on one protobuf message
REFUSED = b"secure-kd fleet gateway: only the Flower Fleet API is served on this address\n"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def is_fleet_request(method: str, path: str, query_string: bytes) -> bool:
    return method == "POST" and path in FLEET_PATHS and not query_string


class RequestTooLarge(Exception):
    pass


class FleetGateway:
    """ASGI app: forwards Fleet API requests to `upstream` (an https:// base URL), refuses the rest."""

    def __init__(
        self,
        upstream: str,
        *,
        verify: ssl.SSLContext | bool = True,
        client: httpx.AsyncClient | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.max_request_bytes = max_request_bytes
        self.client = client or httpx.AsyncClient(
            verify=verify, timeout=httpx.Timeout(300.0, connect=10.0), follow_redirects=False
        )
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: nothing of Flower's
            return
        method, path = scope["method"], scope["path"]
        if not is_fleet_request(method, path, scope.get("query_string", b"")):
            self.refused += 1
            client = scope.get("client") or ("?", 0)
            logger.warning("refused %s %s from %s: not a Fleet API request", method, path[:200], client[0])
            await _respond(send, 403, REFUSED)
            return
        await self._forward(path, scope, receive, send)

    async def _forward(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        request = self.client.build_request(
            "POST", self.upstream + path, headers=headers, content=self._body(receive)
        )
        try:
            response = await self.client.send(request, stream=True)
        except RequestTooLarge:
            await _respond(send, 413, b"request too large\n")
            return
        except httpx.HTTPError as error:
            logger.error("the SuperLink behind the gateway did not answer %s: %s", path, error)
            await _respond(send, 502, b"the SuperLink is not reachable\n")
            return
        try:
            out = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in response.headers.multi_items()
                if k.lower().encode("latin-1") not in HOP_BY_HOP - {b"content-length"}
            ]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _body(self, receive: Receive) -> AsyncIterator[bytes]:
        total = 0
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                return
            chunk = event.get("body", b"")
            total += len(chunk)
            if total > self.max_request_bytes:
                raise RequestTooLarge
            if chunk:
                yield chunk
            if not event.get("more_body", False):
                return

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _host_port(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SystemExit(f"{what} {address!r} must be HOST:PORT (IPv6 as [::]:PORT)")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="public HOST:PORT the SuperNodes dial")
    parser.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    parser.add_argument("--ca", required=True, help="the operator's ca.pem (verifies the SuperLink)")
    parser.add_argument("--cert", required=True, help="server.pem: the certificate SuperNodes verify")
    parser.add_argument("--key", required=True, help="server.key")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    args = parser.parse_args(argv)
    import uvicorn

    host, port = _host_port(args.listen, "--listen")
    _host_port(args.upstream, "--upstream")
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s fleet-gateway: %(message)s", stream=sys.stderr
    )
    upstream_tls = ssl.create_default_context(cafile=args.ca)
    app = FleetGateway(
        f"https://{args.upstream}", verify=upstream_tls, max_request_bytes=args.max_request_bytes
    )
    logger.info(
        "Fleet API only on %s -> SuperLink %s (Control and Runtime APIs refused)", args.listen, args.upstream
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=args.cert,
        ssl_keyfile=args.key,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
