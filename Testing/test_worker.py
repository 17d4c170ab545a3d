"""The background worker with real subprocesses: progress, cancel, crash recovery, hangs,
malformed requests, queuing, OOM retry, and no leaked shared memory or processes."""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import psutil
import pytest

from biomedseg.errors import BiomedSegError, CancelledError, InputError, OutOfMemoryError, WorkerCrashedError
from biomedseg.volume import Volume
from biomedseg.worker import protocol
from biomedseg.worker.client import WorkerClient
from conftest import worker_test_models


@pytest.fixture(scope="module", autouse=True)
def test_models():
    """Register the controllable test backend in this process and in the workers it starts."""
    with worker_test_models():
        yield


@pytest.fixture
def client():
    c = WorkerClient(cancel_grace=3.0)
    yield c
    c.close()


def small_volume(shape=(12, 14, 16), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    m = np.array([[0, 0, -1.3, 8.1], [1.1, 0, 0, -7.3], [0, -0.9, 0, 5.2], [0, 0, 0, 1]], float)
    return Volume(rng.integers(-1000, 1000, shape, dtype=np.int16), m, name="small")


def assert_blocks_only_pooled(client):
    """No job holds a block and every block on the system is the client's idle pool."""
    assert client.pool.in_use == {}
    assert set(protocol.list_blocks(os.getpid())) <= {b.name for b in client.pool.idle}


def expected_sphere(volume, centre, radius):
    ras = volume.ras_of_voxels()
    return (np.linalg.norm(ras - np.asarray(centre), axis=-1) < radius) & (ras[..., 0] > 0)


def test_result_progress_in_order_and_geometry(client):
    vol = small_volume()
    centre = [0.37, -0.41, 0.23]
    events = []
    job = client.submit(vol, "test-model", ["target", "bright"],
                        options={"mode": "sphere", "steps": 5, "step_s": 0.05, "centre": centre, "radius": 5.0},
                        on_progress=lambda j: events.append((j.stage, j.done, j.total, j.eta)))
    result = client.wait(job, timeout=60)
    assert job.state == "done"
    dones = [d for s, d, t, _ in events if s == "working"]
    assert dones == sorted(dones) and dones[-1] == 5 and len(dones) >= 3
    assert all(t == 5 for s, d, t, _ in events if s == "working")
    assert any(eta is not None and eta >= 0 for *_, eta in events)
    by_name = {s.name: s for s in result.segments}
    assert np.array_equal(by_name["target"].mask, expected_sphere(vol, centre, 5.0))
    assert np.array_equal(by_name["bright"].mask, vol.array > np.median(vol.array))
    assert result.device == "cpu"


def test_probabilities_come_back(client):
    vol = small_volume()
    result = client.run(vol, "test-model", ["target"], probabilities=True, timeout=60,
                        options={"centre": [0.37, -0.41, 0.23], "radius": 5.0})
    probs = result.probabilities["target"]
    assert probs.dtype == np.float32 and probs.shape == vol.shape
    assert np.array_equal(probs > 0.5, result.segments[0].mask)


def test_absent_targets_are_listed_not_written(client):
    vol = small_volume()
    result = client.run(vol, "test-model", ["target"], timeout=60, options={"centre": [500, 500, 500]})
    assert result.segments == [] and result.absent == ["target"]


def test_cancel_mid_run_returns_promptly_and_nothing(client):
    vol = small_volume()
    job = client.submit(vol, "test-model", ["target"], options={"steps": 200, "step_s": 0.05})
    while job.done < 3:
        client.poll(timeout=0.1)
    pid = client.worker_pid
    t0 = time.monotonic()
    client.cancel(job)
    with pytest.raises(CancelledError, match="nothing was written"):
        client.wait(job, timeout=10)
    assert time.monotonic() - t0 < 1.0
    assert job.cancel_acknowledged and job.result is None and job.state == "cancelled"
    # the worker survived the cancel and stays warm
    assert client.request("ping")["pid"] == pid
    assert_blocks_only_pooled(client)


def test_cancel_of_uninterruptible_work_kills_worker_and_recovers(client):
    client.cancel_grace = 1.0
    vol = small_volume()
    job = client.submit(vol, "test-model", ["target"], options={"mode": "ignore_cancel", "steps": 100, "step_s": 0.2})
    while job.done < 1:
        client.poll(timeout=0.1)
    old_pid = client.worker_pid
    t0 = time.monotonic()
    client.cancel(job)
    with pytest.raises(CancelledError, match="worker was stopped"):
        client.wait(job, timeout=10)
    assert time.monotonic() - t0 < 3.0
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    result = client.run(vol, "test-model", ["target"], timeout=60, options={"radius": 5.0})
    assert client.worker_pid != old_pid and result.segments


def test_kill_9_mid_run_gives_clear_error_and_next_request_works(client):
    vol = small_volume()
    job = client.submit(vol, "test-model", ["target"], options={"steps": 200, "step_s": 0.05})
    while job.done < 2:
        client.poll(timeout=0.1)
    os.kill(client.worker_pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashedError, match="exit code -9") as err:
        client.wait(job, timeout=10)
    assert "next request starts a new worker" in err.value.hint
    assert_blocks_only_pooled(client)
    result = client.run(vol, "test-model", ["target"], timeout=60, options={"radius": 5.0})
    assert result.segments[0].mask.any()


def test_crash_inside_model_reports_last_log_lines(client):
    vol = small_volume()
    with pytest.raises(WorkerCrashedError, match="stopped unexpectedly"):
        client.run(vol, "test-model", ["target"], timeout=60, options={"mode": "crash", "crash_at": 1})
    assert client.run(vol, "test-model", ["target"], timeout=60, options={"radius": 5.0}).segments


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_hung_worker_is_killed_with_its_children(client, tmp_path):
    client.stall_timeout = 2.0
    vol = small_volume()
    pid_file = tmp_path / "child.pid"
    job = client.submit(vol, "test-model", ["target"], options={"mode": "hang", "child_pid_file": str(pid_file)})
    client.poll(timeout=1.0)
    pid = client.worker_pid
    with pytest.raises(WorkerCrashedError, match="stopped answering"):
        client.wait(job, timeout=15)
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert _gone(pid) and _gone(child)
    client.stall_timeout = 600
    assert client.run(vol, "test-model", ["target"], timeout=60, options={"radius": 5.0}).segments


def _raw(client, payload: bytes, reply_id=None, timeout=10):
    """Send bytes straight to the worker and return its reply for ``reply_id`` (or the first error)."""
    client.proc.stdin.write(payload)
    client.proc.stdin.flush()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kind, msg = client._events.get(timeout=timeout)
        if kind == "message" and (msg.get("id") == reply_id) and msg.get("event") in ("error", "queued"):
            if msg["event"] == "queued":
                continue
            return msg
    raise AssertionError("no reply")


def test_malformed_and_oversized_requests_are_rejected_without_killing_the_worker(client):
    client.start()
    pid = client.request("ping")["pid"]
    cases = [
        b"this is not json\n",
        b"[1, 2, 3]\n",
        json.dumps({"op": "explode", "id": 7}).encode() + b"\n",
        json.dumps({"op": "segment"}).encode() + b"\n",
        b"x" * (protocol.MAX_MESSAGE_BYTES + 10) + b"\n",
    ]
    texts = []
    for payload in cases:
        msg = _raw(client, payload, reply_id=7 if b"explode" in payload else None)
        assert msg["error"]["kind"] == "bad_input"
        texts.append(msg["error"]["message"])
    assert "not valid JSON" in texts[0] and "JSON object" in texts[1] and "unknown op" in texts[2]
    assert "needs an 'id'" in texts[3] and "byte limit" in texts[4]
    # well-formed envelope, bad contents: unknown block, block too small for the shape, bad dtype
    good = small_volume()
    base = {"op": "segment", "model": "test-model", "prompts": ["t"], "ijk_to_ras": good.ijk_to_ras.ravel().tolist()}
    block = protocol.create_block(16)
    try:
        mine_but_gone = f"bmseg_{os.getpid()}_dead"
        bad_requests = [
            {**base, "id": 11, "input": {"shm": mine_but_gone, "shape": [2, 2, 2], "dtype": "int16"},
             "output": {"shm": mine_but_gone, "shape": [1, 2, 2, 2], "dtype": "uint8"}},
            {**base, "id": 12, "input": protocol.array_spec(block, (100, 100, 100), np.int16),
             "output": protocol.array_spec(block, (1, 2, 2, 2), np.uint8)},
            {**base, "id": 13, "input": {"shm": block.name, "shape": [2, 2, 2], "dtype": "object"},
             "output": protocol.array_spec(block, (1, 2, 2, 2), np.uint8)},
            {**base, "id": 14, "input": {"shm": "/etc/passwd", "shape": [2], "dtype": "uint8"},
             "output": protocol.array_spec(block, (1, 2, 2, 2), np.uint8)},
            {**base, "id": 15, "input": {"shm": "bmseg_1_0123abcd", "shape": [2, 2, 2], "dtype": "int16"},
             "output": protocol.array_spec(block, (1, 2, 2, 2), np.uint8)},
        ]
        expected = ["not found", "needs 2000000 bytes", "input/dtype: 'object' is not one of",
                    "input/shm: '/etc/passwd' does not match", "is not one of this client's"]
        for request, text in zip(bad_requests, expected):
            msg = _raw(client, protocol.encode(request), reply_id=request["id"])
            assert msg["error"]["kind"] == "bad_input" and text in msg["error"]["message"], msg
    finally:
        protocol.release(block)
    assert client.request("ping")["pid"] == pid  # same worker, still answering
    assert client.run(good, "test-model", ["target"], timeout=60, options={"radius": 5.0}).segments


def test_bad_prompt_and_internal_error_keep_worker(client):
    vol = small_volume()
    with pytest.raises(InputError, match="No prompt given"):
        client.run(vol, "test-model", ["   "], timeout=60)
    client.start()
    pid = client.request("ping")["pid"]
    with pytest.raises(BiomedSegError, match="Internal error in the worker: ValueError: simulated bug"):
        client.run(vol, "test-model", ["target"], timeout=60, options={"mode": "error"})
    assert client.request("ping")["pid"] == pid


def test_library_prints_do_not_break_the_protocol(client):
    result = client.run(small_volume(), "test-model", ["target"], timeout=60,
                        options={"mode": "print", "radius": 5.0})
    assert result.segments
    time.sleep(0.1)
    assert any("noise on stdout" in line for line in client.log)


def test_out_of_memory_retries_with_half_batch_then_reports(client):
    vol = small_volume()
    stages = []
    result = client.run(vol, "test-model", ["target"], timeout=60, options={"mode": "oom", "batch_size": 4,
                                                                             "radius": 5.0},
                        on_progress=lambda j: stages.append(j.stage))
    assert result.segments and any("retrying with batch size 2" in s for s in stages)
    with pytest.raises(OutOfMemoryError, match="ran out of memory") as err:
        client.run(vol, "test-model", ["target"], timeout=60, options={"mode": "oom", "always_oom": True})
    assert "smaller" in err.value.hint


def test_out_of_memory_policy_is_the_same_in_process():
    """--in-process runs get the engine's one policy too (before, only the worker retried): the batch is
    halved until it fits, the report says so, and at one unit the error says what to try."""
    from biomedseg.engine import segment

    vol = small_volume()
    stages = []
    result = segment(vol, "test-model", ["target"], options={"mode": "oom", "batch_size": 8, "radius": 5.0},
                     progress=lambda stage, done, total: stages.append(stage))
    assert result.segments and result.report["batch_size"] == {"planned": 8, "ran": 2, "units": "steps"}
    assert result.report["memory_retries"] == [{"from": 8, "to": 4}, {"from": 4, "to": 2}]
    assert [s for s in stages if "out of memory" in s] == ["out of memory: retrying with batch size 4",
                                                             "out of memory: retrying with batch size 2"]
    with pytest.raises(OutOfMemoryError, match="with 1 steps per pass") as err:
        segment(vol, "test-model", ["target"], options={"mode": "oom", "always_oom": True})
    assert "smaller slice range or ROI" in err.value.hint


def test_numpy_memory_errors_and_memory_errors_while_loading_are_out_of_memory(monkeypatch):
    from biomedseg.engine import segment, unload_all

    vol = small_volume()
    result = segment(vol, "test-model", ["target"], options={"mode": "memory_error", "batch_size": 4, "radius": 5.0})
    assert result.segments and result.report["batch_size"]["ran"] == 1
    unload_all()
    monkeypatch.setenv("TEST_MODEL_LOAD_OOM", "1")
    with pytest.raises(OutOfMemoryError, match="ran out of memory on cpu while loading its weights") as err:
        segment(vol, "test-model", ["target"])
    assert "more memory" in err.value.hint and "--device cpu" not in err.value.hint  # it is the CPU already


def test_cancelling_a_queued_job_keeps_the_running_one_and_the_worker(client):
    vol = small_volume()
    running = client.submit(vol, "test-model", ["target"], options={"steps": 20, "step_s": 0.05, "radius": 5.0})
    queued = client.submit(vol, "test-model", ["target"], options={"steps": 2, "radius": 5.0})
    while running.state != "running":
        client.poll(timeout=0.05)
    pid = client.worker_pid
    client.cancel(queued)
    with pytest.raises(CancelledError, match="before it started"):
        client.wait(queued, timeout=30)
    assert not running.finished  # the queued job ended on the worker's answer, not when its turn came
    assert client.wait(running, timeout=30).segments and client.worker_pid == pid
    again = client.run(vol, "test-model", ["target"], options={"steps": 2, "radius": 5.0}, timeout=30)
    assert np.array_equal(again.segments[0].mask, running.result.segments[0].mask)  # its reused blocks untouched


def test_jobs_queued_behind_a_crash_or_a_cancel_kill_are_sent_again_not_lost():
    client = WorkerClient(cancel_grace=0.5)
    vol = small_volume()
    try:
        crashing = client.submit(vol, "test-model", ["target"], options={"mode": "crash", "crash_at": 1})
        behind = client.submit(vol, "test-model", ["target"], options={"radius": 5.0})
        with pytest.raises(WorkerCrashedError):
            client.wait(crashing, timeout=60)
        assert client.wait(behind, timeout=60).segments
        stubborn = client.submit(vol, "test-model", ["target"],
                                 options={"mode": "ignore_cancel", "steps": 100, "step_s": 0.1})
        after = client.submit(vol, "test-model", ["target"], options={"radius": 5.0})
        while stubborn.done < 1:
            client.poll(timeout=0.05)
        old = client.worker_pid
        client.cancel(stubborn)
        with pytest.raises(CancelledError, match="worker was stopped"):
            client.wait(stubborn, timeout=30)
        assert client.wait(after, timeout=60).segments and client.worker_pid != old
    finally:
        client.close()


def test_closing_a_session_answers_while_a_job_runs(client):
    vol = small_volume()
    job = client.submit(vol, "test-model", ["target"], options={"steps": 40, "step_s": 0.05, "radius": 5.0})
    while job.state != "running":
        client.poll(timeout=0.05)
    t0 = time.monotonic()
    assert client.close_session("nothing-open") is False
    assert time.monotonic() - t0 < 1.0 and not job.finished
    client.wait(job, timeout=30)


def test_two_requests_queue_instead_of_interleaving(client):
    vol = small_volume()
    log = []
    jobs = [client.submit(vol, "test-model", [f"target"], options={"steps": 6, "step_s": 0.05, "radius": 5.0},
                          on_progress=lambda j: j.state == "running" and log.append((j.id, j.done)),
                          on_done=lambda j: log.append((j.id, "done"))) for _ in range(2)]
    for job in jobs:
        client.wait(job, timeout=60)
    first, second = jobs[0].id, jobs[1].id
    first_done = log.index((first, "done"))
    assert all(jid == first for jid, _ in log[:first_done])
    assert any(jid == second and d != "done" for jid, d in log[first_done:])


def test_warm_model_status_and_unload(client):
    client.run(small_volume(), "test-model", ["target"], timeout=60, options={"radius": 5.0})
    status = client.request("status")
    assert {"model": "test-model", "device": "cpu", "weights": None} in status["warm"]
    assert client.request("unload")["event"] == "unloaded"
    assert client.request("status")["warm"] == []


def test_hundred_runs_with_cancels_and_kills_leave_nothing_behind():
    me = psutil.Process()
    before_children = {p.pid for p in me.children(recursive=True)}
    client = WorkerClient(cancel_grace=2.0)
    vol = small_volume((8, 9, 10))
    outcomes = {"done": 0, "cancelled": 0, "crashed": 0}
    try:
        for i in range(100):
            if i % 10 == 3:  # kill -9 mid-run
                job = client.submit(vol, "test-model", ["t"], options={"steps": 100, "step_s": 0.02})
                while job.done < 1 and not job.finished:
                    client.poll(timeout=0.05)
                os.kill(client.worker_pid, signal.SIGKILL)
            elif i % 5 == 1:  # cancel mid-run
                job = client.submit(vol, "test-model", ["t"], options={"steps": 100, "step_s": 0.02})
                while job.done < 1 and not job.finished:
                    client.poll(timeout=0.05)
                client.cancel(job)
            else:
                job = client.submit(vol, "test-model", ["t"], options={"steps": 1, "radius": 3.0})
            try:
                client.wait(job, timeout=30)
                outcomes["done"] += 1
            except CancelledError:
                outcomes["cancelled"] += 1
            except WorkerCrashedError:
                outcomes["crashed"] += 1
    finally:
        client.close()
    assert outcomes == {"done": 70, "cancelled": 20, "crashed": 10}
    assert protocol.list_blocks(os.getpid()) == []  # the pool is unlinked on close (only ours: others may run)
    time.sleep(0.2)
    leftover = [p for p in me.children(recursive=True) if p.pid not in before_children
                and p.status() != psutil.STATUS_ZOMBIE and "biomedseg.worker" in " ".join(p.cmdline())]
    assert leftover == []


def test_stale_blocks_of_dead_owners_are_swept():
    """A client that died without cleaning up (e.g. Slicer crashed) leaves blocks named after
    its pid; the next client start removes them."""
    import subprocess
    import sys

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this platform")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{protocol.SHM_PREFIX}_{dead.pid}_0123456789ab"
    live = protocol.create_block(64)
    with open(f"/dev/shm/{stale}", "wb") as f:
        f.write(b"left behind")
    try:
        assert stale in protocol.list_blocks()
        assert protocol.sweep_stale_blocks() == [stale]
        assert stale not in protocol.list_blocks() and live.name in protocol.list_blocks()
    finally:
        protocol.release(live)


def test_blocks_are_reused_and_trimmed_pool_is_forgotten_by_worker(client):
    vol = small_volume()
    client.run(vol, "test-model", ["target"], timeout=60, options={"radius": 5.0})
    first = {b.name for b in client.pool.idle}
    client.run(vol, "test-model", ["target"], timeout=60, options={"radius": 5.0})
    assert {b.name for b in client.pool.idle} == first  # same blocks, no new pages
    client.pool.max_idle_bytes = 0  # next give-back trims everything
    client.run(vol, "test-model", ["target"], timeout=60, options={"radius": 5.0})
    assert client.pool.idle == [] and protocol.list_blocks(os.getpid()) == []
    assert client.request("ping")["pid"]  # the forget message was accepted


def fake_worker_python(tmp_path, ready: dict) -> tuple[str, "Path"]:
    """An executable that stands in for another environment's Python: whatever it is asked to run,
    it announces ``ready`` like a worker of another engine and records every line it is sent."""
    import sys
    from pathlib import Path

    record = tmp_path / "received.txt"
    script = tmp_path / "python-of-another-env"
    script.write_text(f"""#!{sys.executable}
import json, sys
print(json.dumps({ready!r}), flush=True)
with open({str(record)!r}, "w") as out:
    for line in sys.stdin:
        out.write(line)
        out.flush()
""")
    script.chmod(0o755)
    return str(script), Path(record)


@pytest.mark.parametrize("version,protocol_version,side", [("0.0.9", None, "worker is out of date"),
                                                           ("99.0", 99, "This side is older")])
def test_a_stale_or_newer_worker_is_refused_with_what_to_update(tmp_path, version, protocol_version, side):
    from biomedseg.errors import WorkerMismatchError

    ready = {"event": "ready", "pid": 1, "version": version, "engine_root": "/old/checkout"}
    if protocol_version is not None:
        ready["protocol"] = protocol_version
    python, record = fake_worker_python(tmp_path, ready)
    client = WorkerClient(python=python)
    try:
        job = client.submit(small_volume(), "test-model", ["target"], options={"radius": 5.0})
        with pytest.raises(WorkerMismatchError) as err:
            client.wait(job, timeout=30)
        text = str(err.value)
        assert f"BiomedSeg {version}" in text and "/old/checkout" in text and side in text
        assert job.state == "failed" and not client.alive
        assert not record.exists() or record.read_text() == ""  # nothing was sent to it
        assert_blocks_only_pooled(client)
        with pytest.raises(WorkerMismatchError):
            client.request("ping", timeout=30)
    finally:
        client.close()
    from biomedseg.cli import worker_report

    report = worker_report(python)
    assert side in report["error"]


def test_a_worker_that_imports_another_copy_of_the_engine_is_refused(tmp_path):
    """Same version and protocol, another folder: the handshake names both copies (a checkout shadowing one)."""
    from biomedseg import __version__
    from biomedseg.errors import WorkerMismatchError

    ready = {"event": "ready", "pid": 1, "version": __version__, "protocol": protocol.PROTOCOL_VERSION,
             "engine_root": str(tmp_path / "other-checkout")}
    python, record = fake_worker_python(tmp_path, ready)
    client = WorkerClient(python=python)
    try:
        with pytest.raises(WorkerMismatchError, match="other-checkout.*shadows this one"):
            client.request("ping", timeout=30)
        assert not record.exists() or record.read_text() == ""
    finally:
        client.close()


def test_a_worker_python_without_the_engines_packages_is_a_missing_dependency(tmp_path, colin_path, capsys):
    """It used to be 'worker crashed' (exit 1); the package and the Python are named, exit 3."""
    import venv

    from biomedseg.cli import main
    from biomedseg.errors import DependencyMissingError

    venv.create(tmp_path / "bare", with_pip=False)
    bare = str(tmp_path / "bare" / "bin" / "python")
    client = WorkerClient(python=bare)
    try:
        with pytest.raises(DependencyMissingError, match="lacks the package 'numpy'") as err:
            client.run(small_volume(), "test-model", ["t"], timeout=60)
        assert bare in str(err.value) and "pip install numpy" in err.value.hint
    finally:
        client.close()
    rc = main(["segment", str(colin_path), "--prompt", "brain", "--worker-python", bare, "-o",
               str(tmp_path / "x.seg.nrrd"), "-q"])
    assert rc == 3 and "lacks the package 'numpy'" in capsys.readouterr().err
