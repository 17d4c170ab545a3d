"""``RemoteWorkerClient``: the ``WorkerClient`` interface over HTTP to `biomedseg serve`.

The panel and the CLI use it exactly as the local client: ``submit`` returns a job at once,
``poll`` (on the caller's thread, from a QTimer in Slicer) runs the callbacks, ``cancel``,
``wait``, ``run``, ``close_session``, ``request``, ``close``. The network work happens on
background threads: one sender that uploads and queues this client's jobs in order (so the
server sees them in the order they were submitted), and one reader per job that follows its
event stream and downloads its result. Nothing they do touches the caller's objects; they
only put events in a queue.

Uploads go only when the server lacks the content (``HEAD /v1/arrays/{id}``). What comes back
is checked: the array's checksum, and its shape against the job's. A lost connection (server
killed, network down, no keep-alive for ``read_timeout`` seconds) fails the job with a
``ServerUnavailableError``; the next request starts with a fresh handshake.
"""
from __future__ import annotations

import collections
import itertools
import json
import queue
import threading
import time
import uuid
from typing import Callable

import numpy as np

from .. import __version__
from ..errors import (AccessDeniedError, BiomedSegError, CancelledError, DependencyMissingError, InputError,
                      ServerUnavailableError, WorkerMismatchError, error_from_dict)
from ..geometry import Region
from ..prompts import MaskPrompt, prompt_to_dict, targets_of
from ..results import SegmentationResult
from ..volume import Volume
from ..worker.jobs import Job, result_from_message, wait_for
from . import arrays, schema, tokens

#: Seconds without a byte from an event stream (the server sends one every second) before the
#: connection counts as lost.
READ_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
#: Arrays larger than this are refused on arrival, whatever the server says.
MAX_RESULT_BYTES = 1 << 36


def _requests():
    try:
        import requests
    except ModuleNotFoundError:
        raise DependencyMissingError("Connecting to a BiomedSeg server needs the package 'requests'.",
                                     hint="pip install 'biomedseg[remote]'") from None
    return requests


