"""`biomedseg serve` and the `--server` choice of the commands that run models."""
from __future__ import annotations

import sys


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the worker behind an HTTP server (for Slicer or CLI clients elsewhere, "
                                     "or to keep models warm across CLI calls)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--token-file", help="where the access token is kept (default ~/.config/biomedseg/server-token)")
    p.add_argument("--cert", help="TLS certificate (PEM); with --key the server speaks https")
    p.add_argument("--key", help="TLS private key (PEM)")
    p.add_argument("--worker-python", help="Python executable for the worker (default: this one)")
    p.add_argument("--max-upload-mb", type=float, default=2048, help="largest request body (default 2048)")
    p.add_argument("--max-array-mb", type=float, default=4096,
                   help="largest array once decompressed (default 4096)")
    p.add_argument("--store-mb", type=float, default=8192,
                   help="memory for volumes kept so clients need not send them again (default 8192)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from ..remote.server import serve

    try:
        serve(args.host, args.port, token_file=args.token_file, certfile=args.cert, keyfile=args.key,
              worker_python=args.worker_python, max_upload_mb=args.max_upload_mb, max_array_mb=args.max_array_mb,
              store_mb=args.store_mb)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn shut down gracefully first, then passed the signal on
        pass
    print("server stopped", file=sys.stderr)
    return 0


def add_server_arguments(p) -> None:
    p.add_argument("--server", metavar="URL", help="run on a BiomedSeg server (`biomedseg serve`) instead of a "
                                                   "local worker, e.g. http://127.0.0.1:8765")
    p.add_argument("--token", help="the server's token (default: $BIOMEDSEG_TOKEN, or this machine's token file)")
    p.add_argument("--ca-cert", help="CA file that signed the server's TLS certificate (a self-signed one)")
    p.add_argument("--fallback-local", action="store_true",
                   help="when the server cannot be reached, run with a local worker instead (said on stderr)")


def check_where(args) -> None:
    """--server and --in-process name two different places to run: refuse the pair before anything is read."""
    if getattr(args, "server", None) and getattr(args, "in_process", False):
        from ..errors import InputError

        raise InputError("--server and --in-process cannot be used together.", hint="Choose where the model runs.")


def worker_for(args, model: str):
    """The client a command runs its job with: the server's when --server is given (or a local worker if it
    cannot be reached and --fallback-local asks for that), else a local worker in the model's Python."""
    from ..errors import ServerUnavailableError
    from ..worker.client import WorkerClient
    from .environments import worker_python_for

    if getattr(args, "server", None):
        from ..remote.client import RemoteWorkerClient

        client = RemoteWorkerClient(args.server, args.token, verify=args.ca_cert or True)
        try:
            client.start()
            return client
        except ServerUnavailableError as exc:
            client.close()
            if not args.fallback_local:
                raise
            print(f"warning: {exc.message} Running with a local worker (--fallback-local).", file=sys.stderr)
    return WorkerClient(python=worker_python_for(model, getattr(args, "worker_python", None)))
