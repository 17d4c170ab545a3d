"""Client side of the worker: start it, send jobs, poll for progress, cancel, recover.

Imports neither torch nor model code. Two threads only read the worker's pipes into a
queue / a log buffer; everything else -- callbacks included -- happens in ``poll()``,
on the caller's thread (the Slicer panel calls it from a QTimer, so no thread touches
Qt). ``run()`` is the blocking convenience for the CLI.

Handshake: nothing is sent to a new worker before its ``ready`` line says it runs this
engine's version and protocol; a stale worker (an older environment, another checkout) is
stopped and every waiting job fails with a ``WorkerMismatchError`` that says which side to
update. Failure handling: a worker that exits mid-job fails the job with its exit code and last
log lines, and the next request starts a fresh one; a worker whose heartbeat stops for
``hang_timeout`` (stopped, frozen), whose job sends nothing for ``stall_timeout`` (off by default:
a beating worker is computing, however long a step takes), or that does
not stop within ``cancel_grace`` of a cancel is killed with its children. Jobs that only waited
in its queue are sent again to the fresh worker. Shared-memory blocks belong to the client: reused from job to job (fresh pages
cost more than the copy), never in use by two jobs, and unlinked when the client closes.
"""
from __future__ import annotations

import atexit
import collections
import itertools
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..errors import (BiomedSegError, CancelledError, DependencyMissingError, InputError, WorkerCrashedError,
                      WorkerMismatchError, error_from_dict)
from ..geometry import Region
from ..prompts import MaskPrompt, prompt_to_dict, targets_of
from ..results import SegmentationResult
from ..volume import Volume
from . import protocol
from .jobs import Job, collect_result, wait_for

ENGINE_ROOT = Path(__file__).resolve().parents[2]  # folder that holds the biomedseg package
#: A worker whose heartbeat (every second) is missing this long is stopped or frozen: killed.
HANG_AFTER_S = 5.0
#: A running job that has not stopped this long after its cancel is stopped by killing the worker.
CANCEL_GRACE_S = 0.5
#: import name -> pip name, where they differ (for the "install it there" hint)
PIP_NAMES = {"SimpleITK": "SimpleITK", "yaml": "pyyaml", "PIL": "pillow", "nrrd": "pynrrd", "sklearn": "scikit-learn"}




