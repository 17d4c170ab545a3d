"""`doctor`: Python, torch, devices, memory, model readiness and (optionally) a live worker or server."""
from __future__ import annotations

import json
import platform
import sys
import time

from .. import __version__
from ..errors import BiomedSegError


def doctor_report() -> dict:
    import os

    from ..catalog import load_catalog

    report = {"biomedseg": __version__, "python": sys.version.split()[0], "executable": sys.executable,
              "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        import psutil

        vm = psutil.virtual_memory()
        report["memory_total_gb"] = round(vm.total / 2**30, 1)
        report["memory_available_gb"] = round(vm.available / 2**30, 1)
    except ImportError:
        report["memory_total_gb"] = None
    try:
        import torch

        report["torch"] = torch.__version__
        report["torch_cuda_build"] = torch.version.cuda
        report["cuda_devices"] = [
            {"index": i, "name": torch.cuda.get_device_name(i),
             "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        report["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        from ..runtime.device import resolve_device

        report["default_device"] = "{} - {}".format(*resolve_device("auto"))
    except ImportError:
        report["torch"] = None
        report["default_device"] = "none: torch is not installed (pip install torch)"
    report["models"] = {e.id: e.state() for e in load_catalog()}
    from ..catalog import PROBLEMS

    if PROBLEMS:
        report["catalogue_problems"] = list(PROBLEMS)
    return report


def worker_report(python: str | None) -> dict:
    """Start a worker with ``python`` and check it answers and moves data through shared memory."""
    import numpy as np

    from ..worker.client import WorkerClient

    client = WorkerClient(python=python, startup_timeout=60)
    try:
        started = time.perf_counter()
        pong = client.request("ping", timeout=60)
        array = np.arange(64 * 64 * 64, dtype=np.int16).reshape(64, 64, 64) - 1000
        ok = bool(np.array_equal(client.echo(array), (array > 0).astype(np.uint8)))
        return {"python": client.python, "pid": pong["pid"], "shared_memory": "ok" if ok else "WRONG DATA",
                "round_trip_s": round(time.perf_counter() - started, 3)}
    except BiomedSegError as err:
        return {"python": client.python, "error": str(err)}
    except (OSError, TimeoutError) as exc:
        return {"python": client.python, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        client.close()


def server_report(url: str, token: str | None, ca_cert: str | None = None) -> dict:
    """Reach a `biomedseg serve` server: handshake (token, version), an array through its worker and back,
    its queue, warm models and each model's state there."""
    import numpy as np

    from ..remote.client import RemoteWorkerClient

    try:
        client = RemoteWorkerClient(url, token, verify=ca_cert or True)
    except BiomedSegError as err:
        return {"url": url, "error": str(err)}
    try:
        started = time.perf_counter()
        client.start()
        array = np.arange(64 * 64 * 64, dtype=np.int16).reshape(64, 64, 64) - 1000
        ok = bool(np.array_equal(client.echo(array), (array > 0).astype(np.uint8)))
        status = client.request("status")
        return {"url": url, "version": client.hello["version"], "transfer": "ok" if ok else "WRONG DATA",
                "round_trip_s": round(time.perf_counter() - started, 3), "queued": status["queued"],
                "running": status["running"], "warm": ", ".join(w["model"] for w in status["warm"]) or "none",
                "models": {m["id"]: m["state"] for m in client.request("models")["models"]}}
    except BiomedSegError as err:
        return {"url": url, "error": f"{err.message} {err.hint or ''}".strip()}
    finally:
        client.close()


def cmd_doctor(args) -> int:
    report = doctor_report()
    if args.worker:
        report["worker"] = worker_report(args.worker_python)
    if getattr(args, "server", None):
        report["server"] = server_report(args.server, args.token, args.ca_cert)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if key in ("models", "cuda_devices"):
            continue
        print(f"{key:>20}: {value}")
    for dev in report.get("cuda_devices") or []:
        print(f"{'cuda:' + str(dev['index']):>20}: {dev['name']} ({dev['memory_gb']} GB)")
    print()
    for model_id, state in report["models"].items():
        print(f"{model_id:>20}: {state['state']} - {state['detail']}")
    if "worker" in report:
        print()
        for key, value in report["worker"].items():
            print(f"{'worker ' + key:>20}: {value}")
    if "server" in report:
        print()
        for key, value in report["server"].items():
            if key != "models":
                print(f"{'server ' + key:>20}: {value}")
        for model_id, state in report["server"].get("models", {}).items():
            print(f"{'on the server ' + model_id:>20}: {state['state']} - {state['detail']}")
    return 1 if any("error" in report.get(k, {}) for k in ("worker", "server")) else 0
