"""`biomedseg serve` and ``RemoteWorkerClient``: real server processes on loopback, real workers behind them.

One server serves most tests (as one would serve many Slicer sessions); the tests that kill or
stop a server start their own. The stand-in test model (Testing/worker_models/test_model) gives
slow, cancellable jobs; deepbet gives a real segmentation to compare with the local worker's.
"""
from __future__ import annotations

import signal
import threading

import numpy as np
import psutil
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("blosc2")
requests = pytest.importorskip("requests")

from biomedseg.errors import (AccessDeniedError, BiomedSegError, CancelledError, InputError,  # noqa: E402
                              ServerUnavailableError,
                              WorkerMismatchError)
from biomedseg.remote import arrays, schema  # noqa: E402
from biomedseg.remote.client import RemoteWorkerClient  # noqa: E402
from biomedseg.volume import Volume  # noqa: E402
from biomedseg.worker import protocol  # noqa: E402
from conftest import worker_client, worker_test_models  # noqa: E402
from remote_server import SERVER_MODELS, ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("server"), extra=["--max-upload-mb", "16", "--max-array-mb", "64"])
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def local():
    """One local worker for every comparison in this module (each new one costs a torch import)."""
    with worker_test_models(), worker_client() as client:
        yield client


@pytest.fixture
def remote(server):
    with worker_test_models():  # the test model's catalogue entry on this side too (prompt checks)
        client = RemoteWorkerClient(server.url, server.token)
        try:
            yield client
        finally:
            client.close()


def small_volume(seed: int = 0, shape=(24, 28, 32)) -> Volume:
    rng = np.random.default_rng(seed)
    affine = np.array([[0.0, 0.0, -1.2, 20.0], [0.9, 0.0, 0.0, -5.0], [0.0, 1.1, 0.0, 3.0], [0, 0, 0, 1]])
    return Volume(rng.integers(-50, 200, size=shape).astype(np.int16), affine, name=f"small{seed}")


def test_a_segment_through_the_server_equals_the_local_worker_bit_for_bit(remote, local, colin_path):
    from biomedseg.io import read_volume

    volume = read_volume(colin_path)
    remote_result = remote.run(volume, "deepbet", ["brain"], device="cpu", probabilities=True)
    local_result = local.run(volume, "deepbet", ["brain"], device="cpu", probabilities=True)
    assert [s.name for s in remote_result.segments] == [s.name for s in local_result.segments] == ["brain"]
    assert remote_result.segments[0].mask.sum() > 100_000
    assert np.array_equal(remote_result.segments[0].mask, local_result.segments[0].mask)
    assert remote_result.segments[0].color == local_result.segments[0].color
    assert remote_result.segments[0].terminology == local_result.segments[0].terminology
    assert np.array_equal(remote_result.probabilities["brain"], local_result.probabilities["brain"])
    assert remote_result.report.get("plan") == local_result.report.get("plan")


def test_typed_prompts_options_and_absent_targets_cross_the_network(remote, local):
    volume = small_volume(1)
    result = remote.run(volume, "test-model", ["ball", "bright"], options={"radius": 8.0})
    expected = local.run(volume, "test-model", ["ball", "bright"], options={"radius": 8.0})
    assert [s.name for s in result.segments] == [s.name for s in expected.segments]
    for got, want in zip(result.segments, expected.segments):
        assert np.array_equal(got.mask, want.mask)
    assert result.report["mode"] == "sphere"
    assert result.absent == expected.absent


def test_a_volume_the_server_has_is_not_sent_again(server, remote):
    volume = small_volume(2)
    remote.run(volume, "test-model", ["ball"])
    calls = []
    with worker_test_models():
        fresh = RemoteWorkerClient(server.url, server.token)
        real_call = fresh._call
        fresh._call = lambda method, path, **kw: calls.append((method, path.split("/")[2])) or real_call(
            method, path, **kw)
        try:
            fresh.run(volume, "test-model", ["ball"])
        finally:
            fresh.close()
    assert ("HEAD", "arrays") in calls
    assert ("PUT", "arrays") not in calls


