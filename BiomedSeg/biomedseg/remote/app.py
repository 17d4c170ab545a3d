"""The HTTP face of the relay (FastAPI): what the local worker does, over the network.

Every endpoint needs the token; every endpoint but ``/v1/hello`` also needs the client's version
headers to match (a mismatched client gets 409 with a sentence that says which side to update).
Bodies are read with a byte limit before anything parses them; arrays are decompressed only after
their header passed ``remote.arrays``' checks against the decompressed-size cap. Errors are JSON:
``{"error": {"kind", "message", "hint"}}`` with the status that fits.

  GET    /v1/hello                   version handshake
  GET    /v1/models                  the server's catalogue
  GET    /v1/status                  queue, warm models, sessions
  POST   /v1/unload                  free the worker's models and sessions
  HEAD   /v1/arrays/{id}             200 when the server holds that content, else 404
  PUT    /v1/arrays/{id}             upload (body: ``remote.arrays.pack``)
  POST   /v1/echo/{id}?threshold=T   ``array > T`` through the worker (a transport check)
  POST   /v1/jobs                    queue a job (``schema.JOB``), answers its id
  GET    /v1/jobs/{id}/events        server-sent events: queued, progress, result or error
  POST   /v1/jobs/{id}/cancel        cancel (the worker stops within its cancel grace)
  GET    /v1/jobs/{id}/masks         the result's masks; /probabilities the same for probabilities
  DELETE /v1/jobs/{id}               forget a job (cancelled when unfinished)
  DELETE /v1/sessions/{id}           close an interactive session
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import queue
import sys
import traceback

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import AccessDeniedError, BiomedSegError, InputError, WorkerMismatchError
from ..worker.protocol import PROTOCOL_VERSION, ProtocolError
from . import arrays, schema, tokens
from .relay import Relay

#: Largest JSON body (a job request with 1000 prompts is far below it).
MAX_JSON_BYTES = 1 << 20
#: Uploads decompressed at once (each on its own thread); more wait their turn.
MAX_UPLOADS = 4
UPLOADS = asyncio.Semaphore(MAX_UPLOADS)
UPLOAD_THREADS = concurrent.futures.ThreadPoolExecutor(MAX_UPLOADS, thread_name_prefix="biomedseg-upload")
#: An upload that sends nothing for this long is given up (its thread is freed).
UPLOAD_IDLE_S = 120.0
KEEPALIVE_S = 1.0
STATUS = {"bad_input": 400, "wrong_modality": 400, "access_denied": 401, "worker_mismatch": 409, "busy": 503,
          "too_large": 413, "not_found": 404, "weights_missing": 424, "dependency_missing": 424,
          "out_of_memory": 507}


class TooLargeError(InputError):
    kind = "too_large"


class NotFoundError(InputError):
    kind = "not_found"


def error_response(err: BiomedSegError, status: int | None = None) -> JSONResponse:
    return JSONResponse({"error": err.to_dict()}, status_code=status or STATUS.get(err.kind, 500))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it (or its Content-Length) passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"The request holds {int(declared)} bytes, more than the {limit} this server accepts.",
                            hint="Send a smaller volume, or start the server with a larger --max-upload-mb.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLargeError(f"The request is larger than the {limit} bytes this server accepts.",
                                hint="Send a smaller volume, or start the server with a larger --max-upload-mb.")
        chunks.append(chunk)
    return b"".join(chunks)


async def receive_array(request: Request, limit: int, max_array_bytes: int):
    """An uploaded array, decompressed chunk by chunk on a worker thread while the rest of the body still
    arrives; refused with 413 as soon as the body passes ``limit`` (or its header ``max_array_bytes``)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"The request holds {int(declared)} bytes, more than the {limit} this server accepts.",
                            hint="Send a smaller volume, or start the server with a larger --max-upload-mb.")
    unpacker, pieces = arrays.Unpacker(max_array_bytes), queue.SimpleQueue()

    def consume():
        while True:
            try:
                piece = pieces.get(timeout=UPLOAD_IDLE_S)
            except queue.Empty:
                raise arrays.ArrayFormatError(f"the upload stalled (nothing for {UPLOAD_IDLE_S:.0f} s)") from None
            if piece is None:
                return unpacker.finish()
            unpacker.feed(piece)

    async with UPLOADS:  # a few at once: each holds a thread and up to max_array_bytes
        done = asyncio.get_running_loop().run_in_executor(UPLOAD_THREADS, consume)
        size = 0
        try:
            async for piece in request.stream():
                size += len(piece)
                if size > limit:
                    raise TooLargeError(f"The request is larger than the {limit} bytes this server accepts.",
                                        hint="Send a smaller volume, or start the server with a larger "
                                             "--max-upload-mb.")
                if done.done():  # the unpacker refused what came so far: say why now
                    break
                pieces.put(piece)
        finally:
            pieces.put(None)
        return await done


