"""The worker under attack: every line a client (or anything writing to its stdin) can send.

Each reproduction from the reliability issue is a case here: lines that used to silence the
worker (an unhashable cancel target, NaN or 1e999 ids, JSON nested 200,000 deep, an id whose
reply would pass 1 MiB) or kill it (``forget`` with a number, ``echo`` with a number or a
text threshold, shapes whose size overflows). After each one the same worker must answer a
ping within 1 s, and closing its stdin must end it, even mid-job. A property-based fuzzer
(Hypothesis) then throws random ops, fields, types, sizes, nesting and bytes at it.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from biomedseg.worker import protocol
from biomedseg.worker.client import ENGINE_ROOT

ROOT = Path(__file__).resolve().parents[1]


class RawWorker:
    """``python -m biomedseg.worker`` on plain pipes, as the issue's reproductions drive it."""

    def __init__(self, env: dict | None = None):
        env = {**os.environ, **(env or {}), "PYTHONPATH": str(ENGINE_ROOT), "BIOMEDSEG_CLIENT_PID": str(os.getpid())}
        self.proc = subprocess.Popen([sys.executable, "-m", "biomedseg.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.next(lambda m: m.get("event") == "ready", timeout=60)
        assert ready["protocol"] == protocol.PROTOCOL_VERSION

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def write(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def next(self, match, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if message is None:
                raise AssertionError(f"the worker exited (code {self.proc.wait()})")
            if match(message):
                return message
        raise AssertionError(f"no matching reply within {timeout} s")

    def ping(self, n: int, timeout: float = 1.0) -> float:
        t0 = time.monotonic()
        self.write(json.dumps({"op": "ping", "id": f"ping-{n}"}).encode() + b"\n")
        self.next(lambda m: m.get("id") == f"ping-{n}" and m.get("event") == "pong", timeout)
        return time.monotonic() - t0

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def worker():
    w = RawWorker()
    yield w
    w.close()


BAD_LINES = {
    "unhashable cancel target": b'{"op":"cancel","target":[1]}',
    "NaN id": b'{"op":"ping","id":NaN}',
    "1e999 id": b'{"op":"ping","id":1e999}',
    "nested 200000 deep": b'{"op":"ping","id":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    "id whose reply passes 1 MiB": json.dumps({"op": "ping", "id": "x" * 900_000}).encode(),
    "forget with a number": b'{"op":"forget","blocks":5}',
    "echo with input 5": b'{"op":"echo","id":3,"input":5,"output":5}',
    "echo with threshold abc": json.dumps({"op": "echo", "id": 4, "threshold": "abc",
                                           "input": {"shm": "bmseg_1_ab", "shape": [2], "dtype": "uint8"},
                                           "output": {"shm": "bmseg_1_ab", "shape": [2], "dtype": "uint8"}}).encode(),
    "shape 2**32 x 2**32": json.dumps({"op": "echo", "id": 5, "input": {"shm": f"bmseg_{os.getpid()}_ab",
                                       "shape": [2 ** 32, 2 ** 32], "dtype": "uint8"},
                                       "output": {"shm": f"bmseg_{os.getpid()}_ab", "shape": [2], "dtype": "uint8"}}
                                      ).encode(),
    "shape 10**30": json.dumps({"op": "segment", "id": 6, "model": "deepbet", "prompts": ["brain"],
                                "input": {"shm": f"bmseg_{os.getpid()}_ab", "shape": [10 ** 30], "dtype": "uint8"},
                                "output": {"shm": f"bmseg_{os.getpid()}_ab", "shape": [1], "dtype": "uint8"}}).encode(),
    "huge but bounded shapes": json.dumps({"op": "echo", "id": 7, "input": {"shm": f"bmseg_{os.getpid()}_ab",
                                           "shape": [2 ** 31] * 5, "dtype": "float64"},
                                           "output": {"shm": f"bmseg_{os.getpid()}_ab", "shape": [2],
                                                      "dtype": "uint8"}}).encode(),
    "invalid utf-8": b'{"op":"ping","id":"\xff\xfe"}',
    "a bare number": b"42",
    "trailing-newline block name": json.dumps({"op": "forget", "blocks": [f"bmseg_{os.getpid()}_ab\n"]}).encode(),
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_a_bad_line_is_refused_and_the_worker_keeps_serving(worker, name):
    worker.write(BAD_LINES[name] + b"\n")
    reply = worker.next(lambda m: m.get("event") == "error", timeout=5)
    assert reply["error"]["kind"] == "bad_input" and reply["error"]["message"].startswith("Rejected request")
    assert len(json.dumps(reply)) < 2000  # a reply never echoes the oversized field back
    assert worker.ping(1) < 1.0
    assert worker.proc.poll() is None


def test_end_of_input_ends_the_worker_even_in_the_middle_of_a_job(tmp_path):
    """The client went away: the worker exits at once instead of computing for nobody."""
    from conftest import WORKER_MODELS

    w = RawWorker(env={"BIOMEDSEG_EXTRA_MODELS": str(WORKER_MODELS)})
    block_in, block_out = protocol.create_block(8 * 9 * 10 * 2), protocol.create_block(8 * 9 * 10)
    try:
        w.write(json.dumps({"op": "segment", "id": 1, "model": "test-model", "prompts": ["t"],
                            "input": protocol.array_spec(block_in, (8, 9, 10), np.int16),
                            "ijk_to_ras": np.eye(4).ravel().tolist(),
                            "output": protocol.array_spec(block_out, (1, 8, 9, 10), np.uint8),
                            "options": {"steps": 600, "step_s": 0.1}}).encode() + b"\n")
        w.next(lambda m: m.get("event") == "progress", timeout=30)
        t0 = time.monotonic()
        w.proc.stdin.close()
        assert w.proc.wait(timeout=5) == 0
        assert time.monotonic() - t0 < 2.0
    finally:
        protocol.release(block_in)
        protocol.release(block_out)
        w.close()


def test_blocks_of_other_processes_and_files_outside_the_echo_folder_are_refused(worker, tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        foreign = f"bmseg_{other.pid}_0123abcd"
        worker.write(json.dumps({"op": "echo", "id": 9, "input": {"shm": foreign, "shape": [2], "dtype": "uint8"},
                                 "output": {"shm": foreign, "shape": [2], "dtype": "uint8"}}).encode() + b"\n")
        reply = worker.next(lambda m: m.get("id") == 9, timeout=5)
        assert "is not one of this client's" in reply["error"]["message"]
    finally:
        other.kill()
        other.wait()
    secret = tmp_path / "secret.nii.gz"
    secret.write_bytes(b"not for you")
    worker.write(json.dumps({"op": "echo_file", "id": 10, "input_path": str(secret),
                             "output_path": str(tmp_path / "out.nii.gz")}).encode() + b"\n")
    reply = worker.next(lambda m: m.get("id") == 10, timeout=5)
    assert "echo_file is off" in reply["error"]["message"] and not (tmp_path / "out.nii.gz").exists()
    confined = RawWorker(env={"BIOMEDSEG_FILE_ECHO_DIR": str(tmp_path / "bench")})
    try:
        confined.write(json.dumps({"op": "echo_file", "id": 11, "input_path": str(secret),
                                   "output_path": str(tmp_path / "bench" / "out.nii.gz")}).encode() + b"\n")
        assert "works only inside" in confined.next(lambda m: m.get("id") == 11, timeout=5)["error"]["message"]
    finally:
        confined.close()


def test_a_stopped_worker_is_found_in_seconds_and_a_long_quiet_step_is_not(tmp_path):
    """SIGSTOP: no heartbeat, so the job fails after hang_timeout (5 s), not after 10 minutes. A healthy
    step that sends nothing for longer than that keeps beating and is left alone."""
    from biomedseg.errors import WorkerCrashedError
    from biomedseg.volume import Volume
    from biomedseg.worker.client import HANG_AFTER_S, WorkerClient
    from conftest import worker_test_models

    vol = Volume(np.zeros((8, 9, 10), np.int16), np.eye(4))
    with worker_test_models():
        client = WorkerClient()
        try:
            quiet = client.run(vol, "test-model", ["t"], options={"steps": 1, "step_s": HANG_AFTER_S + 2.0},
                               timeout=60)
            assert quiet.device == "cpu"  # seven silent seconds of work, and not killed
            job = client.submit(vol, "test-model", ["t"], options={"steps": 600, "step_s": 0.1})
            while job.done < 1:
                client.poll(timeout=0.05)
            pid = client.worker_pid
            os.kill(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(WorkerCrashedError, match="no heartbeat for 5 s"):
                client.wait(job, timeout=60)
            found = time.monotonic() - t0
            assert HANG_AFTER_S - 0.5 < found < HANG_AFTER_S + 2.0, found
            assert client.run(vol, "test-model", ["t"], timeout=60).device == "cpu"  # a fresh worker
        finally:
            client.close()


# ---- the fuzzer --------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from biomedseg.worker.messages import OPS  # noqa: E402

#: ops the fuzzer may send ("shutdown" would end the worker on purpose)
FUZZ_OPS = [op for op in OPS if op != "shutdown"]
FIELDS = ["id", "target", "blocks", "input", "output", "probabilities", "threshold", "model", "prompts", "session",
          "region", "options", "meta", "ijk_to_ras", "name", "device", "weights", "channels_last", "shm", "shape",
          "dtype", "input_path", "output_path", "keep_largest", "fill_holes"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=300),
                    st.sampled_from([f"bmseg_{os.getpid()}_ab", "bmseg_1_ff", "/etc/passwd", "../x", "\n"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                        st.dictionaries(st.sampled_from(FIELDS + ["op", "type"]),
                                                                        inner, max_size=6)), max_leaves=25)
messages = st.fixed_dictionaries({"op": st.one_of(st.sampled_from(FUZZ_OPS), st.text(max_size=20))},
                                 optional={f: values for f in FIELDS})
raw_lines = st.one_of(
    messages.map(lambda m: json.dumps(m).encode()),
    st.binary(max_size=400).map(lambda b: b.replace(b"\n", b" ")),
    st.integers(min_value=1, max_value=3000).map(lambda d: b'{"op":"ping","x":' + b"[" * d + b"]" * d + b"}"),
    st.sampled_from([b'{"op":"ping","id":NaN}', b'{"op":"ping","id":-Infinity}', b'{"op":"cancel","target":{}}',
                     b'{"op":"forget","blocks":[[]]}', b"\xef\xbb\xbf{}", b"[]", b"null"]),
)
FUZZ_CASES = int(os.environ.get("BIOMEDSEG_FUZZ_CASES", "600"))


@pytest.fixture(scope="module")
def fuzz_worker():
    w = RawWorker()
    yield w
    w.close()


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(line=raw_lines)
def test_fuzzed_lines_never_stop_the_worker(fuzz_worker, line):
    fuzz_worker.write(line + b"\n")
    fuzz_worker.ping(hash(line) & 0xFFFF)
    assert fuzz_worker.proc.poll() is None


def test_the_worker_takes_its_childrens_processes_with_it_when_the_client_goes(tmp_path):
    from conftest import WORKER_MODELS

    import psutil

    w = RawWorker(env={"BIOMEDSEG_EXTRA_MODELS": str(WORKER_MODELS)})
    block_in, block_out = protocol.create_block(8 * 9 * 10 * 2), protocol.create_block(8 * 9 * 10)
    pid_file = tmp_path / "child.pid"
    try:
        w.write(json.dumps({"op": "segment", "id": 1, "model": "test-model", "prompts": ["t"],
                            "input": protocol.array_spec(block_in, (8, 9, 10), np.int16),
                            "ijk_to_ras": np.eye(4).ravel().tolist(),
                            "output": protocol.array_spec(block_out, (1, 8, 9, 10), np.uint8),
                            "options": {"mode": "hang", "child_pid_file": str(pid_file)}}).encode() + b"\n")
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pid_file.read_text())
        w.proc.stdin.close()
        assert w.proc.wait(timeout=5) == 0
        time.sleep(0.2)
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    finally:
        protocol.release(block_in)
        protocol.release(block_out)
        w.close()


def test_a_worker_python_lacking_any_engine_package_fails_at_start_as_a_missing_dependency(tmp_path):
    """A Python with everything but scipy (or jsonschema) used to fail mid-job as 'internal error' or a
    'rejected request'; the worker now checks before it is ready: exit 3 with the package named."""
    import site
    import venv

    from biomedseg.errors import DependencyMissingError
    from biomedseg.volume import Volume
    from biomedseg.worker.client import WorkerClient

    venv.create(tmp_path / "env", with_pip=False)
    target = next((tmp_path / "env" / "lib").glob("python*/site-packages"))
    source = Path(site.getsitepackages()[0])
    for entry in source.iterdir():  # every package of this environment but scipy
        if not entry.name.lower().startswith("scipy"):
            (target / entry.name).symlink_to(entry)
    client = WorkerClient(python=str(tmp_path / "env" / "bin" / "python"))
    try:
        with pytest.raises(DependencyMissingError, match="lacks the package 'scipy'"):
            client.run(Volume(np.zeros((8, 9, 10), np.int16), np.eye(4)), "deepbet", ["brain"], timeout=60)
    finally:
        client.close()
