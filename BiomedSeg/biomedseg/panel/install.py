"""First-run installs and downloads: what to install where, and the flow the panel follows.

Nothing here may replace a package of Slicer's own Python. Into Slicer's Python, PyTorch goes
through the PyTorch extension's installer and everything else through pip under constraints
that pin every installed package; otherwise a separate environment is created and the worker
is switched to it. ``InstallFlow`` makes every decision of the module's Install and Download
buttons, so the module only shows its questions, runs the PyTorch extension and drives the timer.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..catalog import get_model
from ..errors import BiomedSegError, InputError
from .background_steps import BackgroundSteps
from .messages import PanelMessage, Progress
from .worker_python import isolated_environment, same_python, with_engine_on_path

#: What the worker's own Python needs besides torch and the model's packages.
WORKER_REQUIREMENTS = ["numpy", "scipy", "psutil", "jsonschema", "nibabel", "SimpleITK", "huggingface_hub"]
#: What the panel itself needs in Slicer's Python (import name -> pip name); numpy, SimpleITK,
#: VTK and Qt come with Slicer.
ENGINE_PACKAGES = {"jsonschema": "jsonschema", "psutil": "psutil", "nibabel": "nibabel", "nrrd": "pynrrd",
                   "slicerio": "slicerio", "scipy": "scipy", "SimpleITK": "SimpleITK"}


def missing_engine_packages(packages: dict[str, str] | None = None) -> list[str]:
    """pip names of the packages the panel needs (``ENGINE_PACKAGES``) that this Python lacks."""
    import importlib
    import importlib.util

    importlib.invalidate_caches()  # packages installed by a background pip since the last look
    packages = ENGINE_PACKAGES if packages is None else packages
    return [pip for name, pip in packages.items() if importlib.util.find_spec(name) is None]


# ---- plans ---------------------------------------------------------------------------------

@dataclass
class Step:
    """One step of an install: a command run in the background, or a step the panel does itself."""

    description: str
    argv: list[str] | None = None
    #: 'command' (argv), or 'pytorch_utils' (the PyTorch extension's installer, run by the panel).
    kind: str = "command"
    #: Run in the isolated environment (another Python than Slicer's) rather than Slicer's own.
    isolated: bool = False


@dataclass
class InstallPlan:
    steps: list[Step]
    packages: list[str]
    #: The worker Python to use once the plan ran (a new environment), or None to keep the current one.
    worker_python: str | None
    summary: str


def constraints_for_installed() -> str:
    """pip constraints pinning every package this Python already has (Slicer's own ones).

    With them, pip can add packages but must fail rather than upgrade or downgrade one.
    """
    from importlib import metadata

    pins = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").strip()
        if name and dist.version and not dist.version.endswith("+local"):
            pins[name.lower()] = f"{name}=={dist.version}"
    return "\n".join(sorted(pins.values())) + "\n"


def env_python(env_dir: str | os.PathLike) -> str:
    env_dir = Path(env_dir)
    return str(env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))


def missing_requirements(model_id: str, worker_python: str = "", timeout: float = 30.0,
                         env: dict | None = None) -> list[str]:
    """Packages the model needs that the worker's Python lacks (all of them if it cannot be asked)."""
    entry = get_model(model_id)
    if not worker_python or same_python(worker_python, sys.executable):
        return entry.missing_requirements()
    code = ("import importlib.util, sys; print(' '.join(n for n in sys.argv[1:] "
            "if importlib.util.find_spec(n) is None))")
    try:
        out = subprocess.run([worker_python, "-c", code, *entry.data["requires"]], capture_output=True, text=True,
                             timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return list(entry.data["requires"])
    return out.stdout.split() if out.returncode == 0 else list(entry.data["requires"])


def install_plan(model_id: str | None, missing: list[str], *, python: str, pytorch_utils: bool = False,
                 env_dir: str | os.PathLike | None = None, base_python: str | None = None,
                 constraints_file: str | os.PathLike | None = None) -> InstallPlan:
    """How to install what a model is missing, without replacing Slicer's own packages.

    Into Slicer's Python (``python``): torch through the PyTorch extension's installer when it
    is there, everything else with constraints that pin every installed package. Into a
    separate environment (``env_dir``, created from ``base_python``): everything, and the
    worker is switched to run there. Packages that only carry a model's weights (deepbet)
    are installed without their dependencies, which the engine never imports.
    """
    weights = get_model(model_id).weights if model_id else {}
    weights_package = weights.get("package") if weights.get("source") == "package" else None
    missing = list(dict.fromkeys(missing))
    steps: list[Step] = []
    if env_dir is not None:
        target = env_python(env_dir)
        base = base_python or sys.executable
        if not Path(target).exists():
            steps.append(Step(f"Create a separate Python environment in {env_dir}", [base, "-m", "venv", str(env_dir)],
                              isolated=not same_python(base, python)))
        pip = [target, "-m", "pip", "install", "--disable-pip-version-check"]
        rest = [p for p in dict.fromkeys(WORKER_REQUIREMENTS + missing) if p not in ("torch", weights_package)]
        steps.append(Step("Install PyTorch in the separate environment", pip + ["torch"], isolated=True))
        steps.append(Step(f"Install {', '.join(rest)}", pip + rest, isolated=True))
        if weights_package:
            steps.append(Step(f"Install {weights_package} (model files only)", pip + ["--no-deps", weights_package],
                              isolated=True))
        packages = ["torch"] + rest + ([weights_package] if weights_package else [])
        summary = (f"BiomedSeg will create a separate Python environment in {env_dir} and install "
                   f"{', '.join(packages)} there (several GB with PyTorch). The model runs in that environment; "
                   "Slicer's own Python is not changed.")
        return InstallPlan(steps, packages, target, summary)
    if "torch" in missing and not pytorch_utils:
        raise InputError("PyTorch is missing and the PyTorch extension is not installed, so it cannot be added "
                         "to Slicer's Python safely.",
                         hint="Install the 'PyTorch' extension from the Extensions Manager and restart Slicer, "
                              "or let BiomedSeg create a separate environment for the worker.")
    if "torch" in missing:
        steps.append(Step("Install PyTorch with the PyTorch extension", None, "pytorch_utils"))
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    if constraints_file is not None:
        pip += ["--constraint", str(constraints_file)]
    rest = [p for p in missing if p not in ("torch", weights_package)]
    if rest:
        steps.append(Step(f"Install {', '.join(rest)} (Slicer's packages kept as they are)", pip + rest))
    if weights_package and weights_package in missing:
        steps.append(Step(f"Install {weights_package} (model files only)", pip + ["--no-deps", weights_package]))
    packages = [p for p in missing]
    who = f"Model '{model_id}'" if model_id else "BiomedSeg"
    summary = (f"{who} needs {', '.join(packages)} in Slicer's Python. BiomedSeg will install "
               + ("PyTorch with the PyTorch extension and " if "torch" in missing else "")
               + "the rest with pip, pinned so that none of Slicer's own packages is replaced.")
    return InstallPlan(steps, packages, None, summary)


DOWNLOAD_CODE = ("import sys; from biomedseg.catalog import get_model;"
                 "from biomedseg.runtime.weights import resolve_weights;"
                 "paths = resolve_weights(get_model(sys.argv[1]).weights, offline=False);"
                 "print('downloaded', *paths)")


def download_plan(model_id: str, python: str, isolated: bool = False) -> InstallPlan:
    """Downloading a model's weights in the worker's Python (where huggingface_hub lives)."""
    entry = get_model(model_id)
    spec = entry.weights
    size = f" ({spec['size_bytes'] / 1e9:.1f} GB)" if spec.get("size_bytes") else ""
    gated = (" The repository is gated: accept the licence on its hub page and log in first (hf auth login or "
             "HF_TOKEN).") if spec.get("gated") else ""
    summary = (f"Download the weights of '{model_id}' ({', '.join(spec['files'])} from {spec.get('repo', '?')}"
               f"{size}, licence {spec.get('license', 'unknown')}).{gated}")
    return InstallPlan([Step(f"Download {', '.join(spec['files'])}{size}", [python, "-c", DOWNLOAD_CODE, model_id],
                             isolated=isolated)], [], None, summary)


def hub_cache_bytes(spec: dict) -> int:
    """Bytes of a hub repository already in the local cache (finished and partial files)."""
    root = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or
                                                         Path.home() / ".cache" / "huggingface") / "hub")
    folder = root / ("models--" + spec.get("repo", "").replace("/", "--")) / "blobs"
    try:
        return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    except OSError:
        return 0