def test_a_wrong_or_missing_token_gets_401(server):
    for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": server.token}):
        response = requests.get(server.url + "/v1/status", headers={**schema.client_headers(), **headers}, timeout=10)
        assert response.status_code == 401
        assert response.json()["error"]["kind"] == "access_denied"
    client = RemoteWorkerClient(server.url, "x" * 43)
    with pytest.raises(AccessDeniedError, match="refused the token"):
        client.start()
    client.close()


def test_oversized_bodies_and_decompression_bombs_are_refused(server):
    headers = {**schema.client_headers(), "Authorization": f"Bearer {server.token}"}
    noise = np.random.default_rng(0).integers(0, 255, size=(20 << 20,), dtype=np.uint8)  # 20 MB > 16 MB cap
    body = arrays.pack(noise)
    response = requests.put(f"{server.url}/v1/arrays/{arrays.content_id(noise)}", data=body, headers=headers,
                            timeout=60)
    assert response.status_code == 413
    zeros = np.zeros((80 << 20,), np.uint8)  # packs to a few kB but is 80 MB > 64 MB once decompressed
    body = arrays.pack(zeros)
    assert len(body) < 1 << 20
    response = requests.put(f"{server.url}/v1/arrays/{arrays.content_id(zeros)}", data=body, headers=headers,
                            timeout=60)
    assert response.status_code == 413
    assert "allowed" in response.json()["error"]["message"]
    response = requests.post(f"{server.url}/v1/jobs", data=b"{" * (2 << 20), headers=headers, timeout=60)
    assert response.status_code == 413


def test_requests_that_are_not_jobs_are_refused_without_harm(server, remote):
    headers = {**schema.client_headers(), "Authorization": f"Bearer {server.token}"}
    bad = [b"not json", b'{"model": "deepbet", "prompts": ["brain"], "volume": {"array": "../etc/passwd", '
                        b'"ijk_to_ras": [1,0,0,0,0,1,0,0,0,0,1,0,0,0,0,1]}}',
           b'{"model": "deepbet", "prompts": [], "output_path": "/tmp/x"}',
           b'{"model": "deepbet", "prompts": ["brain"], "volume": {"array": "' + b"0" * 64 + b'", '
           b'"ijk_to_ras": [1,0,0,0,0,1,0,0,0,0,1,0,0,0,0,1]}}']
    for body in bad:
        response = requests.post(f"{server.url}/v1/jobs", data=body, headers=headers, timeout=30)
        assert response.status_code == 400, body
    pickle_like = b"\x80\x04\x95" + b"\x00" * 64
    key = "0" * 64
    response = requests.put(f"{server.url}/v1/arrays/{key}", data=pickle_like, headers=headers, timeout=30)
    assert response.status_code == 400
    assert remote.run(small_volume(3), "test-model", ["ball"]).segments  # still serving


def test_a_damaged_array_is_an_error_not_a_wrong_mask():
    array = np.arange(5000, dtype=np.int16).reshape(10, 500)
    body = bytearray(arrays.pack(array))
    back, header = arrays.unpack(bytes(body), 1 << 20)
    assert np.array_equal(back, array) and header["shape"] == [10, 500]
    for where in (-100, -20):  # inside the last chunk, inside the checksum
        damaged = bytearray(body)
        damaged[where] ^= 0xFF
        with pytest.raises(arrays.ArrayFormatError):
            arrays.unpack(bytes(damaged), 1 << 20)
    with pytest.raises(arrays.ArrayFormatError, match="ended early"):
        arrays.unpack(bytes(body[:-1]), 1 << 20)
    with pytest.raises(arrays.ArrayFormatError, match="allowed"):
        arrays.unpack(arrays.pack(array), 1000)
    for dtype in ("uint8", "float32", "bool", "uint16", "float64"):
        a = (np.random.default_rng(1).random((3, 4, 5)) * 100).astype(dtype)
        assert np.array_equal(arrays.unpack(arrays.pack(a), 1 << 20)[0], a)
    assert arrays.unpack(arrays.pack(np.zeros((0, 4), np.uint8)), 10)[0].shape == (0, 4)


