"""The worker process: runs models for one client, one job at a time, and stays warm.

Started as ``python -m biomedseg.worker`` with any Python that has torch. It reads JSON
lines on stdin and answers on the original stdout; anything a library prints goes to
stderr instead, so it cannot corrupt the protocol. A reader thread answers ``ping`` and
``cancel`` at once even while a job runs; jobs queue and run in order on the main
thread. When stdin closes (the client went away) the worker exits.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import traceback

from .. import __version__
from ..errors import BiomedSegError, CancelledError, InputError, OutOfMemoryError
from . import protocol

log = logging.getLogger("biomedseg.worker")

PROGRESS_INTERVAL_S = 0.1


class WorkerServer:
    def __init__(self, infile, outfile):
        self.infile = infile
        self.outfile = outfile
        self.write_lock = threading.Lock()
        self.jobs: queue.Queue = queue.Queue()
        self.cancel_flags: dict = {}
        self.flags_lock = threading.Lock()
        self.attached = protocol.AttachedBlocks()

    # ---- sending ----------------------------------------------------------------------
    def send(self, message: dict) -> None:
        data = protocol.encode(message)
        with self.write_lock:
            self.outfile.write(data)
            self.outfile.flush()

    def send_error(self, job_id, err: BiomedSegError) -> None:
        self.send({"id": job_id, "event": "error", "error": err.to_dict()})

    # ---- reading (own thread) -----------------------------------------------------------
    def _read_lines(self):
        while True:
            line = self.infile.readline(protocol.MAX_MESSAGE_BYTES + 1)
            if not line:
                return
            if not line.endswith(b"\n") and len(line) > protocol.MAX_MESSAGE_BYTES:
                while True:  # drop the rest of the oversized line
                    rest = self.infile.readline(protocol.MAX_MESSAGE_BYTES)
                    if not rest or rest.endswith(b"\n"):
                        break
                yield None
                continue
            if line.strip():
                yield line

    def reader(self) -> None:
        for line in self._read_lines():
            job_id = None
            try:
                if line is None:
                    raise protocol.ProtocolError(
                        f"message exceeds the {protocol.MAX_MESSAGE_BYTES}-byte limit; voxels go through shared memory")
                message = protocol.decode(line)
                job_id = message.get("id")
                self.dispatch(message)
            except protocol.ProtocolError as exc:
                self.send_error(job_id, InputError(f"Rejected request: {exc}."))
        self.jobs.put({"op": "shutdown"})

    def dispatch(self, message: dict) -> None:
        op = message.get("op")
        job_id = message.get("id")
        if op == "ping":
            self.send({"id": job_id, "event": "pong", "pid": os.getpid(), "busy": bool(self.cancel_flags)})
        elif op == "cancel":
            with self.flags_lock:
                flag = self.cancel_flags.get(message.get("target"))
            if flag is not None:
                flag.set()
            self.send({"id": job_id, "event": "cancel_ack", "target": message.get("target"),
                       "found": flag is not None})
        elif op in ("segment", "unload", "status", "shutdown", "echo", "echo_file", "forget"):
            if op == "segment":
                if not isinstance(job_id, (int, str)):
                    raise protocol.ProtocolError("a segment request needs an 'id'")
                with self.flags_lock:
                    self.cancel_flags[job_id] = threading.Event()
                self.send({"id": job_id, "event": "queued", "position": self.jobs.qsize()})
            self.jobs.put(message)
        else:
            raise protocol.ProtocolError(f"unknown op {op!r}")

    # ---- running (main thread) ----------------------------------------------------------
    def serve(self) -> None:
        self.send({"event": "ready", "pid": os.getpid(), "python": sys.executable, "version": __version__})
        threading.Thread(target=self.reader, name="biomedseg-reader", daemon=True).start()
        while True:
            message = self.jobs.get()
            op = message.get("op")
            if op == "shutdown":
                return
            try:
                if op == "segment":
                    self.run_segment(message)
                elif op == "unload":
                    from ..inference.runner import unload_all

                    unload_all()
                    self.send({"id": message.get("id"), "event": "unloaded"})
                elif op == "forget":  # the client unlinked these blocks
                    self.attached.forget([n for n in message.get("blocks", []) if isinstance(n, str)])
                elif op in ("echo", "echo_file"):
                    self.run_echo(message)
                elif op == "status":
                    from ..inference.runner import warm_models

                    self.send({"id": message.get("id"), "event": "status", "warm": warm_models()})
            finally:
                with self.flags_lock:
                    self.cancel_flags.pop(message.get("id"), None)

    def run_segment(self, message: dict) -> None:
        job_id = message["id"]
        flag = self.cancel_flags.get(job_id) or threading.Event()
        started = time.monotonic()
        try:
            volume, outputs = self._open_job(message)
            last = [0.0]

            def progress(stage, done, total):
                now = time.monotonic()
                if done not in (0, total) and now - last[0] < PROGRESS_INTERVAL_S:
                    return
                last[0] = now
                elapsed = now - started
                eta = elapsed / done * (total - done) if done else None
                self.send({"id": job_id, "event": "progress", "stage": stage, "done": done, "total": total,
                           "elapsed": round(elapsed, 3), "eta": None if eta is None else round(eta, 3)})

            result = self._segment_with_oom_retry(message, volume, progress, flag.is_set)
            if flag.is_set():
                raise CancelledError("Segmentation was cancelled; nothing was written.")
            self._write_outputs(message, result, outputs)
            self.send({"id": job_id, "event": "result", "segments": [
                {"name": s.name, "index": message["prompts"].index(s.name), "color": list(s.color),
                 "terminology": s.terminology, "label": s.label} for s in result.segments],
                "absent": result.absent, "device": result.device, "device_reason": result.device_reason,
                "seconds": round(time.monotonic() - started, 3)})
        except BiomedSegError as err:
            self.send_error(job_id, err)
        except protocol.ProtocolError as exc:
            self.send_error(job_id, InputError(f"Rejected request: {exc}."))
        except Exception as exc:  # report, keep serving
            traceback.print_exc(file=sys.stderr)
            self.send_error(job_id, BiomedSegError(f"Internal error in the worker: {type(exc).__name__}: {exc}",
                                                   hint="See the worker log; please report it."))
        finally:
            outputs = volume = None

    def run_echo(self, message: dict) -> None:
        """Transport check: labelmap = input > threshold, through shared memory or files.

        Lets ``bench/transport.py`` (and a user's doctor run) time the process boundary
        alone, with the same trivial computation in every variant.
        """
        job_id = message.get("id")
        threshold = float(message.get("threshold", 0))
        try:
            if message["op"] == "echo_file":
                import nibabel as nib
                import numpy as np

                img = nib.load(message["input_path"])
                labels = (np.asanyarray(img.dataobj) > threshold).astype(np.uint8)
                nib.save(nib.Nifti1Image(labels, img.affine), message["output_path"])
            else:
                import numpy as np

                source = protocol.view(self.attached.get(message["input"]["shm"]), message["input"])
                target = protocol.view(self.attached.get(message["output"]["shm"]), message["output"])
                if target.shape != source.shape or target.dtype.name != "uint8":
                    raise protocol.ProtocolError("echo output must be uint8 with the input's shape")
                np.greater(source, threshold, out=target.view(bool))
                del source, target
            self.send({"id": job_id, "event": "echoed"})
        except FileNotFoundError as exc:
            self.send_error(job_id, InputError(f"Rejected echo request: shared-memory block not found ({exc})."))
        except (KeyError, OSError, protocol.ProtocolError) as exc:
            self.send_error(job_id, InputError(f"Rejected echo request: {exc}."))

    def _open_job(self, message):
        import numpy as np

        from ..volume import Volume

        for key in ("model", "prompts", "input", "ijk_to_ras", "output"):
            if key not in message:
                raise protocol.ProtocolError(f"segment request lacks '{key}'")
        prompts = message["prompts"]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise protocol.ProtocolError("'prompts' must be a list of strings")
        from ..catalog import check_prompts

        prompts = message["prompts"] = check_prompts(str(message["model"]), prompts)
        try:
            array = protocol.view(self.attached.get(message["input"]["shm"]), message["input"])
            volume = Volume(array, np.asarray(message["ijk_to_ras"], dtype=np.float64).reshape(4, 4),
                            name=str(message.get("name", "")), meta=dict(message.get("meta") or {}),
                            channels_last=bool(message.get("channels_last", False)))
            outputs = {}
            for key in ("output", "probabilities"):
                spec = message.get(key)
                if spec is None:
                    continue
                dtype, shape = protocol.check_spec(spec)
                if shape != (len(prompts),) + volume.shape:
                    raise protocol.ProtocolError(f"'{key}' must have shape {[len(prompts), *volume.shape]}, got {list(shape)}")
                outputs[key] = protocol.view(self.attached.get(spec["shm"]), spec)
            return volume, outputs
        except FileNotFoundError as exc:
            raise protocol.ProtocolError(f"shared-memory block not found ({exc})") from None

    def _segment_with_oom_retry(self, message, volume, progress, cancelled):
        from ..inference.runner import segment

        options = dict(message.get("options") or {})
        kwargs = {k: message[k] for k in ("device", "threshold", "keep_largest", "fill_holes", "weights")
                  if message.get(k) is not None}
        want_probs = message.get("probabilities") is not None
        for attempt in (1, 2):
            try:
                return segment(volume, message["model"], message["prompts"], progress=progress, cancelled=cancelled,
                               keep_probabilities=want_probs, options=options, **kwargs)
            except Exception as exc:  # torch's OOM types differ by device; match them by name/text
                if not _is_oom(exc):
                    raise
                _free_device_memory()
                batch = int(options.get("batch_size", 1))
                if attempt == 1 and batch > 1:
                    options["batch_size"] = batch // 2
                    progress(f"out of memory: retrying with batch size {batch // 2}", 0, 1)
                    continue
                raise OutOfMemoryError(
                    f"The model ran out of memory on {kwargs.get('device', 'auto')} "
                    f"(batch size {batch}{', after halving it' if attempt == 2 else ''}).",
                    hint="Close other GPU programs, choose a smaller slice range or ROI, or use --device cpu.") from None

    @staticmethod
    def _write_outputs(message, result, outputs):
        masks = outputs.get("output")
        if masks is not None:
            masks[...] = 0
            for seg in result.segments:
                masks[message["prompts"].index(seg.name)] = seg.mask
        probs = outputs.get("probabilities")
        if probs is not None:
            for i, prompt in enumerate(message["prompts"]):
                if prompt in result.probabilities:
                    probs[i] = result.probabilities[prompt]


def _is_oom(exc: Exception) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _free_device_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def main(argv=None) -> int:
    logging.basicConfig(level=os.environ.get("BIOMEDSEG_LOG", "INFO"), stream=sys.stderr,
                        format="%(asctime)s worker %(levelname)s %(message)s")
    # Keep the protocol channel private: library prints land on stderr.
    proto_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    outfile = os.fdopen(proto_fd, "wb", buffering=0)
    server = WorkerServer(sys.stdin.buffer, outfile)
    try:
        server.serve()
    except BrokenPipeError:
        pass  # the client is gone
    # The reader thread may still sit in stdin.readline(); a normal interpreter shutdown
    # would then abort on the stdin lock. Everything is flushed, so leave directly.
    sys.stderr.flush()
    os._exit(0)
