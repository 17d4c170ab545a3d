"""Cases on a Ray cluster: one task per case, the engine in the task's process, masks back to the driver.

- Each Ray worker process keeps its models warm (``engine.loading``) across the tasks it runs, so
  a model loads once per process, not once per case; ``max_calls=0`` keeps GPU workers alive
  between tasks (Ray's default ends them after one).
- Resources per task follow the model: a GPU when the model runs on CUDA and the cluster has GPUs
  (``--ray-gpus-per-case`` / ``--ray-cpus-per-case`` override); a task without a GPU runs on the CPU.
- A worker process that dies is retried once by Ray (``max_retries=1``); a case that fails twice is
  recorded with Ray's error. Errors of the case itself (a corrupt file, a bad prompt) come back as
  values and are recorded once (``retry_exceptions=False``).
- The driver reads each image (the checks `segment` runs need it) shortly before its task is sent,
  keeping only a few cases in flight, and writes every output itself.
"""
from __future__ import annotations

import os
import socket
import time

from ..errors import DependencyMissingError, InputError
from .jobs import BatchSettings, CaseJob, read_checked, replace_allowed
from .outputs import error_dict, failed_record, write_case

#: what the driver's environment says about the catalogue and weights, passed on to the tasks
FORWARDED_ENV = ("BIOMEDSEG_EXTRA_MODELS", "BIOMEDSEG_WEIGHTS_DIR", "BIOMEDSEG_MAX_WARM")


def import_ray():
    try:
        import ray
    except ImportError:
        raise DependencyMissingError("--ray needs Ray, which is not installed in this Python environment.",
                                     hint="pip install 'biomedseg[cluster]' (or pip install ray), or leave out "
                                          "--ray to run the cases here.") from None
    return ray


def run_case(volume, model_id: str, prompts: list, request: dict) -> dict:
    """The Ray task: segment one case in this process (its models stay warm for the next task here).
    Returns the result, or the case's error as a value, with the process and whether the model was warm."""
    from ..engine import segment
    from ..engine.loading import warm_models

    warm = any(m["model"] == model_id for m in warm_models())
    where = {"pid": os.getpid(), "host": socket.gethostname(), "warm": warm}
    try:
        result = segment(volume, model_id, prompts, **request)
    except Exception as exc:  # noqa: BLE001 -- the case's error, recorded by the driver; never retried
        return {"error": error_dict(exc), "worker": where}
    result.probabilities = {}
    return {"result": result, "worker": where}


def task_resources(entry, device: str, cluster: dict, gpus: float | None, cpus: float | None) -> tuple[float, float]:
    """(num_cpus, num_gpus) per case: a GPU for a CUDA model on a cluster that has GPUs (always for a
    CUDA-only model), none for --device cpu or a CPU-only model."""
    devices = entry.data.get("devices") or ["cpu"]
    on_cuda = device.startswith("cuda") or (device == "auto" and "cuda" in devices and cluster.get("GPU", 0) > 0)
    on_cuda = on_cuda or devices == ["cuda"]
    num_gpus = float(gpus) if gpus is not None else (1.0 if on_cuda and device != "cpu" else 0.0)
    num_cpus = float(cpus) if cpus is not None else 1.0
    if num_gpus > 0 and cluster.get("GPU", 0) < num_gpus:
        raise InputError(f"Each case of model '{entry.id}' asks for {num_gpus:g} GPU, but the Ray cluster has "
                         f"{cluster.get('GPU', 0):g}.", hint="Add a GPU node, or run on CPUs with --device cpu "
                                                             "(if the model runs there) or --ray-gpus-per-case 0.")
    if num_cpus > cluster.get("CPU", 0):
        raise InputError(f"Each case asks for {num_cpus:g} CPUs, but the Ray cluster has {cluster.get('CPU', 0):g}.",
                         hint="Lower --ray-cpus-per-case.")
    return num_cpus, num_gpus