def create_app(relay: Relay, token: str, *, max_upload_bytes: int = 2 << 30) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(relay.close)

    app = FastAPI(title="BiomedSeg", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(BiomedSegError)
    async def on_error(request, exc: BiomedSegError):
        return error_response(exc)

    @app.exception_handler(Exception)
    async def on_bug(request, exc: Exception):
        traceback.print_exception(exc, file=sys.stderr)
        return error_response(BiomedSegError(f"Internal error in the server: {type(exc).__name__}: {str(exc)[:200]}",
                                             hint="See the server's log; please report it."), 500)

    @app.exception_handler(TimeoutError)
    async def on_timeout(request, exc: TimeoutError):
        return error_response(BiomedSegError(f"The server's worker did not answer in time ({exc}).",
                                             hint="Try again; `biomedseg doctor --server URL` shows its state."), 504)

    @app.exception_handler(ProtocolError)
    async def on_protocol_error(request, exc: ProtocolError):
        return error_response(InputError(f"Rejected request: {exc}."))

    @app.exception_handler(arrays.ArrayFormatError)
    async def on_array_error(request, exc: arrays.ArrayFormatError):
        too_large = isinstance(exc, arrays.ArrayTooLargeError)
        return error_response((TooLargeError if too_large else InputError)(f"Rejected array: {exc}."))

    def authorized(request: Request) -> None:
        if not tokens.matches(token, request.headers.get("authorization")):
            raise AccessDeniedError("The server refused the token.",
                                    hint="Give the token `biomedseg serve` printed on its first start (--token, "
                                         "$BIOMEDSEG_TOKEN, or the panel's Token field).")

    def same_version(request: Request) -> None:
        authorized(request)
        problem = schema.mismatch(__version__, schema.API_VERSION, request.headers.get(schema.VERSION_HEADER, "?"),
                                  _int(request.headers.get(schema.API_HEADER)), str(request.base_url).rstrip("/"))
        if problem is not None:
            raise WorkerMismatchError(problem, hint="Nothing was run.")

    ready = [Depends(same_version)]

    @app.get("/v1/hello", dependencies=[Depends(authorized)])
    def hello():
        return {"service": "biomedseg", "version": __version__, "api": schema.API_VERSION,
                "protocol": PROTOCOL_VERSION, "max_upload_bytes": max_upload_bytes,
                "max_array_bytes": relay.max_array_bytes}

    @app.get("/v1/models", dependencies=ready)
    def models():
        from ..catalog import load_catalog

        return {"models": [{"id": e.id, "version": e.version, "title": e.title, "results": list(e.results),
                            "state": e.state()} for e in load_catalog()]}

    @app.get("/v1/status", dependencies=ready)
    def status():
        return relay.status()

    @app.post("/v1/unload", dependencies=ready)
    def unload():
        relay.unload()
        return {"unloaded": True}

    @app.head("/v1/arrays/{key}", dependencies=ready)
    def has_array(key: str):
        return Response(status_code=200 if _content_id(key) in relay.store else 404)

    @app.put("/v1/arrays/{key}", dependencies=ready)
    async def put_array(key: str, request: Request):
        key = _content_id(key)
        array, header = await receive_array(request, max_upload_bytes, relay.max_array_bytes)
        if header["id"] != key:
            raise InputError("The array's content id is not the one in the address.")
        relay.store.put(key, array)
        return {"stored": key, "nbytes": int(array.nbytes)}

    @app.post("/v1/echo/{key}", dependencies=ready)
    async def echo(key: str, threshold: float = 0.0):
        labels = await run_in_threadpool(relay.echo, _content_id(key), float(threshold))
        return array_response(labels)

    @app.post("/v1/jobs", dependencies=ready)
    async def submit(request: Request):
        message = schema.check_job(await read_body(request, MAX_JSON_BYTES))
        rjob = await run_in_threadpool(relay.submit, message)
        return {"job": rjob.id}

    @app.get("/v1/jobs/{job_id}/events", dependencies=ready)
    async def events(job_id: str, request: Request):
        rjob = _job(relay, job_id)
        start = _int(request.headers.get("last-event-id"))
        start = 0 if start is None else start + 1

        async def stream():
            sent, quiet = start, 0.0
            relay.watch(rjob, +1)
            try:
                while True:
                    pending = rjob.events[sent:]
                    for event in pending:
                        yield f"id: {sent}\ndata: {json.dumps(event, allow_nan=False)}\n\n"
                        sent += 1
                    if pending and pending[-1]["event"] in ("result", "error"):
                        return
                    quiet = 0.0 if pending else quiet + 0.02
                    if quiet >= KEEPALIVE_S:
                        quiet = 0.0
                        yield ": alive\n\n"
                    await asyncio.sleep(0.02)
            finally:
                relay.watch(rjob, -1)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=ready, status_code=202)
    def cancel(job_id: str):
        relay.cancel(_job(relay, job_id))
        return {"cancelling": job_id}

    @app.get("/v1/jobs/{job_id}/{what}", dependencies=ready)
    async def result_array(job_id: str, what: str):
        if what not in ("masks", "probabilities"):
            raise NotFoundError(f"No '{what[:40]}' here.")
        array = await run_in_threadpool(relay.result_array, _job(relay, job_id), what)
        return array_response(array)

    @app.delete("/v1/jobs/{job_id}", dependencies=ready)
    def forget(job_id: str):
        relay.forget(job_id)
        return {"forgotten": job_id}

    @app.delete("/v1/sessions/{session}", dependencies=ready)
    def close_session(session: str):
        if len(session) > 128:
            raise InputError("A session id is at most 128 characters.")
        return {"found": relay.close_session(session)}

    return app


def array_response(array) -> StreamingResponse:
    """``array`` as a streamed body: chunks go out as they are compressed (``arrays.pack_stream``)."""
    return StreamingResponse(arrays.pack_stream(array), media_type="application/octet-stream")


def _job(relay: Relay, job_id: str):
    try:
        return relay.get(job_id)
    except KeyError:
        raise NotFoundError(f"The server has no job '{job_id[:40]}' (finished jobs are kept a while, then dropped).",
                            hint="Run it again.") from None


def _content_id(key: str) -> str:
    if not schema.CONTENT_ID_RE.fullmatch(key):
        raise InputError("An array address is its 64-character sha256 content id.")
    return key


def _int(text) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None