def test_a_mismatched_client_is_told_which_side_to_update(server, monkeypatch):
    import biomedseg.remote.client as client_module

    for version, side in (("0.0.1", "Update this side"), ("99.0.0", "Update the server")):
        monkeypatch.setattr(schema, "__version__", version)
        monkeypatch.setattr(client_module, "__version__", version)
        client = RemoteWorkerClient(server.url, server.token)
        with pytest.raises(WorkerMismatchError, match=side):
            client.start()
        response = requests.get(server.url + "/v1/status", timeout=10,
                                headers={**schema.client_headers(), "Authorization": f"Bearer {server.token}"})
        assert response.status_code == 409 and side in response.json()["error"]["message"]
        client.close()


def test_cancel_stops_the_job_and_the_next_one_runs(remote):
    job = remote.submit(small_volume(4), "test-model", ["ball"], options={"mode": "slow", "steps": 200, "step_s": 0.05})
    while job.state != "running":
        remote.poll(0.1)
    remote.cancel(job)
    with pytest.raises(CancelledError):
        remote.wait(job, timeout=30)
    assert job.state == "cancelled"
    assert remote.run(small_volume(5), "test-model", ["ball"], timeout=60).segments


def test_twenty_concurrent_clients_queue_and_all_finish(server, local):
    results, errors = {}, []

    def one(i):
        client = RemoteWorkerClient(server.url, server.token)
        try:
            results[i] = client.run(small_volume(100 + i, (12, 14, 16)), "test-model", ["ball"],
                                    options={"radius": 5.0 + i % 3}, timeout=300)
        except Exception as exc:  # noqa: BLE001 -- collected and shown below
            errors.append(f"{i}: {exc!r}")
        finally:
            client.close()

    with worker_test_models():
        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=400)
        assert not errors, errors
        assert sorted(results) == list(range(20))
        for i in (0, 7, 19):
            want = local.run(small_volume(100 + i, (12, 14, 16)), "test-model", ["ball"],
                             options={"radius": 5.0 + i % 3})
            assert np.array_equal(results[i].segments[0].mask, want.segments[0].mask)


def test_a_killed_server_is_a_clear_error_the_next_run_works_and_a_stop_leaves_nothing(tmp_path):
    server = ServerProcess(tmp_path).start()
    with worker_test_models():
        client = RemoteWorkerClient(server.url, server.token)
        job = client.submit(small_volume(6), "test-model", ["ball"], options={"mode": "slow", "steps": 400,
                                                                              "step_s": 0.05})
        while job.state != "running":
            client.poll(0.1)
        worker_pid = client.request("status")["worker_pid"]
        server_pid = server.proc.pid
        server.kill()
        with pytest.raises(ServerUnavailableError, match="lost") as lost:
            client.wait(job, timeout=30)
        assert "run again" in lost.value.hint
        psutil.wait_procs([psutil.Process(worker_pid)], timeout=10)  # its worker leaves with it (stdin closed)
        assert not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE
        with pytest.raises(ServerUnavailableError, match="cannot be reached"):
            client.run(small_volume(7), "test-model", ["ball"], timeout=30)
        server = ServerProcess(tmp_path, port=server.port).start()  # the same address, a fresh process
        try:
            assert client.run(small_volume(7), "test-model", ["ball"], timeout=60).segments
            assert protocol.list_blocks(server_pid) == []  # the dead server's blocks were swept
            worker_pid = client.request("status")["worker_pid"]
        except BaseException:
            server.stop()
            raise
        finally:
            client.close()
    # a server stopped the ordinary way (SIGTERM) leaves no worker process and no shared-memory block
    server_pid = server.proc.pid
    try:
        assert protocol.list_blocks(server_pid)  # pooled blocks while it serves
    finally:
        stopped = server.stop()
    assert stopped in (0, -signal.SIGTERM)  # uvicorn shuts down, then lets the signal end the process
    assert protocol.list_blocks(server_pid) == []
    assert not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE


def test_an_unreachable_server_is_a_clear_error():
    client = RemoteWorkerClient("http://127.0.0.1:9", "t" * 43)
    with pytest.raises(ServerUnavailableError, match="cannot be reached"):
        client.start()
    job = client.submit(small_volume(9), "deepbet", ["brain"])
    with pytest.raises(ServerUnavailableError):
        client.wait(job, timeout=30)
    client.close()
    with pytest.raises(InputError, match="http"):
        RemoteWorkerClient("127.0.0.1:8765")


def test_the_cli_segments_through_the_server_as_it_does_locally(server, tmp_path, colin_path, capsys):
    import nrrd

    from biomedseg.cli import main

    with worker_test_models():
        common = ["segment", str(colin_path), "--model", "test-model", "--prompt", "ball", "--option", "radius=9", "-q"]
        assert main(common + ["-o", str(tmp_path / "remote.seg.nrrd"), "--server", server.url,
                              "--token", server.token, "--report", str(tmp_path / "run.json")]) == 0
        assert main(common + ["-o", str(tmp_path / "local.seg.nrrd"), "--in-process"]) == 0  # the same engine
        remote, remote_header = nrrd.read(str(tmp_path / "remote.seg.nrrd"))
        local, local_header = nrrd.read(str(tmp_path / "local.seg.nrrd"))
        assert remote.any() and np.array_equal(remote, local)
        assert remote_header["space origin"].tolist() == local_header["space origin"].tolist()
        capsys.readouterr()
        # no server there: exit 6 with a sentence; --fallback-local runs here and says so
        assert main(common + ["-o", str(tmp_path / "x.seg.nrrd"), "--server", "http://127.0.0.1:9",
                              "--token", "t" * 43]) == 6
        err = capsys.readouterr().err
        assert "cannot be reached" in err and "what to do" in err and not (tmp_path / "x.seg.nrrd").exists()
        assert main(common + ["-o", str(tmp_path / "x.seg.nrrd"), "--server", "http://127.0.0.1:9",
                              "--token", "t" * 43, "--fallback-local"]) == 0
        assert "Running with a local worker (--fallback-local)" in capsys.readouterr().err
        assert main(common + ["-o", str(tmp_path / "y.seg.nrrd"), "--server", server.url, "--in-process"]) == 2
        assert main(common + ["-o", str(tmp_path / "z.seg.nrrd"), "--server", server.url, "--token", "wrong"]) == 2
        assert "refused the token" in capsys.readouterr().err


def test_the_server_keeps_models_warm_across_cli_calls(server, tmp_path):
    from biomedseg.cli import main

    with worker_test_models():
        client = RemoteWorkerClient(server.url, server.token)
        try:
            pid = client.request("status")["worker_pid"]
            for i in range(2):
                assert main(["segment", str(tmp_path / "in.nii.gz") if i else _write_small(tmp_path), "--model", "test-model",
                             "--prompt", "ball", "-o", str(tmp_path / f"{i}.seg.nrrd"), "--server", server.url,
                             "--token", server.token, "-q"]) == 0
            status = client.request("status")
        finally:
            client.close()
    assert status["worker_pid"] == pid or pid is None  # one worker for every call: nothing restarted
    assert any(w.get("model") == "test-model" for w in status["warm"]), status["warm"]


def _write_small(folder) -> str:
    from biomedseg.io import write_volume

    return str(write_volume(folder / "in.nii.gz", small_volume(11)))