def weights_progress(model_id: str) -> Callable[[], int | None]:
    """Percent of a hub model's weights already downloaded (for the download progress bar)."""
    spec = get_model(model_id).weights
    total = spec.get("size_bytes")
    start = hub_cache_bytes(spec)

    def percent():
        if not total:
            return None
        return int(min(99, 100 * max(0, hub_cache_bytes(spec) - start) / total))

    return percent


# ---- the flow behind the panel's Install and Download buttons ----------------------------------

INSTALL_TITLE = "BiomedSeg: install dependencies"
DOWNLOAD_TITLE = "BiomedSeg: download weights"


@dataclass
class Question:
    """One OK/Cancel question the panel asks before a plan runs."""

    text: str
    #: Saying no also forgets the action waiting for the install (a pressed Segment). The last
    #: question before a model's install or download does; the earlier ones leave it waiting.
    forgets_pending: bool = True


@dataclass
class InstallOffer:
    """What the panel asks, in order, and the plan it runs once every answer is yes."""

    title: str
    plan: InstallPlan
    questions: list[Question] = field(default_factory=list)
    #: Said instead of asking when the model has everything already (then the model list is refreshed).
    nothing_to_do: str = ""
    #: The model whose weights the plan downloads: the progress bar follows their bytes in the hub cache.
    weights_of: str | None = None
    #: False for the panel's own packages: once they are in, the models are refreshed and nothing is re-run.
    keeps_pending: bool = True


