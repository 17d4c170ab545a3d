"""`biomedseg env create NAME [--dry-run] [--prefix PATH] [--python PY]`: a model's own Python environment.

Some models run only with their authors' exact packages (UniBiomed's remote code: transformers
4.44.2, torch 2.3.1 with CUDA, flash-attn where it builds), which the engine's own environment and
Slicer's Python must never be bent to. Such a model's model.json names an ``environment`` (its
pins live there, in one place); this command makes a virtual environment with them, makes this
engine importable in it (a ``.pth`` file naming the folder that holds ``biomedseg``), checks the
installed versions and records it in ``<cache>/envs/NAME.json``. From then on the CLI starts that
model's worker with the environment's Python (``worker_python_for``), and the catalogue checks the
model's packages there, not here.

Optional packages (flash-attn) are tried last, each on its own: a failure is reported and the
environment is still made. ``--dry-run`` prints the pins and the exact commands without running them.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..catalog import (environment_python, environment_record_path, get_model, inside_environment, load_catalog,
                       nvidia_gpu)
from ..errors import DependencyMissingError, InputError
from ..runtime.weights import cache_dir

#: What the worker imports besides a model's packages (its pinned ones win): the engine's own needs.
ENGINE_DEPENDENCIES = ["numpy", "scipy", "psutil", "jsonschema", "nibabel", "SimpleITK", "pynrrd", "pillow",
                       "huggingface_hub"]
#: The last step, in the new environment: ``check_installed`` of the pins, printed as one JSON line.
CHECK_CODE = "import sys; from biomedseg.cli.environments import check_main; sys.exit(check_main(sys.argv[1]))"
#: Writes ``biomedseg_engine.pth`` (the engine's folder) into the environment's site-packages.
PTH_CODE = ('import pathlib, sys, sysconfig; '
            'pathlib.Path(sysconfig.get_paths()["purelib"], "biomedseg_engine.pth").write_text(sys.argv[1] + "\\n")')
@dataclass
class EnvStep:
    description: str
    argv: list[str]
    optional: bool = False


@dataclass
class EnvPlan:
    name: str
    model: str
    prefix: Path
    python: str
    pins: list[str]
    steps: list[EnvStep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def engine_root() -> Path:
    """The folder that holds the ``biomedseg`` package (what the worker puts on its path)."""
    return Path(__file__).resolve().parents[2]


def environment_entry(name: str):
    """The catalogue entry whose ``environment`` is NAME (or whose id is NAME and has one)."""
    for entry in load_catalog():
        env = entry.data.get("environment")
        if env and (env["name"] == name or entry.id == name):
            return entry
    names = sorted({e.data["environment"]["name"] for e in load_catalog() if e.data.get("environment")})
    raise InputError(f"No model has an environment called '{name}'.",
                     hint=f"Environments: {', '.join(names) or 'none'}.")


def env_python_path(prefix: Path) -> str:
    return str(prefix / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))


def _key(requirement: str) -> str:
    return requirement.split("==")[0].split(">")[0].split("<")[0].strip().lower().replace("_", "-")


def _python_version(python: str) -> str:
    if Path(python).resolve() == Path(sys.executable).resolve():
        return f"{sys.version_info[0]}.{sys.version_info[1]}"
    try:
        out = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InputError(f"The Python '{python}' cannot be run ({exc}).") from None
    return out.stdout.strip()


def plan_environment(name: str, prefix: str | os.PathLike | None = None, base_python: str | None = None) -> EnvPlan:
    """The commands that make environment NAME (nothing is run)."""
    entry = environment_entry(name)
    spec = entry.data["environment"]
    prefix = Path(prefix).expanduser().absolute() if prefix else cache_dir() / "envs" / spec["name"]
    base = base_python or sys.executable
    version = _python_version(base)
    if version not in spec["python"]:
        raise InputError(f"The environment '{spec['name']}' needs Python {', '.join(spec['python'])} (the authors' "
                         f"torch has wheels for those); '{base}' is Python {version or 'of an unknown version'}.",
                         hint="Pass another interpreter with --python, e.g. --python python3.10.")
    py = env_python_path(prefix)
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    pinned = spec["torch"] + spec["packages"]
    engine = [r for r in ENGINE_DEPENDENCIES if _key(r) not in {_key(p) for p in pinned}]
    plan = EnvPlan(spec["name"], entry.id, prefix, py, pinned)
    plan.steps.append(EnvStep(f"Create the environment in {prefix} (Python {version})", [base, "-m", "venv", str(prefix)]))
    torch_pip = pip + (["--index-url", spec["torch_index"]] if spec.get("torch_index") else [])
    plan.steps.append(EnvStep(f"Install {', '.join(spec['torch'])}" + (f" from {spec['torch_index']}" if
                                                                        spec.get("torch_index") else ""),
                              torch_pip + spec["torch"]))
    plan.steps.append(EnvStep(f"Install the authors' pins and the engine's packages ({', '.join(engine)})",
                              pip + spec["packages"] + engine))
    for extra in spec.get("optional", []):
        if extra.get("needs"):
            plan.steps.append(EnvStep(f"Install what {', '.join(extra['packages'])} builds with (optional)",
                                      pip + extra["needs"], optional=True))
        plan.steps.append(EnvStep(f"Install {', '.join(extra['packages'])} (optional: {extra['why']})",
                                  pip + extra.get("pip_args", []) + extra["packages"], optional=True))
    plan.steps.append(EnvStep("Make this engine importable there", [py, "-c", PTH_CODE, str(engine_root())]))
    plan.steps.append(EnvStep("Check the installed versions, CUDA and the engine",
                              [py, "-c", CHECK_CODE, json.dumps(pinned)]))
    gpu, why = nvidia_gpu()
    if not gpu:
        plan.notes.append(f"{entry.id} runs only on an NVIDIA GPU, and {why}: the environment can be made, but the "
                          "model will not run on this machine")
    return plan


def describe(plan: EnvPlan) -> str:
    lines = [f"environment '{plan.name}' for model '{plan.model}' in {plan.prefix}", "pins:"]
    lines += [f"  {pin}" for pin in plan.pins]
    lines.append("commands:")
    for n, step in enumerate(plan.steps, 1):
        lines.append(f"  {n}. {step.description}")
        lines.append(f"     {shlex.join(step.argv)}")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def _clean_env() -> dict:
    """This process's environment without what points a Python at another one's packages (the variables
    ``panel.worker_python`` drops for Slicer; the CLI may not import the panel)."""
    env = dict(os.environ)
    for name in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "PYTHONNOUSERSITE",
                 "__PYVENV_LAUNCHER__", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def run_plan(plan: EnvPlan, echo=print) -> dict:
    """Run the steps; the record of the environment (also written to ``<cache>/envs/NAME.json``).

    A required step that fails stops with DependencyMissingError (nothing is recorded, so the model is not
    switched to a half-made environment); an optional one is reported and skipped."""
    optional, check = {}, {}
    env = _clean_env()
    for n, step in enumerate(plan.steps, 1):
        echo(f"[{n}/{len(plan.steps)}] {step.description}")
        last = step is plan.steps[-1]  # the check: its JSON line is read, not shown
        done = subprocess.run(step.argv, env=env, capture_output=last, text=True)
        if last:
            try:
                check = json.loads(done.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                check = {}
            if done.returncode and done.stderr:
                echo(done.stderr.strip()[-2000:])
        if done.returncode == 0:
            if step.optional:
                optional[step.description] = "installed"
            continue
        if step.optional:
            optional[step.description] = f"failed (exit {done.returncode})"
            echo(f"    optional step failed (exit {done.returncode}); the environment is made without it")
            continue
        what = f"; versions that differ: {check.get('mismatch')}" if check.get("mismatch") else ""
        raise DependencyMissingError(f"Making the environment '{plan.name}' failed at step {n} ({step.description}, "
                                     f"exit {done.returncode}){what}.",
                                     hint=f"Nothing was recorded; {plan.prefix} is incomplete. Fix the cause shown "
                                          "above and run the command again.")
    record = {"name": plan.name, "model": plan.model, "prefix": str(plan.prefix), "python": plan.python,
              "pins": plan.pins, "optional": optional, "check": check, "engine_root": str(engine_root()),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = environment_record_path(plan.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def worker_python_for(model_id: str, explicit: str | None = None) -> str | None:
    """The Python to start the worker with for ``model_id``: ``explicit`` (--worker-python) if given, the
    model's own environment if it has one (a clear error when that is not made yet), else None (default)."""
    if explicit:
        return explicit
    entry = get_model(model_id)
    env = entry.data.get("environment")
    if not env or inside_environment(env["name"]):
        return None
    state = entry.state()
    if state["state"] == "needs an NVIDIA GPU":
        raise DependencyMissingError(f"Model '{model_id}' needs an NVIDIA GPU: {state['detail']}.",
                                     hint="Run it on a machine with an NVIDIA GPU.")
    python = environment_python(env["name"])
    if python is None:
        raise DependencyMissingError(f"Model '{model_id}' runs in a Python environment of its own, which is not on "
                                     "this machine yet.", hint=f"run biomedseg env create {env['name']}")
    return python