def test_tls_from_the_users_certificate(tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl makes the test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = ServerProcess(tmp_path / "cfg", extra=["--cert", str(cert), "--key", str(key)]).start()
    try:
        assert server.url.startswith("https://")
        with worker_test_models():
            client = RemoteWorkerClient(server.url, server.token, verify=str(cert))
            try:
                assert client.run(small_volume(12), "test-model", ["ball"], timeout=60).segments
            finally:
                client.close()
        stranger = RemoteWorkerClient(server.url, server.token)  # the system's CAs do not know this certificate
        with pytest.raises(ServerUnavailableError, match="TLS"):
            stranger.start()
        stranger.close()
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(server.url.replace("https", "http") + "/v1/hello", timeout=5)
    finally:
        server.stop()


def test_the_token_file_is_made_private_and_a_readable_one_refused(tmp_path):
    import os
    import stat

    from biomedseg.remote import tokens

    path = tmp_path / "cfg" / "server-token"
    token, made = tokens.load_or_create(path)
    assert made and len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tokens.load_or_create(path) == (token, False)
    assert tokens.matches(token, f"Bearer {token}") and not tokens.matches(token, f"Bearer {token[:-1]}x")
    os.chmod(path, 0o644)
    with pytest.raises(InputError, match="can be read by other users"):
        tokens.load_or_create(path)


def test_an_interactive_session_keeps_its_image_on_the_server(server):
    from biomedseg.catalog import load_catalog
    from biomedseg.prompts import PointPrompt
    from conftest import registered_models
    from test_model_contract import bright_cube_volume, cube_box

    from biomedseg.prompts import BoxPrompt

    with registered_models(SERVER_MODELS):
        load_catalog.cache_clear()
        vol = bright_cube_volume()
        lo, hi = cube_box(vol, grow=4.0)
        box, cube = BoxPrompt(lo, hi, None, "cube"), vol.array > 500
        client = RemoteWorkerClient(server.url, server.token)
        try:
            first = client.run(vol, "toy-click-session", [box], session="s1", timeout=120)
            assert np.array_equal(first.segments[0].mask, cube) and first.report["embeddings"] == 1
            outside = vol.ras_of_voxels()[tuple(np.argwhere(~cube)[0])]
            job = client.submit(None, "toy-click-session", [box, PointPrompt(tuple(outside), True, None, "cube")],
                                session="s1")
            second = client.wait(job, timeout=120)  # no voxels sent: the server's worker kept the image
            assert second.report["embeddings"] == 1 and second.report["session_runs"] == 2
            assert (second.segments[0].mask & ~cube).any()
            assert client.close_session("s1") is True
            with pytest.raises(InputError, match="is not open"):
                client.submit(None, "toy-click-session", [box], session="s1")
        finally:
            client.close()


def test_a_cohort_runs_on_the_server_as_it_does_locally(server, tmp_path):
    import json

    import nrrd

    from biomedseg.cli import main
    from biomedseg.io import write_volume

    (tmp_path / "in").mkdir()
    for n in range(3):
        write_volume(tmp_path / "in" / f"case{n}.nii.gz", small_volume(20 + n))
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    common = ["batch", str(tmp_path / "in"), "--model", "test-model", "--prompt", "ball", "--option", "radius=9", "-q"]
    with worker_test_models():
        assert main(common + ["-o", str(tmp_path / "remote"), "--server", server.url, "--token", server.token]) == 1
        assert main(common + ["-o", str(tmp_path / "local")]) == 1
        assert main(common + ["-o", str(tmp_path / "x"), "--server", server.url, "--ray", "auto"]) == 2
    remote = json.loads((tmp_path / "remote" / "summary.json").read_text())
    statuses = {c["case"]: c["status"] for c in remote["cases"]} if isinstance(remote.get("cases"), list) else {
        name: c["status"] for name, c in remote["cases"].items()}
    assert statuses == {"broken": "failed", "case0": "ok", "case1": "ok", "case2": "ok"}
    for n in range(3):
        a, _ = nrrd.read(str(tmp_path / "remote" / f"case{n}.seg.nrrd"))
        b, _ = nrrd.read(str(tmp_path / "local" / f"case{n}.seg.nrrd"))
        assert a.any() and np.array_equal(a, b)


def test_the_client_says_when_an_image_is_over_the_servers_limits(remote):
    noise = np.random.default_rng(1).integers(0, 255, size=(20, 1024, 1024), dtype=np.uint8)  # 20 MB, packs > 16 MB
    volume = Volume(noise, np.eye(4))
    with pytest.raises(InputError, match="accepts in one request"):
        remote.echo(volume.array)
    with pytest.raises(InputError, match="accepts arrays up to 64 MiB"):
        remote.echo(np.zeros((80, 1024, 1024), np.uint8))
    assert remote.echo(np.arange(60, dtype=np.int16).reshape(3, 4, 5), threshold=30).sum() == 29


def test_doctor_checks_a_server_and_lists_its_models_state(server, capsys):
    from biomedseg.cli import main

    assert main(["doctor", "--server", server.url, "--token", server.token]) == 0
    out = capsys.readouterr().out
    assert "server transfer: ok" in out and "server version:" in out
    assert "on the server deepbet: ready" in out and "on the server test-model" in out
    assert main(["doctor", "--server", server.url, "--token", "wrong"]) == 1
    assert "server error: The server refused the token." in capsys.readouterr().out


def test_no_path_a_client_sends_is_opened(remote, tmp_path):
    marker = tmp_path / "child.pid"
    with pytest.raises(InputError, match="--weights cannot be sent"):
        remote.run(small_volume(13), "test-model", ["ball"], weights="/etc/passwd")
    with pytest.raises(InputError, match="'child_pid_file' is a path"):
        remote.run(small_volume(13), "test-model", ["ball"], options={"mode": "hang", "child_pid_file": str(marker)})
    assert not marker.exists()


def test_a_queued_or_unsent_job_is_cancelled_at_once_and_the_running_one_goes_on(remote):
    running = remote.submit(small_volume(14), "test-model", ["ball"], options={"mode": "slow", "steps": 60,
                                                                               "step_s": 0.05})
    queued = remote.submit(small_volume(15), "test-model", ["ball"])
    while running.state != "running":
        remote.poll(0.05)
    remote.cancel(queued)
    with pytest.raises(CancelledError):
        remote.wait(queued, timeout=20)
    assert not running.finished  # ended on the server's answer, not when its turn came
    unsent = remote.submit(small_volume(16), "test-model", ["ball"])
    remote.cancel(unsent)  # before the sender got to it, or while it uploads: never run
    with pytest.raises(CancelledError):
        remote.wait(unsent, timeout=20)
    with pytest.raises(BiomedSegError, match="busy"):  # a transfer check never waits behind jobs
        remote.echo(np.zeros((3, 3, 3), np.int16))
    assert remote.wait(running, timeout=60).segments


def test_malformed_array_headers_are_400s_and_the_token_file_stays_home(server, monkeypatch, tmp_path):
    import struct

    from biomedseg.remote import tokens

    headers = {**schema.client_headers(), "Authorization": f"Bearer {server.token}"}
    for header in (b"[" * 2000, b'{"codec": "blosc2", "dtype": [], "shape": [1], "nbytes": 1}'):
        body = arrays.MAGIC + struct.pack("<I", len(header)) + header
        response = requests.put(f"{server.url}/v1/arrays/{'0' * 64}", data=body, headers=headers, timeout=30)
        assert response.status_code == 400, response.text
    monkeypatch.setenv("BIOMEDSEG_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv(tokens.TOKEN_ENV, raising=False)
    token, _ = tokens.load_or_create()
    assert tokens.client_token(None, "http://127.0.0.1:8765") == token
    assert tokens.client_token(None, "https://gpu.example:8765") is None  # never sent to another host