@dataclass
class InstallFinish:
    """What the panel does once a plan has ended."""

    state: str  # done, failed, cancelled
    #: Switch the worker to this Python (the separate environment the plan made), or None.
    worker_python: str | None = None
    refresh_models: bool = False
    status: str = ""
    #: The action that waited for the install: re-run it if the chosen model is ready now.
    pending: object = None
    message: PanelMessage | None = None
    #: The steps' output, for the Python console when a step failed.
    log: str = ""


@dataclass
class InstallPoll:
    progress: Progress
    finish: InstallFinish | None = None


def _step_list(plan: InstallPlan) -> str:
    return "\n".join(f"• {step.description}" for step in plan.steps)


class InstallFlow:
    """The decisions behind the panel's Install and Download buttons, without Qt or Slicer.

    ``slicer_python``: Slicer's own Python (PythonSlicer), the worker's default.
    ``engine_root``: the folder holding ``biomedseg``, put on PYTHONPATH for steps that import it.
    ``pytorch_extension``: whether the PyTorch extension is installed (a bool, or a callable asked
    each time a plan is made). ``startup_env``: Slicer's startup environment, the base for any other
    Python. ``environ``: the environment of steps in Slicer's Python (default: this process's).
    ``env_dir``: where a separate environment is created (default: the BiomedSeg cache).

    The module sets ``pending`` to the action that waits for an install (Segment), asks the
    offer's questions, calls ``start`` and then ``poll`` from its timer until it gets a finish.
    """

    def __init__(self, slicer_python: str = "", engine_root: str | os.PathLike | None = None,
                 pytorch_extension: bool | Callable[[], bool] = False, startup_env: dict | None = None,
                 environ: dict | None = None, env_dir: str | os.PathLike | None = None,
                 engine_packages: dict[str, str] | None = None):
        self.slicer_python = slicer_python
        self.engine_root = str(engine_root or Path(__file__).resolve().parents[2])
        self.pytorch_extension = pytorch_extension
        self.startup_env = startup_env
        self.environ = environ
        self.env_dir = env_dir
        self.engine_packages = engine_packages
        self.pending = None
        self.task: BackgroundSteps | None = None

    # ---- environments ----
    def has_pytorch_extension(self) -> bool:
        return bool(self.pytorch_extension() if callable(self.pytorch_extension) else self.pytorch_extension)

    def isolated_env(self) -> dict:
        """Environment for a Python other than Slicer's (see ``isolated_environment``)."""
        return isolated_environment(self.startup_env)

    def worker_env(self, isolated: bool = False) -> dict:
        """Environment for background steps: Slicer's (or the isolated one) with the engine importable."""
        return with_engine_on_path(self.isolated_env() if isolated else dict(os.environ if self.environ is None
                                                                             else self.environ), self.engine_root)

    def separate_environment_dir(self) -> str:
        from ..runtime.weights import cache_dir

        return str(self.env_dir) if self.env_dir is not None else str(cache_dir() / "worker-env")

    def base_python(self) -> str:
        """A Python to create the separate environment from: the system's python3, else Slicer's."""
        found = shutil.which("python3", path=self.isolated_env().get("PATH"))
        return found or self.slicer_python or sys.executable

    # ---- what to offer ----
    def engine_message(self) -> PanelMessage | None:
        """On a fresh Slicer, what the panel says instead of listing models: the packages it lacks itself."""
        missing = missing_engine_packages(self.engine_packages)
        if not missing:
            return None
        return PanelMessage(f"BiomedSeg needs {', '.join(missing)} in Slicer's Python.", "dependency_missing",
                            "install_engine")

    def plan(self, model_id: str | None, missing: list[str], worker_python: str = "",
             env_dir: str | os.PathLike | None = None) -> InstallPlan:
        """``install_plan`` for the worker's Python (Slicer's by default), with the constraints of Slicer's
        packages written to a file; raises InputError where torch cannot be added safely."""
        python = worker_python or self.slicer_python
        if env_dir is not None:
            return install_plan(model_id, missing, python=python, env_dir=env_dir, base_python=self.base_python())
        from ..runtime.weights import cache_dir

        constraints = cache_dir() / "slicer-constraints.txt"  # one file, rewritten: no temporary folder left
        constraints.parent.mkdir(parents=True, exist_ok=True)
        constraints.write_text(constraints_for_installed())
        return install_plan(model_id, missing, python=python, pytorch_utils=self.has_pytorch_extension(),
                            constraints_file=str(constraints))

    def dependencies_offer(self, model_id: str | None, worker_python: str = "",
                           engine_only: bool = False) -> InstallOffer | None:
        """What Install… offers: the panel's own packages first (the catalogue needs them), then what
        the model lacks in the worker's Python; a separate environment where torch cannot be added to
        Slicer's. None when there is nothing to ask."""
        engine = missing_engine_packages(self.engine_packages)
        if engine_only or engine:
            plan = self.plan(None, engine, "")
            if not plan.steps:
                return None
            return InstallOffer(INSTALL_TITLE, plan, [Question(plan.summary + "\n\n" + _step_list(plan), False)],
                                keeps_pending=False)
        if model_id is None:
            return None
        missing = missing_requirements(model_id, worker_python, env=self.isolated_env())
        questions = []
        try:
            plan = self.plan(model_id, missing, worker_python)
        except BiomedSegError as exc:  # torch cannot be added safely to Slicer's Python
            env_dir = self.separate_environment_dir()
            questions.append(Question(f"{exc.message}\n\nCreate a separate Python environment for the model in "
                                      f"{env_dir} instead?", False))
            plan = self.plan(model_id, missing, worker_python, env_dir=env_dir)
        if not plan.steps:
            return InstallOffer(INSTALL_TITLE, plan, nothing_to_do=f"Nothing to install: '{model_id}' has what it "
                                                                   f"needs in {worker_python or self.slicer_python}.")
        questions.append(Question(f"{plan.summary}\n\n{_step_list(plan)}\n\nContinue?"))
        return InstallOffer(INSTALL_TITLE, plan, questions)

    def download_offer(self, model_id: str, worker_python: str = "") -> InstallOffer:
        """What Download… offers: the model's weights fetched in the worker's Python (where huggingface_hub is)."""
        plan = download_plan(model_id, worker_python or self.slicer_python or sys.executable,
                             isolated=bool(worker_python))
        return InstallOffer(DOWNLOAD_TITLE, plan, [Question(plan.summary + "\n\nDownload now?")], weights_of=model_id)

    def declined(self, question: Question) -> None:
        if question.forgets_pending:
            self.pending = None

    # ---- running it ----
    @property
    def busy(self) -> bool:
        return self.task is not None

    def start(self, offer: InstallOffer) -> BackgroundSteps:
        if not offer.keeps_pending:
            self.pending = None
        progress_of = weights_progress(offer.weights_of) if offer.weights_of else None
        self.task = BackgroundSteps(offer.plan, env=self.worker_env(), progress_of=progress_of,
                                    isolated_env=self.worker_env(isolated=True))
        return self.task

    def poll(self, run_special: Callable[[Step], tuple[bool, str]]) -> InstallPoll:
        """Call from the timer. ``run_special(step) -> (ok, error)`` runs a step only the caller can run
        (PyTorch through the PyTorch extension); the finish comes once, when the plan has ended."""
        task = self.task
        if task is None:
            return InstallPoll(Progress(0, ""))
        if task.pending_special is not None:
            task.special_done(*run_special(task.pending_special))
        progress = task.poll()
        if not task.finished:
            return InstallPoll(progress)
        self.task = None
        return InstallPoll(progress, self._finish(task))

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def _finish(self, task: BackgroundSteps) -> InstallFinish:
        if task.state == "done":
            pending, self.pending = self.pending, None
            first = task.plan.summary.split(". ")[0].rstrip(".")
            return InstallFinish("done", task.plan.worker_python, True, f"Done. {first}.", pending)
        if task.state == "failed":
            return InstallFinish("failed", message=PanelMessage(
                task.error + " Nothing else was changed; see the Python console for the full output, or choose "
                "another worker Python under Advanced.", "error", None), log="\n".join(task.lines))
        return InstallFinish(task.state)


__all__ = ["WORKER_REQUIREMENTS", "ENGINE_PACKAGES", "missing_engine_packages", "Step", "InstallPlan",
           "constraints_for_installed", "env_python", "missing_requirements", "install_plan", "DOWNLOAD_CODE",
           "download_plan", "hub_cache_bytes", "weights_progress", "BackgroundSteps", "Question", "InstallOffer",
           "InstallFinish", "InstallPoll", "InstallFlow"]