class RemoteWorkerClient:
    """Same interface as ``worker.client.WorkerClient``; ``url`` is the server's base address."""

    def __init__(self, url: str, token: str | None = None, *, verify: bool | str = True,
                 read_timeout: float = READ_TIMEOUT_S, log_lines: int = 200, codec: str = "zstd"):
        requests = _requests()
        if not url.startswith(("http://", "https://")):
            raise InputError(f"Server address '{url}' must start with http:// or https://.")
        self.url = url.rstrip("/")
        self.token = tokens.client_token(token, url)
        self.verify = verify
        self.read_timeout = read_timeout
        #: how volumes go up (``arrays.CODECS``); what comes down names its own
        self.codec = codec
        self.http = requests.Session()
        self.log = collections.deque(maxlen=log_lines)
        self.hello: dict | None = None
        self.mismatch: WorkerMismatchError | None = None
        self.sessions: dict[str, tuple] = {}
        self.known_arrays: set[str] = set()
        self.worker_pid = None
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._events: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self._connected_before = False
        self._send_lock = threading.Lock()  # a cancel and the sender agree on whether the job was posted
        self._session_prefix = uuid.uuid4().hex[:12]  # session ids of different clients never collide
        self._sender = threading.Thread(target=self._send_jobs, daemon=True, name="biomedseg-remote-send")
        self._sender.start()

    # ---- HTTP ---------------------------------------------------------------------------
    def _headers(self) -> dict:
        headers = schema.client_headers()
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _call(self, method: str, path: str, *, timeout: float = 60.0, ok=(200, 202), **kwargs):
        requests = _requests()
        try:
            response = self.http.request(method, self.url + path, headers=self._headers(), verify=self.verify,
                                         timeout=(CONNECT_TIMEOUT_S, timeout), **kwargs)
        except requests.exceptions.SSLError as exc:
            raise ServerUnavailableError(f"The TLS connection to {self.url} failed ({_short(exc)}).",
                                         hint="Check the server's certificate, or give the CA file it was "
                                              "signed with.") from None
        except requests.exceptions.RequestException as exc:
            self.hello = None
            raise ServerUnavailableError(f"The BiomedSeg server at {self.url} cannot be reached ({_short(exc)}).",
                                         hint="Check that `biomedseg serve` runs there and the address is right; "
                                              "then run again.") from None
        if response.status_code not in ok:
            raise self._refusal(response)
        return response

    def _refusal(self, response) -> BiomedSegError:
        try:
            error = error_from_dict(response.json()["error"])
        except (ValueError, KeyError, TypeError):
            error = BiomedSegError(f"The server at {self.url} answered {response.status_code} "
                                   f"({response.text[:200]!r}).", hint="Is this address a BiomedSeg server?")
        if response.status_code == 401:
            return AccessDeniedError(error.message, hint=error.hint)
        if isinstance(error, WorkerMismatchError):
            self.mismatch = error
        return error

    def start(self) -> None:
        """The version handshake, once per connection."""
        if self.hello is not None:
            return
        self.known_arrays.clear()  # a new connection may be a restarted server with an empty store
        if self._connected_before:
            self.sessions = {}  # ... and without the images of this client's sessions
        self._connected_before = True
        hello = self._call("GET", "/v1/hello", timeout=15).json()
        problem = schema.mismatch(hello.get("version"), hello.get("api"), __version__, schema.API_VERSION, self.url)
        if problem is not None:
            self.mismatch = WorkerMismatchError(problem, hint="Nothing was sent.")
            raise self.mismatch
        self.mismatch = None
        self.hello = hello

    @property
    def alive(self) -> bool:
        return self.hello is not None

    # ---- jobs -----------------------------------------------------------------------------
    def submit(self, volume: Volume | None, model: str, prompts, *, device: str = "auto",
               threshold: float | None = None, keep_largest: bool | None = None, fill_holes: bool | None = None,
               weights: str | None = None, options: dict | None = None, probabilities: bool = False,
               region: Region | None = None, session: str | None = None, free_text: bool = False,
               force: bool = False, on_progress: Callable | None = None, on_done: Callable | None = None) -> Job:
        """Queue a job; returns at once (the upload happens on the sender thread)."""
        from ..catalog import check_prompts

        prompts = check_prompts(model, prompts, free_text)
        if volume is None and session not in self.sessions:
            raise InputError("No image was given." if session is None else
                             f"Session '{session}' is not open here.", hint="Send the image to open it.")
        shape = tuple(volume.shape) if volume is not None else self.sessions[session]
        targets = targets_of(prompts)
        job = Job(next(self._ids), model, prompts, volume, targets, session, on_progress=on_progress, on_done=on_done)
        job.message = {"model": model, "device": device, "threshold": threshold, "keep_largest": keep_largest,
                       "fill_holes": fill_holes, "weights": weights, "options": options or {},
                       "region": region.to_dict() if region is not None else None, "probabilities": bool(probabilities),
                       "session": f"{self._session_prefix}:{session}" if session is not None else None,
                       "free_text": bool(free_text), "force": bool(force)}
        job.outputs["shape"] = shape
        if session is not None:
            self.sessions[session] = shape
        self._jobs[job.id] = job
        self._outbox.put(job)
        return job

    def _send_jobs(self) -> None:
        while True:
            job = self._outbox.get()
            if job is None:
                return
            if job.cancel_requested_at is not None:
                continue  # cancelled before it was sent: ``cancel`` ended it already
            try:
                self.start()
                remote_id = self._post_job(job)
            except Exception as exc:  # noqa: BLE001 -- this job fails with the reason; the sender goes on
                self._events.put(("error", job, _as_error(exc, "sending the job")))
                continue
            with self._send_lock:
                job.outputs["remote"] = remote_id
                cancelled = job.cancel_requested_at is not None
            if cancelled:  # pressed while it was uploading: the server has it now, so tell the server
                self._in_background(self._cancel_remote, remote_id)
            threading.Thread(target=self._follow, args=(job, remote_id), daemon=True,
                             name=f"biomedseg-remote-job-{job.id}").start()

    def _post_job(self, job: Job, retry: bool = True) -> str:
        job.outputs["sending"] = True
        message = dict(job.message, prompts=[])
        for prompt in job.prompts:
            entry = prompt_to_dict(prompt)
            if isinstance(prompt, MaskPrompt):
                entry["mask"] = {"array": self._upload(prompt.mask.astype(np.uint8))}
            message["prompts"].append(entry)
        if job.volume is not None:
            volume = job.volume
            meta = {str(k)[:64]: v[:4096] if isinstance(v, str) else v for k, v in volume.meta.items()
                    if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
            message["volume"] = {"array": self._upload(volume.array), "ijk_to_ras": volume.ijk_to_ras.ravel().tolist(),
                                 "name": str(volume.name)[:1000], "channels_last": bool(volume.channels_last),
                                 "meta": dict(list(meta.items())[:64])}
        body = json.dumps(message, allow_nan=False).encode()
        try:
            return self._call("POST", "/v1/jobs", data=body, timeout=120).json()["job"]
        except InputError as exc:
            if not retry or "is not on the server" not in exc.message:
                raise
            self.known_arrays.clear()  # the server dropped it from its store since: send again, once
            return self._post_job(job, retry=False)

    def _upload(self, array: np.ndarray) -> str:
        key = arrays.content_id(array)
        if key in self.known_arrays:
            return key
        if self._call("HEAD", f"/v1/arrays/{key}", ok=(200, 404), timeout=30).status_code != 200:
            limits = (self.hello or {}).get("max_array_bytes"), (self.hello or {}).get("max_upload_bytes")
            if limits[0] is not None and array.nbytes > limits[0]:
                raise InputError(f"The image takes {array.nbytes / 2**20:.0f} MiB; the server at {self.url} accepts "
                                 f"arrays up to {limits[0] / 2**20:.0f} MiB.",
                                 hint="Crop it (a region or slice range), or ask for a larger --max-array-mb there.")
            body = _capped(arrays.pack_stream(array, codec=self.codec, known_id=key), limits[1])
            try:  # compressed chunk by chunk while earlier chunks travel
                self._call("PUT", f"/v1/arrays/{key}", data=body, timeout=600)
            except ServerUnavailableError:
                if body.too_large:
                    raise InputError(f"The compressed image passes the {limits[1] / 2**20:.0f} MiB the server at "
                                     f"{self.url} accepts in one request.",
                                     hint="Crop it, or ask for a larger --max-upload-mb there.") from None
                raise
        self.known_arrays.add(key)
        return key

    def _follow(self, job: Job, remote_id: str) -> None:
        """Read the job's event stream into the queue; fetch its result. Runs on its own thread."""
        requests = _requests()
        try:
            response = self._call("GET", f"/v1/jobs/{remote_id}/events", stream=True, timeout=self.read_timeout)
            with response:
                for line in response.iter_lines(chunk_size=None):
                    if not line or not line.startswith(b"data:"):
                        continue
                    event = json.loads(line[5:])
                    if event["event"] == "result":
                        self._events.put(("result", job, self._result(job, remote_id, event)))
                        return
                    if event["event"] == "error":
                        self._events.put(("error", job, error_from_dict(event.get("error") or {})))
                        self._in_background(self._forget_remote, remote_id)
                        return
                    self._events.put(("event", job, event))
            raise requests.exceptions.ConnectionError("the event stream ended before the job did")
        except BiomedSegError as exc:
            self._events.put(("error", job, exc))
        except requests.exceptions.RequestException as exc:
            self.hello = None
            self._events.put(("error", job, ServerUnavailableError(
                f"The connection to the BiomedSeg server at {self.url} was lost while the job ran ({_short(exc)}).",
                hint="Nothing was written. Check that the server runs, then run again.")))
        except Exception as exc:  # noqa: BLE001 -- a malformed event or result ends this job, never hangs it
            self._events.put(("error", job, _as_error(exc, "reading the server's answer")))

    def _result(self, job: Job, remote_id: str, event: dict) -> SegmentationResult:
        shape = tuple(event["mask_shape"])
        if shape[1:] != tuple(job.outputs["shape"]):
            raise InputError(f"The server's result is {shape[1:]}, not the image's {job.outputs['shape']}.")
        masks = self._download(remote_id, "masks", shape, np.uint8)
        probs = {}
        names = list(event.get("probability_targets") or [])
        if names:
            stack = self._download(remote_id, "probabilities", (len(names), *shape[1:]), np.float32)
            probs = {name: stack[i] for i, name in enumerate(names)}
        self._forget_remote(remote_id)
        return result_from_message(event, masks, probs, job.model)

    def _forget_remote(self, remote_id: str) -> None:
        try:
            self._call("DELETE", f"/v1/jobs/{remote_id}", timeout=30)
        except BiomedSegError:
            pass  # the server drops old jobs by itself

    def _cancel_remote(self, remote_id: str) -> None:
        try:
            self._call("POST", f"/v1/jobs/{remote_id}/cancel", timeout=10)
        except BiomedSegError as exc:
            self.log.append(f"[client] cancel: {exc}")

    @staticmethod
    def _in_background(fn, *args) -> None:
        """Network calls the caller must not wait for (the panel calls from Qt's thread)."""
        threading.Thread(target=fn, args=args, daemon=True, name="biomedseg-remote-call").start()

    def _download(self, remote_id: str, what: str, shape: tuple, dtype) -> np.ndarray:
        try:
            array = self._receive("GET", f"/v1/jobs/{remote_id}/{what}",
                                  max_bytes=int(np.prod(shape)) * np.dtype(dtype).itemsize)
        except arrays.ArrayFormatError as exc:
            raise ServerUnavailableError(f"The server's {what} arrived damaged ({exc}).",
                                         hint="Run again; if it repeats, report it.") from None
        if array.shape != shape or array.dtype != np.dtype(dtype):
            raise ServerUnavailableError(f"The server sent {what} of {array.shape} {array.dtype}, expected "
                                         f"{shape} {np.dtype(dtype).name}.", hint="Is the server the same version?")
        return array

    def _receive(self, method: str, path: str, max_bytes: int = MAX_RESULT_BYTES, **kwargs) -> np.ndarray:
        """An array the server sends, decompressed chunk by chunk as it arrives and checked (never more than
        ``max_bytes``: what the job's shape says it is)."""
        unpacker = arrays.Unpacker(max_bytes)
        with self._call(method, path, stream=True, timeout=600, **kwargs) as response:
            for piece in response.iter_content(chunk_size=1 << 20):
                unpacker.feed(piece)
        return unpacker.finish()[0]

    def cancel(self, job: Job) -> None:
        """Stop the job: at once when it has not reached the server yet, else through the server (on a
        background thread: the caller never waits for the network)."""
        if job.finished or job.cancel_requested_at is not None:
            return
        with self._send_lock:
            job.cancel_requested_at = time.monotonic()
            remote_id = job.outputs.get("remote")
        if remote_id is not None:
            self._in_background(self._cancel_remote, remote_id)
        elif not job.outputs.get("sending"):
            self._events.put(("error", job, CancelledError("Segmentation was cancelled; nothing was sent.")))
        # while it uploads, the sender sends the cancel as soon as the server has the job

    # ---- receiving --------------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> int:
        """Handle what the background threads received; call often (QTimer) or with a timeout."""
        handled = 0
        deadline = time.monotonic() + timeout
        while True:
            wait = max(0.0, deadline - time.monotonic()) if handled == 0 else 0.0
            try:
                kind, job, payload = self._events.get(timeout=wait) if wait > 0 else self._events.get_nowait()
            except queue.Empty:
                return handled
            handled += 1
            if job.finished:
                continue
            if kind == "event":
                self._on_event(job, payload)
            elif kind == "result":
                self._finish(job, result=payload)
            else:
                if job.cancel_requested_at is not None and not isinstance(payload, CancelledError):
                    payload = CancelledError("Segmentation was cancelled; nothing was written.")
                self._finish(job, error=payload)

    def _on_event(self, job: Job, event: dict) -> None:
        if event["event"] == "progress":
            job.state = "running"
            job.stage, job.done, job.total = event["stage"], event["done"], event["total"]
            job.elapsed, job.eta = event.get("elapsed", 0.0), event.get("eta")
        elif event["event"] == "running":
            job.state = "running"
        if job.on_progress:
            job.on_progress(job)

    def _finish(self, job: Job, result: SegmentationResult | None = None, error: BiomedSegError | None = None):
        if error is not None:
            job.error = error
            job.state = "cancelled" if isinstance(error, CancelledError) else "failed"
            if job.session is not None and (job.volume is not None or "is not open" in error.message):
                self.sessions.pop(job.session, None)  # the server's worker holds no image for it now
        else:
            job.result = result
            job.state = "done"
        self._jobs.pop(job.id, None)
        if job.on_done:
            job.on_done(job)

    # ---- blocking conveniences ----------------------------------------------------------------
    def wait(self, job: Job, timeout: float | None = None) -> SegmentationResult:
        return wait_for(self.poll, job, timeout)

    def run(self, volume: Volume, model: str, prompts, timeout: float | None = None, **kwargs) -> SegmentationResult:
        """Submit and wait (CLI). Ctrl-C cancels the job on the server before re-raising."""
        job = self.submit(volume, model, prompts, **kwargs)
        try:
            return self.wait(job, timeout)
        except KeyboardInterrupt:
            self.cancel(job)
            raise

    def request(self, op: str, timeout: float = 30.0, **fields) -> dict:
        """``ping``, ``status`` and ``unload``, as the local client answers them; and ``models``."""
        self.start()
        if op == "ping":
            return {"event": "pong", "server": self.url, "version": self.hello.get("version")}
        if op == "status":
            return {"event": "status", **self._call("GET", "/v1/status", timeout=timeout).json()}
        if op == "models":  # the server's catalogue and each model's state on the server machine
            return {"event": "models", **self._call("GET", "/v1/models", timeout=timeout).json()}
        if op == "unload":
            self._call("POST", "/v1/unload", timeout=timeout)
            return {"event": "unloaded"}
        raise InputError(f"'{op}' is not a request a server answers.")

    def echo(self, array: np.ndarray, threshold: float = 0) -> np.ndarray:
        """Send ``array`` (unless the server has it) and get ``array > threshold`` back as uint8, computed by the
        server's worker: the transport alone, as ``WorkerClient.echo`` checks the local one."""
        self.start()
        key = self._upload(np.ascontiguousarray(array))
        labels = self._receive("POST", f"/v1/echo/{key}", params={"threshold": threshold})
        if labels.shape != array.shape:
            raise ServerUnavailableError(f"The server's echo is {labels.shape}, not {array.shape}.")
        return labels

    def close_session(self, session: str, wait: bool = False) -> bool:
        """Drop a session here and on the server; whether this client had it open. The server is told on a
        background thread unless ``wait`` (then its own answer counts)."""
        known = self.sessions.pop(session, None) is not None
        if self.hello is None:
            return known
        path = f"/v1/sessions/{self._session_prefix}:{session}"
        if not wait:
            self._in_background(self._quietly, "DELETE", path)
            return known
        return bool(self._call("DELETE", path, timeout=30).json().get("found"))

    def _quietly(self, method: str, path: str) -> None:
        try:
            self._call(method, path, timeout=30)
        except BiomedSegError as exc:
            self.log.append(f"[client] {method} {path}: {exc}")

    def close(self) -> None:
        """Cancel this client's unfinished jobs and close its sessions on the server; stop the sender."""
        for job in list(self._jobs.values()):
            if not job.finished:
                self.cancel(job)
                self._finish(job, error=CancelledError("The client was closed before the job finished."))
        for session in list(self.sessions):
            self.close_session(session)
        self._outbox.put(None)


class _capped:
    """An upload body that stops (and says so) once it passes the server's request limit, instead of letting
    the server cut the connection mid-stream."""

    def __init__(self, pieces, limit: int | None):
        self.pieces, self.limit, self.sent, self.too_large = pieces, limit, 0, False

    def __iter__(self):
        for piece in self.pieces:
            self.sent += len(piece)
            if self.limit is not None and self.sent > self.limit:
                self.too_large = True
                raise OSError("the upload passed the server's request limit")
            yield piece


def _as_error(exc: BaseException, doing: str) -> BiomedSegError:
    if isinstance(exc, BiomedSegError):
        return exc
    return BiomedSegError(f"Internal error while {doing}: {type(exc).__name__}: {_short(exc)}",
                          hint="Nothing was written; please report it.")


def _short(exc) -> str:
    text = str(exc)
    return text if len(text) <= 160 else text[:160] + "..."
