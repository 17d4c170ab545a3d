"""The server's side of the worker: one local ``WorkerClient`` shared by every remote client.

Requests from any number of HTTP clients become jobs of the one warm worker, in the order they
arrive (the worker runs one at a time), so models and BiomedParse's feature cache stay loaded
across requests and clients. ``WorkerClient`` is not thread-safe: every call into it holds
``lock``, and one pump thread polls it and turns its callbacks into each job's event list,
which the event streams read. Volumes live in a content-addressed store, so a volume a client
sent once is not sent again. Finished jobs keep their result until fetched and deleted, or
until they are among the oldest beyond ``KEEP_FINISHED``.
"""
from __future__ import annotations

import collections
import secrets
import shutil
import sys
import threading
import time
import traceback

import numpy as np

from ..errors import BiomedSegError, InputError
from ..prompts import prompt_from_dict
from ..results import jsonable
from ..volume import Volume
from ..worker.client import WorkerClient
from ..worker.jobs import result_fields

#: Finished jobs whose results are kept for their clients to fetch (the newest, and for so long).
KEEP_FINISHED = 64
KEEP_FINISHED_S = 900.0
#: Jobs that may wait or run at once; more are refused (the server is busy), so no client fills its memory.
MAX_OPEN_JOBS = 256
#: A job whose event stream closed before it finished is cancelled unless a stream returns this soon.
ABANDONED_AFTER_S = 10.0


