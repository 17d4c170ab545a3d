"""`biomedseg serve`: bind, say where, and run the app under uvicorn until stopped.

Loopback unless told otherwise; TLS from the certificate and key the user gives; the token made
on first start is printed that once. The socket is bound here (port 0 picks a free one) so the
first line printed names the real address.
"""
from __future__ import annotations

import socket
import sys

from ..errors import DependencyMissingError, InputError
from . import tokens


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"Cannot listen on {host}:{port} ({exc.strerror}).",
                         hint="Choose another --port, or stop what listens there.") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(host: str = "127.0.0.1", port: int = 8765, *, token_file=None, certfile=None, keyfile=None,
          worker_python=None, max_upload_mb: float = 2048, max_array_mb: float = 4096, store_mb: float = 8192,
          out=sys.stdout) -> None:
    try:
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as exc:
        raise DependencyMissingError(f"`biomedseg serve` needs the package '{exc.name}'.",
                                     hint="pip install 'biomedseg[server]'") from None
    from .relay import Relay

    if bool(certfile) != bool(keyfile):
        raise InputError("TLS needs both --cert and --key.")
    token, made = tokens.load_or_create(token_file)
    path = token_file or tokens.default_token_file()
    sock = bind(host, port)
    scheme = "https" if certfile else "http"
    shown = f"[{host}]" if ":" in host else host
    print(f"BiomedSeg server listening on {scheme}://{shown}:{sock.getsockname()[1]}", file=out, flush=True)
    if made:
        print(f"token (shown this once; kept in {path}, readable only by you): {token}", file=out, flush=True)
    else:
        print(f"token: the one kept in {path}", file=out, flush=True)
    if not certfile and not tokens.is_loopback_url(f"http://{shown}"):
        print("warning: no TLS on a non-loopback address: the token and images travel in clear. "
              "Give --cert and --key, or tunnel (ssh -L).", file=out, flush=True)
    relay = Relay(worker_python, store_bytes=int(store_mb * 2**20), max_array_bytes=int(max_array_mb * 2**20))
    app = create_app(relay, token, max_upload_bytes=int(max_upload_mb * 2**20))
    config = uvicorn.Config(app, log_level="warning", ssl_certfile=certfile, ssl_keyfile=keyfile,
                            timeout_graceful_shutdown=3, access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        relay.close()
        sock.close()