def connect(address: str, cpus: int | None):
    """ray.init for ``address`` ('auto', 'ray://...', 'HOST:PORT', or 'local' to start one here with
    ``cpus``); an existing connection is used as it is. Returns (ray, whether we connected)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    kwargs = {"include_dashboard": False, "log_to_driver": False} if address == "local" else {"log_to_driver": False}
    if address == "local":
        ray.init(num_cpus=cpus, **kwargs)
    else:
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise InputError(f"No Ray cluster at {address!r}: {str(exc).splitlines()[0][:200]}",
                             hint="Start one with `ray start --head` (then --ray auto), or use --ray local.") from None
    return ray, True


def run_ray(jobs: list[CaseJob], s: BatchSettings, summary, region, events, address: str = "auto",
            cpus: int | None = None, gpus_per_case: float | None = None, cpus_per_case: float | None = None) -> None:
    """Run ``jobs`` on the cluster, recording each case in ``summary`` as it finishes."""
    from ..catalog import get_model

    ray, connected = connect(address, cpus)
    try:
        cluster = ray.cluster_resources()
        num_cpus, num_gpus = task_resources(get_model(s.model), s.device, cluster, gpus_per_case, cpus_per_case)
        device = "cpu" if num_gpus == 0 and s.device == "auto" else s.device
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1, retry_exceptions=False, max_calls=0,
                          runtime_env={"env_vars": env} if env else None)(run_case)
        slots = int(cluster.get("GPU", 0) // num_gpus) if num_gpus else int(cluster.get("CPU", 1) // max(num_cpus, 1e-3))
        _drive(ray, task, jobs, s, summary, region, events, device, in_flight=max(2, 2 * max(1, min(slots, 10 ** 4))))
    finally:
        if connected:
            ray.shutdown()


def _drive(ray, task, jobs, s, summary, region, events, device, in_flight: int) -> None:
    """Keep ``in_flight`` cases submitted; write and record each as it comes back."""
    queue = list(jobs)
    pending: dict = {}
    while queue or pending:
        while queue and len(pending) < in_flight:
            job = queue.pop(0)
            started = time.perf_counter()
            events.case_started(job.case.name)
            try:
                owned = summary.owns(job.case.name)
                volume, decisions, warnings, read_s = read_checked(job, s, owned)
                request = {**job.request(s, region), "device": device}
                ref = task.remote(volume, s.model, job.prompts, request)
            except Exception as exc:  # noqa: BLE001 -- this case's error; the others go on
                _record(summary, events, failed_record(job.case.name, job.case.input, job, s, exc,
                                                       time.perf_counter() - started))
                continue
            pending[ref] = (job, volume, decisions, warnings, {"read": read_s}, started, owned, time.perf_counter())
        if not pending:
            break
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            _record(summary, events, _finish(ray, ref, pending.pop(ref), s, region))


def _finish(ray, ref, context, s, region) -> dict:
    job, volume, decisions, warnings, times, started, owned, sent = context
    try:
        reply = ray.get(ref)
    except Exception as exc:  # noqa: BLE001 -- the task failed twice (its worker died), or Ray could not run it
        return failed_record(job.case.name, job.case.input, job, s, _ray_error(exc), time.perf_counter() - started)
    if "error" in reply:
        return failed_record(job.case.name, job.case.input, job, s, reply["error"], time.perf_counter() - started,
                             worker=reply["worker"])
    try:
        times = {**times, "run": time.perf_counter() - sent}
        return write_case(job, s, volume, reply["result"], decisions, warnings, times, started, region,
                          replace_allowed(job, s, owned), worker=reply["worker"])
    except Exception as exc:  # noqa: BLE001 -- a write that failed (disk full...) fails this case only
        return failed_record(job.case.name, job.case.input, job, s, exc, time.perf_counter() - started)


def _ray_error(exc: Exception):
    """Ray's error as one of ours: a dead worker is ``worker_crashed``, with Ray's first line."""
    from ..errors import BiomedSegError, WorkerCrashedError

    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    name = type(exc).__name__
    if "WorkerCrashed" in name or "NodeDied" in name or "ActorDied" in name or "OutOfMemory" in name:
        return WorkerCrashedError(f"The Ray worker running this case died twice ({name}: {first}).",
                                  hint="See the Ray logs of the node (e.g. /tmp/ray/session_latest/logs).")
    return BiomedSegError(f"Ray could not run this case ({name}: {first}).")


def _record(summary, events, record: dict) -> None:
    summary.record(record)
    events.case_done(summary.records[record["case"]])