def cmd_env(args) -> int:
    plan = plan_environment(args.name, args.prefix, args.python)
    if args.dry_run:
        print(describe(plan))
        return 0
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    record = run_plan(plan, echo=lambda line: print(line, file=sys.stderr))
    for step, outcome in record["optional"].items():
        print(f"{step}: {outcome}")
    print(f"environment '{plan.name}' ready: {plan.python} (recorded in {environment_record_path(plan.name)})")
    if record["check"] and not record["check"].get("cuda"):
        print("warning: CUDA is not usable in this environment; the model will not run here.", file=sys.stderr)
    return 0


def add_env_parser(sub) -> None:
    """``biomedseg env create``: registered by ``cli.build_parser``."""
    p = sub.add_parser("env", help="make a model's own Python environment (its authors' pins)")
    actions = p.add_subparsers(dest="env_command", required=True)
    c = actions.add_parser("create", help="create the environment NAME (e.g. unibiomed) with its pins")
    c.add_argument("name", help="the environment (a model's model.json names it), e.g. unibiomed")
    c.add_argument("--dry-run", action="store_true", help="print the pins and the exact commands; run nothing")
    c.add_argument("--prefix", help="where to make it (default: <cache>/envs/NAME)")
    c.add_argument("--python", help="the Python to make it from (default: this one)")
    c.set_defaults(func=cmd_env)


def check_installed(pins: list[str]) -> dict:
    """Run inside a new environment (its last step): every pin's installed version, the ones that differ,
    whether torch sees CUDA, and where the engine was imported from."""
    from importlib import metadata

    found, bad = {}, {}
    for spec in pins:
        name, want = spec.split("==")
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        found[name] = have
        if have is None or have.split("+")[0] != want:
            bad[name] = have
    try:
        import torch

        cuda = bool(torch.cuda.is_available())
    except ImportError:
        cuda = False
    return {"versions": found, "mismatch": bad, "cuda": cuda, "engine": str(engine_root())}


def check_main(pins_json: str) -> int:
    report = check_installed(json.loads(pins_json))
    print(json.dumps(report))
    return 1 if report["mismatch"] else 0