class WorkerClient:
    def __init__(self, python: str | None = None, env: dict | None = None, startup_timeout: float = 120.0,
                 stall_timeout: float | None = None, cancel_grace: float = CANCEL_GRACE_S, log_lines: int = 200,
                 hang_timeout: float = HANG_AFTER_S):
        self.python = python or os.environ.get("BIOMEDSEG_WORKER_PYTHON") or sys.executable
        self.env = env
        self.startup_timeout = startup_timeout
        self.stall_timeout = stall_timeout
        self.hang_timeout = hang_timeout
        self.cancel_grace = cancel_grace
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.worker_pid: int | None = None
        self.log = collections.deque(maxlen=log_lines)
        self._events: queue.Queue = queue.Queue()
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._started_at = 0.0
        self._last_message_at = 0.0
        self._last_heard_at = 0.0
        self._write_lock = threading.Lock()
        self.pool = protocol.BlockPool()
        #: messages held until the worker's ready line passed the handshake
        self._pending: list[dict] = []
        self.mismatch: WorkerMismatchError | None = None
        #: why the last worker ended (a crash, or a package its Python lacks)
        self.last_death: BiomedSegError | None = None
        #: open interactive sessions: id -> image shape (the worker keeps the image)
        self.sessions: dict[str, tuple] = {}
        atexit.register(self.close)

    # ---- process lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        if self.alive:
            return
        protocol.sweep_stale_blocks()
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ENGINE_ROOT), env.get("PYTHONPATH")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["PYTHONSAFEPATH"] = "1"  # Python 3.11+: the current folder cannot shadow the engine on PYTHONPATH
        env["BIOMEDSEG_CLIENT_PID"] = str(os.getpid())  # the worker maps only this process's blocks
        self._events = queue.Queue()
        self.ready = False
        self._pending = []
        self.sessions = {}
        try:
            self.proc = subprocess.Popen([self.python, "-m", "biomedseg.worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                         start_new_session=True)
        except OSError as exc:
            raise WorkerCrashedError(f"The worker could not be started with '{self.python}' ({exc.strerror}).",
                                     hint="Choose a Python executable that has torch installed "
                                          "(--worker-python or BIOMEDSEG_WORKER_PYTHON).") from None
        self.worker_pid = self.proc.pid
        self._started_at = self._last_message_at = self._last_heard_at = time.monotonic()
        threading.Thread(target=self._read_stdout, args=(self.proc, self._events), daemon=True,
                         name="biomedseg-worker-out").start()
        threading.Thread(target=self._read_stderr, args=(self.proc,), daemon=True,
                         name="biomedseg-worker-log").start()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _read_stdout(self, proc, events):
        for line in proc.stdout:
            try:
                events.put(("message", protocol.decode(line)))
            except protocol.ProtocolError as exc:
                events.put(("garbage", str(exc)))
        events.put(("eof", None))

    def _read_stderr(self, proc):
        for line in proc.stderr:
            self.log.append(line.decode(errors="replace").rstrip())

    def _kill(self) -> None:
        """Kill the worker and every process it started."""
        if self.proc is None:
            return
        try:
            import psutil

            try:
                parent = psutil.Process(self.proc.pid)
                victims = parent.children(recursive=True) + [parent]
            except psutil.NoSuchProcess:
                victims = []
            for p in victims:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            self.proc.wait(timeout=5)  # our child: reaped at once
            # grandchildren are reaped by init; a zombie is as good as gone
            psutil.wait_procs([p for p in victims if p.pid != self.proc.pid and _running(p)], timeout=1)
        finally:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                try:
                    stream.close()
                except Exception:
                    pass
            self.proc = None
            self.ready = False
            self._pending = []
            self.sessions = {}  # the worker's images and embeddings are gone with it

    def close(self) -> None:
        """Stop the worker (politely, then by force) and release every block."""
        if self.proc is not None:
            try:
                self._send({"op": "shutdown"}, now=True)
                self.proc.wait(timeout=3)
            except Exception:
                pass
            self._kill()
        for job in list(self._jobs.values()):
            if not job.finished:
                self._finish(job, error=CancelledError("The worker was closed before the job finished."))
        self.pool.close()

    # ---- sending ------------------------------------------------------------------------
    def _send(self, message: dict, now: bool = False) -> None:
        """Write one line; held back until the handshake passed unless ``now``."""
        data = protocol.encode(message)
        if not (self.ready or now):
            self._pending.append(message)
            return
        with self._write_lock:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def _on_ready(self, msg: dict) -> None:
        problem = protocol.check_handshake(msg, __version__, str(ENGINE_ROOT), self.python)
        if problem is not None:
            self.mismatch = WorkerMismatchError(problem, hint="Nothing was sent to that worker; it was stopped.")
            self.log.append(f"[client] {problem}")
            self._kill()
            for job in list(self._jobs.values()):
                self._finish(job, error=self.mismatch)
            self._pending = []
            return
        self.mismatch = None
        self.ready = True
        pending, self._pending = self._pending, []
        for message in pending:
            self._send(message)

    def submit(self, volume: Volume | None, model: str, prompts, *, device: str = "auto",
               threshold: float | None = None, keep_largest: bool | None = None, fill_holes: bool | None = None,
               weights: str | None = None, options: dict | None = None, probabilities: bool = False,
               region: Region | None = None, session: str | None = None, free_text: bool = False,
               force: bool = False, on_progress: Callable | None = None, on_done: Callable | None = None) -> Job:
        """Queue a job; returns at once. Volume data (and mask prompts) are copied once into shared memory.

        ``prompts``: text, or typed prompts (``biomedseg.prompts``). ``session``: with a volume it
        opens an interactive session in the worker; without one it re-runs on the session's image.
        """
        from ..catalog import check_prompts, get_model

        prompts = check_prompts(model, prompts, free_text)
        if volume is None and session not in self.sessions:
            raise InputError("No image was given." if session is None else
                             f"Session '{session}' is not open here.", hint="Send the image to open it.")
        shape = tuple(volume.shape) if volume is not None else self.sessions[session]
        if self.mismatch is not None and not self.alive:
            self.mismatch = None  # the user may have fixed the environment: try a fresh worker
        self.start()
        targets = targets_of(prompts)
        job = Job(next(self._ids), model, prompts, volume, targets, session, on_progress=on_progress, on_done=on_done)
        try:
            message = {"op": "segment", "id": job.id, "model": model, "prompts": [],
                       "device": device, "threshold": threshold, "keep_largest": keep_largest,
                       "fill_holes": fill_holes, "weights": weights, "options": options or {},
                       "region": region.to_dict() if region is not None else None, "session": session,
                       "free_text": bool(free_text), "force": bool(force)}
            for p in prompts:
                entry = prompt_to_dict(p)
                if isinstance(p, MaskPrompt):
                    entry["mask"] = self._share(job, p.mask.astype(np.uint8))
                message["prompts"].append(entry)
            if volume is not None:
                meta = {str(k)[:64]: v[:4096] if isinstance(v, str) else v for k, v in volume.meta.items()
                        if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
                message.update({"name": str(volume.name)[:1000], "channels_last": volume.channels_last,
                                "input": self._share(job, volume.array),
                                "ijk_to_ras": volume.ijk_to_ras.ravel().tolist(),
                                "meta": dict(list(meta.items())[:64])})  # what the worker's schema allows
            # a model that returns no masks (labels, text) gets no mask block: nothing would be written there
            entry = get_model(model)
            masks = "masks" in entry.results
            # room for the masks a text answer grounds beyond the prompts (model.json ``phrase_masks``)
            out_shape = (len(targets) + int(entry.data.get("phrase_masks", 0)) if masks else 0,) + shape
            out_block = self.pool.acquire(int(np.prod(out_shape)))
            job.blocks.append(out_block)
            message["output"] = protocol.array_spec(out_block, out_shape, np.uint8)
            job.outputs["output"] = (out_block, out_shape, np.uint8)
            if probabilities:
                prob_block = self.pool.acquire(int(np.prod(out_shape)) * 4)
                job.blocks.append(prob_block)
                message["probabilities"] = protocol.array_spec(prob_block, out_shape, np.float32)
                job.outputs["probabilities"] = (prob_block, out_shape, np.float32)
            if session is not None:  # kept while the job is queued (so clicks can follow); dropped if it fails
                self.sessions[session] = shape
            job.message = message
            self._jobs[job.id] = job
            self._send(message)
        except BaseException:
            self._jobs.pop(job.id, None)
            self._recycle(job.blocks)
            raise
        return job

    def _share(self, job: Job, array: np.ndarray) -> dict:
        """Copy ``array`` into a pooled block owned by ``job``; its description for the message."""
        array = np.ascontiguousarray(array)
        block = self.pool.acquire(array.nbytes)
        job.blocks.append(block)
        np.ndarray(array.shape, array.dtype, buffer=block.buf)[...] = array
        return protocol.array_spec(block, array.shape, array.dtype)

    def close_session(self, session: str) -> bool:
        """Drop an interactive session in the worker (its image and embedding)."""
        known = self.sessions.pop(session, None) is not None
        if self.alive:
            return bool(self.request("close_session", session=session).get("found"))
        return known

    def cancel(self, job: Job) -> None:
        """Ask the worker to stop the job; if it has not stopped within ``cancel_grace``, kill it."""
        if job.finished or job.cancel_requested_at is not None:
            return
        job.cancel_requested_at = time.monotonic()
        held = [m for m in self._pending if m.get("id") == job.id]
        if held:  # never sent: the worker is still starting
            self._pending = [m for m in self._pending if m.get("id") != job.id]
            self._finish(job, error=CancelledError("Segmentation was cancelled; nothing was written."))
            return
        if self.alive:
            try:
                self._send({"op": "cancel", "target": job.id})
            except OSError:
                pass

    # ---- receiving ------------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> int:
        """Handle everything the worker said; returns how many events were handled.

        Call it often (QTimer) or with a timeout to wait for the next event.
        """
        handled = 0
        deadline = time.monotonic() + timeout
        while True:
            wait = max(0.0, deadline - time.monotonic()) if handled == 0 else 0.0
            try:
                kind, payload = self._events.get(timeout=wait) if wait > 0 else self._events.get_nowait()
            except queue.Empty:
                break
            handled += 1
            self._last_heard_at = time.monotonic()
            if not (kind == "message" and payload.get("event") == "heartbeat"):
                self._last_message_at = self._last_heard_at
            if kind == "message":
                self._handle(payload)
            elif kind == "garbage":
                self.log.append(f"[client] unreadable line from worker: {payload}")
            elif kind == "eof":
                self._worker_died()
        self._watchdog()
        return handled

    def _handle(self, msg: dict) -> None:
        event = msg.get("event")
        if event == "heartbeat":
            return
        if event == "ready":
            self._on_ready(msg)
            return
        job = self._jobs.get(msg.get("id"))
        if event == "cancel_ack":
            target = self._jobs.get(msg.get("target"))
            if target is not None:
                target.cancel_acknowledged = True
                if msg.get("queued") and not target.finished:  # it never started and never will: end it now
                    self._finish(target, error=CancelledError("Segmentation was cancelled before it started; "
                                                              "nothing was written."))
            return
        if job is None:
            if event == "error":
                self.log.append(f"[client] worker error without a job: {msg.get('error')}")
            return
        if event == "started":
            job.state = "running"
            return
        if event in ("queued", "progress"):
            if event == "progress":
                job.state = "running"
                job.stage, job.done, job.total = msg["stage"], msg["done"], msg["total"]
                job.elapsed, job.eta = msg.get("elapsed", 0.0), msg.get("eta")
            if job.on_progress:
                job.on_progress(job)
        elif event == "result":
            try:
                result = collect_result(job, msg)
            except Exception as exc:  # a malformed result must end the job, never leave it "running"
                self._finish(job, error=BiomedSegError(f"The worker's result could not be read ({exc}).",
                                                       hint="See the worker log; please report it."))
                return
            self._finish(job, result=result)
        elif event == "error":
            error = error_from_dict(msg.get("error") or {})
            if job.session is not None and (job.volume is not None or "is not open" in error.message):
                self.sessions.pop(job.session, None)  # the worker holds no image for it now
            self._finish(job, error=error)

    def _recycle(self, blocks: list) -> None:
        """Blocks the worker is done with go back to the pool; trimmed ones are forgotten there too."""
        removed = []
        for block in blocks:
            removed += self.pool.give_back(block)
        blocks.clear()
        if removed and self.alive:
            try:
                self._send({"op": "forget", "blocks": removed})
            except OSError:
                pass

    def _finish(self, job: Job, result: SegmentationResult | None = None, error: BiomedSegError | None = None):
        self._recycle(job.blocks)
        job.outputs.clear()
        if error is not None:
            job.error = error
            job.state = "cancelled" if isinstance(error, CancelledError) else "failed"
        else:
            job.result = result
            job.state = "done"
        self._jobs.pop(job.id, None)
        if job.on_done:
            job.on_done(job)

    def _worker_died(self) -> None:
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
        time.sleep(0.05)  # let the log reader catch the last lines
        tail = "\n".join(list(self.log)[-10:])
        was_ready = self.ready
        self._kill()
        crash = WorkerCrashedError(f"The worker process stopped unexpectedly (exit code {code}).",
                                   hint=f"The next request starts a new worker. Last log lines:\n{tail}" if tail
                                   else "The next request starts a new worker.")
        missing = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", tail) if not was_ready else None
        if missing:  # the worker's Python cannot even import the engine
            package = missing.group(1).split(".")[0]
            crash = DependencyMissingError(
                f"The worker Python '{self.python}' cannot start the engine: it lacks the package '{package}'.",
                hint=f"Install it there ({self.python} -m pip install {PIP_NAMES.get(package, package)}), or choose "
                     "another worker Python.")
        self.last_death = crash
        waiting = []
        for job in list(self._jobs.values()):
            if job.cancel_requested_at is not None:
                self._finish(job, error=CancelledError("Segmentation was cancelled; nothing was written."))
            elif job.state == "running" or not was_ready:  # a worker that never started would fail again
                self._finish(job, error=crash)
            else:
                waiting.append(job)
        self._resubmit(waiting)  # jobs that only waited behind it did not crash anything

    def _watchdog(self) -> None:
        """Kill a worker that hangs: silent too long, not ready in time, or ignoring a cancel."""
        if self.proc is None:
            return
        now = time.monotonic()
        active = [j for j in self._jobs.values() if not j.finished]
        reason = None
        if not self.ready and now - self._started_at > self.startup_timeout:
            reason = f"did not start within {self.startup_timeout:.0f} s"
        elif self.ready and now - self._last_heard_at > self.hang_timeout:
            reason = f"stopped answering (no heartbeat for {self.hang_timeout:.0f} s: stopped or frozen)"
        elif active and self.stall_timeout is not None and now - self._last_message_at > self.stall_timeout:
            reason = f"stopped answering for {self.stall_timeout:.0f} s"
        for job in active:  # a queued job's cancel waits for its turn (the worker skips it); a running one may not
            if (job.state == "running" and job.cancel_requested_at is not None
                    and now - job.cancel_requested_at > self.cancel_grace):
                self._kill()
                self._finish(job, error=CancelledError(
                    "Segmentation was cancelled (the worker was stopped to cancel it); nothing was written."))
                self._resubmit([j for j in active if j is not job])
                return
        if reason:
            tail = "\n".join(list(self.log)[-10:])
            was_ready = self.ready
            self._kill()
            for job in active:
                if job.state == "running" or not was_ready:
                    self._finish(job, error=WorkerCrashedError(f"The worker {reason} and was stopped.",
                                                               hint=f"The next request starts a new worker. {tail}"))
            self._resubmit([j for j in active if not j.finished])

    def _resubmit(self, jobs: list) -> None:
        """Send the jobs that were only queued in a worker that had to be stopped to a fresh one, in
        order; those already cancelled end as cancelled. Their blocks still hold their data. A click in
        a session goes again only when an earlier job in the queue brings its image back."""
        waiting, reopened = [], {}
        for job in sorted(jobs, key=lambda j: j.id):
            if job.cancel_requested_at is not None:
                self._finish(job, error=CancelledError("Segmentation was cancelled; nothing was written."))
            elif job.session is not None and job.volume is None and job.session not in reopened:
                self._finish(job, error=InputError(f"Session '{job.session}' ended with the worker.",
                                                   hint="Send the image again to open it."))
            else:
                if job.session is not None and job.volume is not None:
                    reopened[job.session] = tuple(job.outputs["output"][1][1:])
                waiting.append(job)
        if not waiting:
            return
        self.start()
        self.sessions.update(reopened)
        for job in waiting:
            job.state = "queued"
            self._send(job.message)

    # ---- blocking conveniences -------------------------------------------------------------
    def wait(self, job: Job, timeout: float | None = None) -> SegmentationResult:
        return wait_for(self.poll, job, timeout)

    def run(self, volume: Volume, model: str, prompts: list[str], timeout: float | None = None,
            **kwargs) -> SegmentationResult:
        """Submit and wait (CLI). Ctrl-C cancels the job before re-raising."""
        job = self.submit(volume, model, prompts, **kwargs)
        try:
            return self.wait(job, timeout)
        except KeyboardInterrupt:
            self.cancel(job)
            try:
                self.wait(job, timeout=self.cancel_grace + 2)
            except BiomedSegError:
                pass
            raise

    def echo(self, array: np.ndarray, threshold: float = 0) -> np.ndarray:
        """Send ``array`` to the worker and get ``array > threshold`` back as uint8 (transport check)."""
        array = np.ascontiguousarray(array)
        self.start()
        blocks = [self.pool.acquire(array.nbytes), self.pool.acquire(array.size)]
        try:
            np.ndarray(array.shape, array.dtype, buffer=blocks[0].buf)[...] = array
            reply = self.request("echo", input=protocol.array_spec(blocks[0], array.shape, array.dtype),
                                 output=protocol.array_spec(blocks[1], array.shape, np.uint8), threshold=threshold)
            if reply.get("event") == "error":
                raise error_from_dict(reply["error"])
            return np.ndarray(array.shape, np.uint8, buffer=blocks[1].buf).copy()
        finally:
            self._recycle(blocks)

    def request(self, op: str, timeout: float = 30.0, **fields) -> dict:
        """Small synchronous requests (ping, status, unload)."""
        self.start()
        rid = f"{op}-{next(self._ids)}"
        self._send({"op": op, "id": rid, **fields})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                kind, payload = self._events.get(timeout=0.1)
            except queue.Empty:
                continue
            self._last_heard_at = time.monotonic()
            if kind == "message" and payload.get("id") == rid:
                return payload
            if kind == "message" and payload.get("event") == "ready":
                self._handle(payload)
                if self.mismatch is not None:
                    raise self.mismatch
                continue
            if kind == "eof":
                self._worker_died()
                if isinstance(self.last_death, DependencyMissingError):
                    raise self.last_death
                raise WorkerCrashedError(f"The worker exited while answering '{op}'.", hint=self.last_death.hint)
            if kind == "message":
                self._handle(payload)
        raise TimeoutError(f"worker did not answer '{op}' within {timeout} s")


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


_shared_client: WorkerClient | None = None


def shared_client(**kwargs) -> WorkerClient:
    """One client per process (the panel and the CLI share the warm worker)."""
    global _shared_client
    if _shared_client is None:
        _shared_client = WorkerClient(**kwargs)
    return _shared_client


__all__ = ["Job", "WorkerClient", "shared_client"]