class ArrayStore:
    """Arrays by content id, least recently used dropped beyond ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.lock = threading.Lock()

    def put(self, key: str, array: np.ndarray) -> None:
        with self.lock:
            self.items[key] = array
            self.items.move_to_end(key)
            while len(self.items) > 1 and sum(a.nbytes for a in self.items.values()) > self.max_bytes:
                self.items.popitem(last=False)

    def get(self, key: str) -> np.ndarray:
        with self.lock:
            array = self.items.get(key)
            if array is None:
                raise KeyError(key)
            self.items.move_to_end(key)
            return array

    def __contains__(self, key: str) -> bool:
        with self.lock:
            return key in self.items


class RemoteJob:
    """A job as the server tracks it: the local job, its events for the streams, its result."""

    def __init__(self, job_id: str, shape: tuple):
        self.id = job_id
        self.shape = shape
        self.job = None
        self.events: list[dict] = []
        self.finished_at: float | None = None
        self.watchers = 0
        self.unwatched_at: float | None = None
        self.packed: dict[str, np.ndarray] = {}  # the result's stacked arrays, made on first download
        self.pack_lock = threading.Lock()
        self.watch_lock = threading.Lock()

    def add(self, event: dict) -> None:
        self.events.append(jsonable(event))


class Relay:
    def __init__(self, worker_python: str | None = None, store_bytes: int = 8 << 30, max_array_bytes: int = 4 << 30):
        self.client = WorkerClient(python=worker_python)
        self.lock = threading.RLock()
        self.store = ArrayStore(store_bytes)
        self.max_array_bytes = max_array_bytes
        self.jobs: dict[str, RemoteJob] = {}
        self._worker_status: dict = {}
        self.running = True
        self.pump = threading.Thread(target=self._pump, name="biomedseg-relay", daemon=True)
        self.pump.start()

    # ---- the pump ---------------------------------------------------------------------
    def _pump(self) -> None:
        """Poll the worker client for ever; an error in one round is logged and the next round goes on (a
        dead pump would leave every stream waiting for events that never come)."""
        while self.running:
            handled = 0
            try:
                with self.lock:
                    handled = self.client.poll(0.0)
                    self._cancel_abandoned()
            except Exception:  # noqa: BLE001 -- the client fails its own jobs; the pump must outlive any one
                traceback.print_exc(file=sys.stderr)
                time.sleep(0.2)
            if not handled:
                time.sleep(0.01)

    def _cancel_abandoned(self) -> None:
        now = time.monotonic()
        for rjob in list(self.jobs.values()):
            if (rjob.job is not None and not rjob.job.finished and rjob.watchers == 0
                    and rjob.unwatched_at is not None and now - rjob.unwatched_at > ABANDONED_AFTER_S):
                rjob.unwatched_at = None
                self.client.cancel(rjob.job)

    def _on_progress(self, rjob: RemoteJob, job) -> None:
        if job.state == "running" and job.total:
            rjob.add({"event": "progress", "stage": job.stage, "done": job.done, "total": job.total,
                      "elapsed": job.elapsed, "eta": job.eta})
        else:
            rjob.add({"event": job.state})

    def _on_done(self, rjob: RemoteJob, job) -> None:
        rjob.finished_at = time.monotonic()
        job.volume, job.prompts, job.message = None, [], {}  # the store decides how long a volume stays
        if job.error is not None:
            rjob.add({"event": "error", "error": job.error.to_dict()})
        else:
            result = job.result
            rjob.add({"event": "result", **result_fields(result, [s.name for s in result.segments].index),
                      "probability_targets": sorted(result.probabilities, key=job.targets.index),
                      "seconds": result.seconds, "mask_shape": [len(result.segments), *rjob.shape]})
        self._trim()

    def _trim(self) -> None:
        """Finished jobs beyond the newest ``KEEP_FINISHED``, or older than ``KEEP_FINISHED_S``, go."""
        now = time.monotonic()
        finished = sorted((r for r in self.jobs.values() if r.finished_at is not None), key=lambda r: r.finished_at)
        for i, rjob in enumerate(finished):
            if i < len(finished) - KEEP_FINISHED or now - rjob.finished_at > KEEP_FINISHED_S:
                self.jobs.pop(rjob.id, None)

    # ---- requests -----------------------------------------------------------------------
    def submit(self, request: dict) -> RemoteJob:
        """Queue the job a checked request (``schema.check_job``) describes; its arrays must be in the store."""
        refuse_paths(request)
        volume = None
        spec = request.get("volume")
        if spec is not None:
            array = self._array(spec["array"])
            volume = Volume(array, np.asarray(spec["ijk_to_ras"], dtype=np.float64).reshape(4, 4),
                            name=str(spec.get("name", "")), meta=dict(spec.get("meta") or {}),
                            channels_last=bool(spec.get("channels_last", False)))
        prompts = []
        for item in request["prompts"]:
            mask = self._array(item["mask"]["array"]) if isinstance(item, dict) and "mask" in item else None
            prompts.append(item if isinstance(item, str) else prompt_from_dict(item, mask))
        options = {k: request.get(k) for k in ("device", "threshold", "keep_largest", "fill_holes", "weights",
                                               "options", "session", "free_text", "force")}
        options["device"] = options["device"] or "auto"
        options["free_text"], options["force"] = bool(options["free_text"]), bool(options["force"])
        from ..geometry import Region

        region = Region.from_dict(request["region"]) if request.get("region") else None
        with self.lock:
            if sum(1 for r in self.jobs.values() if r.finished_at is None) >= MAX_OPEN_JOBS:
                raise BusyError(f"The server has {MAX_OPEN_JOBS} jobs waiting or running.", hint="Try again later.")
            shape = volume.shape if volume is not None else self.client.sessions.get(options["session"])
            if shape is not None:
                check_shared_memory(volume, len(prompts), shape, bool(request.get("probabilities")))
            rjob = RemoteJob(secrets.token_hex(8), tuple(shape) if shape is not None else ())
            job = self.client.submit(volume, request["model"], prompts, region=region,
                                     probabilities=bool(request.get("probabilities")),
                                     on_progress=lambda j: self._on_progress(rjob, j),
                                     on_done=lambda j: self._on_done(rjob, j), **options)
            rjob.job = job
            rjob.unwatched_at = time.monotonic()  # a client that never follows its job abandons it too
            rjob.add({"event": "queued", "position": sum(1 for r in self.jobs.values()
                                                         if r.job is not None and not r.job.finished)})
            self.jobs[rjob.id] = rjob
        return rjob

    def _array(self, key: str) -> np.ndarray:
        try:
            return self.store.get(key)
        except KeyError:
            raise InputError(f"Array {key[:12]}... is not on the server.", hint="Upload it first.") from None

    def get(self, job_id: str) -> RemoteJob:
        with self.lock:
            rjob = self.jobs.get(job_id)
        if rjob is None:
            raise KeyError(job_id)
        return rjob

    def cancel(self, rjob: RemoteJob) -> None:
        with self.lock:
            if rjob.job is not None and not rjob.job.finished:
                self.client.cancel(rjob.job)

    def watch(self, rjob: RemoteJob, delta: int) -> None:
        """Count the job's open event streams (on the event loop: no waiting for the relay's lock)."""
        with rjob.watch_lock:
            rjob.watchers += delta
            rjob.unwatched_at = time.monotonic() if rjob.watchers == 0 else None

    def result_array(self, rjob: RemoteJob, what: str) -> np.ndarray:
        """A finished job's masks (one uint8 slot per segment) or probabilities (float32, in
        ``probability_targets`` order), stacked once."""
        job = rjob.job
        if job is None or not job.finished or job.result is None:
            raise InputError("The job has no result (yet).", hint="Wait for its result event.")
        with rjob.pack_lock:
            if what not in rjob.packed:
                result = job.result
                if what == "masks":
                    array = np.zeros((len(result.segments), *rjob.shape), np.uint8)
                    for i, segment in enumerate(result.segments):
                        array[i] = segment.mask
                else:
                    names = sorted(result.probabilities, key=job.targets.index)
                    array = np.stack([result.probabilities[n] for n in names]).astype(np.float32, copy=False) \
                        if names else np.zeros((0, *rjob.shape), np.float32)
                rjob.packed[what] = array
            return rjob.packed[what]

    def echo(self, key: str, threshold: float) -> np.ndarray:
        """Transport check: ``array > threshold`` computed by the worker through shared memory, packed: the
        whole remote path with a trivial computation (``bench/remote.py``, a user's doctor run). Refused
        while jobs are open: the worker would answer only after them, and nothing may wait that long here."""
        array = self._array(key)
        with self.lock:
            self._refuse_if_busy("a transfer check")
            return self.client.echo(array, threshold)

    def _busy(self) -> bool:
        return any(not j.finished for j in self.client._jobs.values()) or (self.client.alive and not self.client.ready)

    def _refuse_if_busy(self, what: str) -> None:
        if self._busy():
            raise BusyError(f"The server's worker is busy with jobs; {what} waits for none.",
                            hint="Try again when the queue is empty (GET /v1/status).")

    def forget(self, job_id: str) -> None:
        with self.lock:
            rjob = self.jobs.pop(job_id, None)
            if rjob is not None and rjob.job is not None and not rjob.job.finished:
                self.client.cancel(rjob.job)

    def status(self) -> dict:
        with self.lock:
            waiting = [r for r in self.jobs.values() if r.job is not None and not r.job.finished]
            if self.client.alive and not self._busy():  # a busy worker answers only after its jobs: what it said last
                self._worker_status = self.client.request("status", timeout=10)
            worker = self._worker_status if self.client.alive else {}
        return {"queued": sum(1 for r in waiting if r.job.state == "queued"),
                "running": sum(1 for r in waiting if r.job.state == "running"),
                "warm": worker.get("warm", []), "sessions": worker.get("sessions", []),
                "worker_pid": self.client.worker_pid if self.client.alive else None,
                "stored_arrays": len(self.store.items)}

    def unload(self) -> None:
        with self.lock:
            if self.client.alive:
                self._refuse_if_busy("unloading")
                self.client.request("unload", timeout=60)
                self.client.sessions = {}  # the worker closed every session with its models

    def close_session(self, session: str) -> bool:
        with self.lock:
            return self.client.close_session(session)

    def close(self) -> None:
        """Cancel what is left, stop the worker, release every shared-memory block."""
        self.running = False
        self.pump.join(timeout=2)
        with self.lock:
            self.client.close()  # unfinished jobs end as cancelled: their streams say so


def refuse_paths(request: dict) -> None:
    """No path a client sends is opened here: not ``weights``, not an option the model declares as a path.
    The server's weights are its own (its catalogue sources, $BIOMEDSEG_WEIGHTS_DIR there)."""
    from ..catalog import get_model

    if request.get("weights"):
        raise InputError("A server does not open files a client names: --weights cannot be sent to it.",
                         hint="Put the checkpoint on the server machine ($BIOMEDSEG_WEIGHTS_DIR there), or run "
                              "locally.")
    declared = get_model(request["model"]).options
    paths = [k for k in (request.get("options") or {}) if (declared.get(k) or {}).get("type") == "path"]
    if paths:
        raise InputError(f"A server does not open files a client names: option {', '.join(map(repr, paths))} "
                         "is a path.", hint="Put the file on the server machine, or run locally.")


class BusyError(BiomedSegError):
    """The server cannot take this now (its queue is full, its worker busy); the request may be sent again."""

    kind = "busy"


def check_shared_memory(volume, n_prompts: int, shape, probabilities: bool) -> None:
    """Refuse a job whose blocks would not fit in /dev/shm: writing past a full tmpfs kills the process
    (SIGBUS) instead of raising an error."""
    voxels = int(np.prod(shape))
    need = (volume.array.nbytes if volume is not None else 0) + voxels * (n_prompts + 4) * (5 if probabilities else 1)
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return  # no /dev/shm (not Linux): the OS pages shared memory like any other
    if need > free:
        raise BusyError(f"The server has {free / 2**20:.0f} MiB of shared memory free; this job needs about "
                        f"{need / 2**20:.0f} MiB.", hint="Try again when other jobs are done, or send a smaller region.")

