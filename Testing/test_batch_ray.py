"""`biomedseg batch --ray` on a two-CPU Ray cluster started here: the same outputs and summary as the
local worker, one model load per Ray worker process, and a worker killed mid-case is never a lost case."""
import json
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from biomedseg.cli import main  # noqa: E402
from conftest import standin_registered  # noqa: E402
from test_batch import small_image  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (starting one costs seconds), with the test models registered
    in the driver (the batch passes $BIOMEDSEG_EXTRA_MODELS on to its tasks)."""
    with standin_registered("test-model"):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def records(outdir) -> dict:
    return {r["case"]: r for r in json.loads((outdir / "summary.json").read_text())["cases"]}


def batch(inputs, out, *extra) -> int:
    return main(["batch", str(inputs), "-o", str(out), "--model", "test-model", "--prompt", "target, bright",
                 "-q", *extra])


def test_ray_gives_the_local_outputs_bit_for_bit_and_the_same_summary(cluster, tmp_path):
    import nrrd

    inputs = tmp_path / "in"
    inputs.mkdir()
    for n in range(4):
        small_image(inputs / f"case{n}.nii.gz", shape=(16 + n, 20, 18), seed=n)
    (inputs / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    assert batch(inputs, tmp_path / "local") == 1
    assert batch(inputs, tmp_path / "ray", "--ray", "auto") == 1
    local, remote = records(tmp_path / "local"), records(tmp_path / "ray")
    assert list(local) == list(remote) == ["case0", "case1", "case2", "case3", "corrupt"]
    same = ("status", "outcome", "segments", "absent", "settings_hash", "model", "model_version", "weights", "engine",
            "outputs", "device")
    for name in local:
        assert {k: local[name].get(k) for k in same} == {k: remote[name].get(k) for k in same}
    assert remote["corrupt"]["error"] == local["corrupt"]["error"] and remote["corrupt"]["status"] == "failed"
    for name in ("case0", "case1", "case2", "case3"):
        a, header_a = nrrd.read(str(tmp_path / "local" / f"{name}.seg.nrrd"))
        b, header_b = nrrd.read(str(tmp_path / "ray" / f"{name}.seg.nrrd"))
        assert np.array_equal(a, b) and a.any()
        assert {k: str(v) for k, v in header_a.items()} == {k: str(v) for k, v in header_b.items()}
    assert (tmp_path / "local" / "summary.csv").read_text().count("\n") == 6


def test_a_ray_worker_process_loads_the_model_once(cluster, tmp_path):
    """Each task reports its process and whether the model was warm there: after the first case on a
    process, every later case on it found the model loaded."""
    for n in range(6):
        small_image(tmp_path / f"c{n}.nii.gz", seed=n)
    assert batch(tmp_path, tmp_path / "out", "--ray", "auto") == 0
    by_pid: dict = {}
    for record in sorted(records(tmp_path / "out").values(), key=lambda r: r["finished"]):
        by_pid.setdefault(record["worker"]["pid"], []).append(record["worker"]["warm"])
    assert max(len(runs) for runs in by_pid.values()) >= 2  # six cases on two CPUs: processes are reused
    for runs in by_pid.values():
        assert all(runs[1:])
    # resumed on Ray: nothing runs again
    assert batch(tmp_path, tmp_path / "out", "--ray", "auto") == 0
    assert {r["status"] for r in records(tmp_path / "out").values()} == {"skipped"}


def _kill_first_running_case(killed: list, timeout: float = 30.0) -> None:
    """SIGKILL the first Ray worker process seen running a case (its title is 'ray::run_case'), once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not killed:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if (proc.info["cmdline"] or [""])[0].startswith("ray::run_case"):
                time.sleep(0.3)  # well inside the case's two seconds of model run
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    continue
                killed.append(proc.info["pid"])
                return
        time.sleep(0.05)


def test_a_worker_killed_mid_case_is_retried_on_a_fresh_process(cluster, tmp_path):
    small_image(tmp_path / "slow.nii.gz")
    (tmp_path / "cases.json").write_text(json.dumps([
        {"input": "slow.nii.gz", "options": {"mode": "slow", "steps": 20, "step_s": 0.1}}]))
    killed: list = []
    killer = threading.Thread(target=_kill_first_running_case, args=(killed,))
    killer.start()
    try:
        rc = batch(tmp_path / "cases.json", tmp_path / "out", "--ray", "auto")
    finally:
        killer.join()
    slow = records(tmp_path / "out")["slow"]
    assert len(killed) == 1
    assert rc == 0 and slow["status"] == "ok" and slow["worker"]["pid"] != killed[0]
    assert (tmp_path / "out" / "slow.seg.nrrd").is_file() and slow["segments"]["target"]["voxels"] > 0


def test_a_case_whose_worker_dies_twice_is_recorded_and_the_others_finish(cluster, tmp_path):
    small_image(tmp_path / "crash.nii.gz")
    small_image(tmp_path / "fine.nii.gz", seed=1)
    (tmp_path / "cases.json").write_text(json.dumps([
        {"input": "crash.nii.gz", "options": {"mode": "crash", "crash_at": 0}}, {"input": "fine.nii.gz"}]))
    rc = batch(tmp_path / "cases.json", tmp_path / "out", "--ray", "auto")
    got = records(tmp_path / "out")
    assert rc == 1 and got["fine"]["status"] == "ok"
    crash = got["crash"]
    assert crash["status"] == "failed" and crash["error"]["kind"] == "worker_crashed"
    assert "died twice" in crash["error"]["message"] and not (tmp_path / "out" / "crash.seg.nrrd").exists()
