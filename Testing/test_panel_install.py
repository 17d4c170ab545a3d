"""First-run installs and downloads the way the panel's Install and Download buttons run them.

``InstallFlow`` decides what to offer (Slicer's Python with pinned packages and the PyTorch
extension, or a separate environment), runs the plan's steps as real background processes,
and says what the panel does when they end. Everything here is real and offline: a bare
virtual environment stands for a worker Python without torch, pip resolves against the
constraint file the flow wrote (dry run, a local wheel), steps are ``python -c`` processes
that write files, fail with an exit code or are cancelled mid-way.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from biomedseg.panel import install
from biomedseg.panel.install import (WORKER_REQUIREMENTS, BackgroundSteps, InstallFlow, InstallOffer, InstallPlan,
                                     Step, constraints_for_installed, download_plan, env_python, install_plan,
                                     missing_engine_packages, weights_progress)
from biomedseg.errors import InputError

ENGINE_ROOT = Path(install.__file__).resolve().parents[2]  # the folder that holds biomedseg


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A worker Python without torch or deepbet: a fresh virtual environment (no pip, no packages)."""
    folder = tmp_path_factory.mktemp("bare") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    return env_python(folder)


def flow_for(tmp_path, **kwargs) -> InstallFlow:
    """A flow as the module makes it, with this Python standing in for Slicer's."""
    kwargs.setdefault("startup_env", dict(os.environ))
    kwargs.setdefault("env_dir", tmp_path / "worker-env")
    return InstallFlow(sys.executable, ENGINE_ROOT, **kwargs)


def run_flow(flow: InstallFlow, run_special=None, timeout: float = 60.0):
    """What the panel's QTimer does while an install runs: poll until the flow says it has finished."""
    texts = []
    deadline = time.monotonic() + timeout
    while True:
        result = flow.poll(run_special=run_special or (lambda step: pytest.fail(f"unexpected special step {step}")))
        texts.append(result.progress.text)
        if result.finish is not None:
            return result.finish, texts
        assert time.monotonic() < deadline, texts[-3:]
        time.sleep(0.02)


def offer_of(*steps: Step, summary: str = "Test plan. Second sentence.", worker_python=None) -> InstallOffer:
    return InstallOffer("test", InstallPlan(list(steps), ["x"], worker_python, summary))


def write_step(description: str, path: Path, text: str) -> Step:
    code = "import sys; open(sys.argv[1], 'a').write(sys.argv[2]); print('wrote', sys.argv[2])"
    return Step(description, [sys.executable, "-c", code, str(path), text])


def alive(pid: int) -> bool:
    """Whether a process still runs (a zombie nobody reaped yet does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_a_virtual_environment_is_another_python_than_its_base(bare_python):
    """Its python usually links to the same interpreter file as this one, but it has none of this one's packages."""
    from biomedseg.panel.worker_python import same_python

    assert not same_python(bare_python, sys.executable) and same_python(bare_python, bare_python)
    assert same_python(sys.executable, str(Path(sys.executable).parent / Path(sys.executable).name))
    assert install.missing_requirements("deepbet", bare_python) == ["torch", "deepbet"]


# ---- what the flow offers --------------------------------------------------------------------

def test_torch_missing_without_the_extension_offers_a_separate_environment(tmp_path, bare_python):
    flow = flow_for(tmp_path, pytorch_extension=False)
    with pytest.raises(InputError, match="PyTorch extension is not installed"):
        flow.plan("deepbet", ["torch", "deepbet"], bare_python)  # refused for the worker's own Python
    offer = flow.dependencies_offer("deepbet", bare_python)
    refused, confirm = offer.questions
    env_dir = str(tmp_path / "worker-env")
    assert "PyTorch is missing and the PyTorch extension is not installed" in refused.text
    assert refused.text.endswith(f"Create a separate Python environment for the model in {env_dir} instead?")
    assert confirm.text.endswith("Continue?") and "Slicer's own Python is not changed" in confirm.text
    assert offer.title == "BiomedSeg: install dependencies" and not offer.nothing_to_do
    # the plan: a new environment, PyTorch and the worker's packages in it, deepbet without its dependencies
    plan = offer.plan
    target = env_python(env_dir)
    assert plan.worker_python == target  # the worker is switched to it once the plan ran
    assert plan.steps[0].argv == [flow.base_python(), "-m", "venv", env_dir]
    assert [s.argv[:4] for s in plan.steps[1:]] == [[target, "-m", "pip", "install"]] * 3
    assert all(s.isolated for s in plan.steps[1:])  # never with Slicer's PYTHONHOME / PYTHONPATH
    assert plan.steps[1].argv[-1] == "torch"
    assert plan.steps[2].argv[-len(WORKER_REQUIREMENTS):] == WORKER_REQUIREMENTS
    assert plan.steps[3].argv[-2:] == ["--no-deps", "deepbet"]
    assert plan.packages == ["torch", *WORKER_REQUIREMENTS, "deepbet"]
    # saying no to the alternative leaves a pressed Segment waiting; no to the plan itself forgets it
    flow.pending = segment = object()
    flow.declined(refused)
    assert flow.pending is segment
    flow.declined(confirm)
    assert flow.pending is None


def test_with_the_extension_torch_goes_through_it_and_the_rest_is_pinned(tmp_path, bare_python):
    asked = []
    flow = flow_for(tmp_path, pytorch_extension=lambda: asked.append(1) or True)
    offer = flow.dependencies_offer("deepbet", bare_python)
    assert asked, "the flow asks whether the extension is there when it makes the plan"
    (question,) = offer.questions
    assert question.forgets_pending and "PyTorch with the PyTorch extension" in question.text
    extension, deepbet = offer.plan.steps
    assert (extension.kind, extension.argv) == ("pytorch_utils", None)
    assert deepbet.argv[:4] == [bare_python, "-m", "pip", "install"] and deepbet.argv[-2:] == ["--no-deps", "deepbet"]
    constraints = Path(deepbet.argv[deepbet.argv.index("--constraint") + 1])
    import numpy

    assert f"numpy=={numpy.__version__}" in constraints.read_text().splitlines()
    assert offer.plan.worker_python is None and offer.plan.packages == ["torch", "deepbet"]


def wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel (metadata only), so pip has a candidate without a network."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{k},sha256={base64.urlsafe_b64encode(hashlib.sha256(v.encode()).digest()).rstrip(b'=').decode()}"
                     f",{len(v)}\n" for k, v in files.items()) + f"{dist}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for key, value in files.items():
            z.writestr(key, value)
        z.writestr(f"{dist}/RECORD", record)
    return path


def test_constraints_make_pip_refuse_to_replace_slicers_packages(tmp_path):
    """The panel's own packages go into Slicer's Python with pip under the constraints the flow wrote:
    pip run exactly so may add packages but must refuse to change one that is installed."""
    flow = flow_for(tmp_path, engine_packages={"biomedseg_no_such_module": "biomedseg-no-such-package"})
    message = flow.engine_message()
    assert message.action == "install_engine" and "biomedseg-no-such-package" in message.text
    offer = flow.dependencies_offer(None)
    assert not offer.keeps_pending and not offer.questions[0].forgets_pending
    (step,) = offer.plan.steps
    assert step.argv[0] == sys.executable and step.argv[-1] == "biomedseg-no-such-package" and not step.isolated
    assert "--constraint" in step.argv
    # the same pip command, as a dry run against a local wheel that would downgrade an installed package
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel(wheels, "tqdm", "0.0.1")
    assert metadata.version("tqdm") != "0.0.1"
    offline = ["--dry-run", "--no-index", "--find-links", str(wheels), "tqdm==0.0.1"]
    pinned = subprocess.run(step.argv[:-1] + offline, capture_output=True, text=True)
    assert pinned.returncode != 0 and "ResolutionImpossible" in pinned.stderr, pinned.stdout + pinned.stderr
    i = step.argv.index("--constraint")
    unpinned = subprocess.run(step.argv[:i] + step.argv[i + 2:-1] + offline, capture_output=True, text=True)
    assert unpinned.returncode == 0 and "Would install tqdm-0.0.1" in unpinned.stdout, unpinned.stderr
    # this Python has everything the panel needs: nothing is offered for it
    default = flow_for(tmp_path)
    assert default.engine_message() is None and missing_engine_packages() == []
    assert default.dependencies_offer(None) is None and default.dependencies_offer(None, engine_only=True) is None


def test_a_fresh_slicer_without_the_panels_packages_still_loads_the_panel_and_says_what_it_lacks():
    """The module imports biomedseg.panel before anything is installed; it must load and name the packages."""
    lacking = ["jsonschema", "psutil", "nibabel", "nrrd", "slicerio", "scipy"]
    code = ("import sys\n"
            f"for name in {lacking!r}: sys.modules[name] = None  # as if not installed\n"
            "from biomedseg import panel\n"
            "print(panel.InstallFlow().engine_message().text)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ENGINE_ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("BiomedSeg needs jsonschema, psutil, nibabel, pynrrd, slicerio, scipy in "
                                  "Slicer's Python.")


def test_nothing_to_install_is_said_not_asked(tmp_path):
    offer = flow_for(tmp_path).dependencies_offer("deepbet", sys.executable)
    assert offer.questions == [] and offer.plan.steps == []
    assert offer.nothing_to_do == f"Nothing to install: 'deepbet' has what it needs in {sys.executable}."


def test_download_offer_runs_in_the_worker_python(tmp_path):
    flow = flow_for(tmp_path)
    offer = flow.download_offer("biomedparse-v1")
    (question,) = offer.questions
    assert offer.title == "BiomedSeg: download weights" and question.text.endswith("\n\nDownload now?")
    assert "gated" in question.text and "CC-BY-NC-SA-4.0" in question.text and "1.8 GB" in question.text
    (step,) = offer.plan.steps
    assert step.argv[:2] == [sys.executable, "-c"] and step.argv[-1] == "biomedparse-v1" and not step.isolated
    assert offer.weights_of == "biomedparse-v1"
    other = flow.download_offer("biomedparse-v1", "/opt/envs/worker/bin/python")
    assert other.plan.steps[0].argv[0] == "/opt/envs/worker/bin/python" and other.plan.steps[0].isolated


# ---- running it --------------------------------------------------------------------------------

def test_separate_environment_step_creates_the_python_the_worker_switches_to(tmp_path, bare_python):
    flow = flow_for(tmp_path)
    offer = flow.dependencies_offer("deepbet", bare_python)
    create = offer.plan.steps[0]  # the other steps need the network (PyTorch from the index)
    flow.pending = segment = object()
    flow.start(dataclasses.replace(offer, plan=dataclasses.replace(offer.plan, steps=[create])))
    assert flow.busy
    finish, texts = run_flow(flow)
    assert finish.state == "done" and not flow.busy
    assert finish.worker_python == env_python(tmp_path / "worker-env") == offer.plan.worker_python
    prefix = subprocess.run([finish.worker_python, "-c", "import sys; print(sys.prefix)"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert Path(prefix) == tmp_path / "worker-env"
    assert finish.refresh_models and finish.pending is segment and flow.pending is None
    assert finish.status == f"Done. BiomedSeg will create a separate Python environment in {tmp_path / 'worker-env'} " \
                            "and install " + ", ".join(offer.plan.packages) + " there (several GB with PyTorch)."
    assert any(t.startswith("Step 1 of 1: Create a separate Python environment") for t in texts)
    assert texts[-1] == "Installed."


def test_steps_get_slicers_environment_or_the_isolated_one(tmp_path):
    startup = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONHOME": "/slicer/python",
               "PYTHONPATH": "/slicer/site-packages", "MARK": "startup"}
    environ = dict(os.environ, PYTHONPATH="/slicer/site-packages", MARK="slicer")
    flow = InstallFlow(sys.executable, ENGINE_ROOT, startup_env=startup, environ=environ)
    code = ("import json, os, sys, biomedseg; json.dump({k: os.environ.get(k) for k in "
            "('PYTHONHOME', 'PYTHONPATH', 'MARK')}, open(sys.argv[1], 'w'))")
    flow.start(offer_of(Step("in Slicer's Python", [sys.executable, "-c", code, str(tmp_path / "slicer.json")]),
                        Step("in another Python", [sys.executable, "-c", code, str(tmp_path / "other.json")],
                             isolated=True)))
    finish, _ = run_flow(flow)
    assert finish.state == "done", finish.message
    slicer_env = json.loads((tmp_path / "slicer.json").read_text())
    other = json.loads((tmp_path / "other.json").read_text())
    # both import the engine from its folder; only Slicer's own Python keeps Slicer's paths
    assert slicer_env == {"PYTHONHOME": None, "MARK": "slicer",
                          "PYTHONPATH": os.pathsep.join([str(ENGINE_ROOT), "/slicer/site-packages"])}
    assert other == {"PYTHONHOME": None, "PYTHONPATH": str(ENGINE_ROOT), "MARK": "startup"}


def test_a_failing_step_stops_the_plan_with_its_exit_code_and_last_lines(tmp_path):
    flow = flow_for(tmp_path)
    flow.pending = segment = object()
    noisy = "import sys\nfor i in range(12): print('line', i)\nprint('No matching distribution for torch')\nsys.exit(3)"
    flow.start(offer_of(write_step("first", tmp_path / "done.txt", "1"),
                        Step("Install torch", [sys.executable, "-c", noisy]),
                        write_step("never", tmp_path / "never.txt", "x")))
    finish, texts = run_flow(flow)
    assert finish.state == "failed" and not finish.refresh_models and finish.worker_python is None
    text = finish.message.text
    assert text.startswith("'Install torch' failed (exit code 3).") and "No matching distribution for torch" in text
    assert "line 11" in text and "line 2\n" not in text  # the last lines, not the whole output
    assert "Nothing else was changed" in text and finish.message.action is None
    assert "line 0" in finish.log and finish.log.endswith("No matching distribution for torch")  # for the console
    assert (tmp_path / "done.txt").read_text() == "1" and not (tmp_path / "never.txt").exists()
    assert flow.pending is segment  # a failed install leaves the waiting action as it was
    assert texts[-1] == text.split(" Nothing else")[0]


def test_cancel_stops_a_long_step_and_its_children(tmp_path):
    flow = flow_for(tmp_path)
    code = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(120)']); print(child.pid, flush=True); time.sleep(120)")
    task = flow.start(offer_of(Step("Install a large package", [sys.executable, "-c", code]),
                               write_step("never", tmp_path / "never.txt", "x")))
    deadline = time.monotonic() + 20
    while not task.lines:
        assert time.monotonic() < deadline, "the step printed nothing"
        assert flow.poll(run_special=None).finish is None
        time.sleep(0.02)
    step_pid, child_pid = task.proc.pid, int(task.lines[0])
    assert alive(step_pid) and alive(child_pid)
    t0 = time.monotonic()
    flow.cancel()
    assert time.monotonic() - t0 < 6
    finish, texts = run_flow(flow)
    assert finish.state == "cancelled" and texts[-1] == "Cancelled." and finish.message is None
    assert not finish.refresh_models and not flow.busy
    deadline = time.monotonic() + 5
    while (alive(step_pid) or alive(child_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(step_pid) and not alive(child_pid)  # the whole process group is gone
    assert not (tmp_path / "never.txt").exists()


def test_the_pytorch_extension_step_is_handed_to_the_panel(tmp_path):
    flow = flow_for(tmp_path)
    handed = []

    def extension(step):
        handed.append(step)
        return True, ""

    flow.start(offer_of(Step("Install PyTorch with the PyTorch extension", None, "pytorch_utils"),
                        write_step("then the rest", tmp_path / "after.txt", "pip")))
    finish, _ = run_flow(flow, run_special=extension)
    assert [s.kind for s in handed] == ["pytorch_utils"]  # once, before the next step runs
    assert finish.state == "done" and (tmp_path / "after.txt").read_text() == "pip"
    # the extension failing stops the plan with its own words
    flow.start(offer_of(Step("Install PyTorch with the PyTorch extension", None, "pytorch_utils"),
                        write_step("never", tmp_path / "never.txt", "x")))
    finish, _ = run_flow(flow, run_special=lambda step: (False, "The PyTorch extension did not install torch."))
    assert finish.state == "failed" and finish.message.text.startswith("The PyTorch extension did not install torch.")
    assert not (tmp_path / "never.txt").exists()


def test_the_panels_own_packages_refresh_the_models_and_re_run_nothing(tmp_path):
    flow = flow_for(tmp_path, engine_packages={"biomedseg_no_such_module": "biomedseg-no-such-package"})
    offer = flow.dependencies_offer(None)
    flow.pending = object()  # Segment was pressed before the panel could even list its models
    # run it with a step that needs no network in place of pip
    flow.start(dataclasses.replace(offer, plan=dataclasses.replace(
        offer.plan, steps=[write_step("add the packages", tmp_path / "pkgs.txt", "ok")])))
    finish, _ = run_flow(flow)
    assert finish.state == "done" and finish.refresh_models and finish.pending is None
    assert finish.status == "Done. BiomedSeg needs biomedseg-no-such-package in Slicer's Python."


def test_done_status_is_the_plans_first_sentence_once(tmp_path):
    """A one-sentence summary such as a download's ends in '.': the status line must not end in '..'."""
    flow = flow_for(tmp_path)
    for summary, status in (("Download the weights of 'x' (m.pt, licence MIT).",
                             "Done. Download the weights of 'x' (m.pt, licence MIT)."),
                            ("Model 'x' needs torch in Slicer's Python. BiomedSeg will install it.",
                             "Done. Model 'x' needs torch in Slicer's Python.")):
        flow.start(offer_of(write_step("step", tmp_path / "s.txt", "x"), summary=summary))
        finish, _ = run_flow(flow)
        assert finish.status == status


# ---- the plans and the runner underneath --------------------------------------------------------

def test_install_plan_keeps_slicer_packages(tmp_path):
    pins = constraints_for_installed()
    import numpy

    assert f"numpy=={numpy.__version__}" in pins.splitlines()
    constraints = tmp_path / "pins.txt"
    constraints.write_text(pins)
    plan = install_plan("deepbet", ["torch", "deepbet"], python="/slicer/bin/PythonSlicer", pytorch_utils=True,
                        constraints_file=constraints)
    kinds = [s.kind for s in plan.steps]
    assert kinds == ["pytorch_utils", "command"] and plan.worker_python is None
    pip = plan.steps[1].argv
    assert pip[:4] == ["/slicer/bin/PythonSlicer", "-m", "pip", "install"]
    assert "--constraint" in pip and str(constraints) in pip and "--no-deps" in pip and pip[-1] == "deepbet"
    with pytest.raises(InputError, match="PyTorch extension"):
        install_plan("deepbet", ["torch"], python="/slicer/bin/PythonSlicer", pytorch_utils=False)
    env = install_plan("deepbet", ["torch", "deepbet"], python="/slicer/bin/PythonSlicer",
                       env_dir=tmp_path / "env", base_python="/slicer/bin/PythonSlicer")
    assert env.worker_python == env_python(tmp_path / "env")
    assert env.steps[0].argv == ["/slicer/bin/PythonSlicer", "-m", "venv", str(tmp_path / "env")]
    assert any(s.argv[-1] == "torch" for s in env.steps) and "Slicer's own Python is not changed" in env.summary


def test_panel_packages_install_plan():
    plan = install_plan(None, ["pynrrd", "slicerio"], python="/slicer/bin/PythonSlicer",
                        constraints_file="/tmp/pins.txt")
    (step,) = plan.steps
    assert step.argv[-2:] == ["pynrrd", "slicerio"] and "--constraint" in step.argv
    assert plan.summary.startswith("BiomedSeg needs pynrrd, slicerio in Slicer's Python")


def test_background_steps_run_in_order_report_and_fail_cleanly(tmp_path):
    marker = tmp_path / "order.txt"
    plan = InstallPlan([write_step("first", marker, "1"), Step("extension", None, "pytorch_utils"),
                        write_step("second", marker, "2")], ["x"], None, "test")
    task = BackgroundSteps(plan)
    texts = []
    deadline = time.monotonic() + 20
    while not task.finished and time.monotonic() < deadline:
        if task.pending_special is not None:
            task.special_done(True)
        texts.append(task.poll().text)
        time.sleep(0.02)
    assert task.state == "done" and marker.read_text() == "12"
    assert any("Step 1 of 3: first" in t for t in texts) and task.poll().percent == 100
    failing = BackgroundSteps(InstallPlan([Step("broken", [sys.executable, "-c", "raise SystemExit(3)"]),
                                           Step("never", [sys.executable, "-c", "print(1)"])], [], None, ""))
    while not failing.finished:
        failing.poll()
        time.sleep(0.02)
    assert failing.state == "failed" and "exit code 3" in failing.error
    missing = BackgroundSteps(InstallPlan([Step("absent", [str(tmp_path / "no-such-python"), "-c", "pass"])], [],
                                          None, ""))
    assert missing.state == "failed" and missing.error.startswith("'absent' could not start")
    slow = BackgroundSteps(InstallPlan([Step("slow", [sys.executable, "-c", "import time; time.sleep(60)"])],
                                       [], None, ""))
    t0 = time.monotonic()
    slow.cancel()
    assert slow.state == "cancelled" and time.monotonic() - t0 < 6


def test_weights_download_through_the_flow_and_its_progress(tmp_path, monkeypatch):
    """The Download button's plan runs the engine's resolver in the worker's Python; the bar follows
    the bytes arriving in the hub cache."""
    from types import SimpleNamespace

    # a hub cache holding the file (as a finished download leaves it): the step finds and verifies it
    content = b"weights" * 1000
    sha = hashlib.sha256(content).hexdigest()
    repo = tmp_path / "hub" / "models--microsoft--BiomedParse"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / sha).write_bytes(content)
    (repo / "snapshots" / ("c" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("c" * 40) / "biomedparse_v1.pt").symlink_to(f"../../blobs/{sha}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("BIOMEDSEG_CACHE", str(tmp_path / "cache"))
    flow = flow_for(tmp_path)
    flow.start(flow.download_offer("biomedparse-v1"))
    assert flow.task.progress_of is not None  # the bar follows the hub cache
    finish, _ = run_flow(flow)
    assert finish.state == "done", finish.message and finish.message.text
    assert sha in (tmp_path / "cache" / "verified.json").read_text()  # checked against the hub's sha256
    assert finish.status.startswith("Done. Download the weights of 'biomedparse-v1'")
    assert not finish.status.endswith("..") and finish.refresh_models and finish.worker_python is None
    assert download_plan("biomedparse-v1", sys.executable).summary.startswith("Download the weights")

    spec = {"source": "hub", "repo": "example/model", "files": ["m.pt"], "size_bytes": 1000}
    monkeypatch.setattr(install, "get_model", lambda model_id: SimpleNamespace(weights=spec))
    blobs = tmp_path / "hub" / "models--example--model" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "old").write_bytes(b"x" * 100)  # already there before the download started: not counted
    percent = weights_progress("x")
    assert percent() == 0
    (blobs / "partial.incomplete").write_bytes(b"x" * 250)
    assert percent() == 25
    (blobs / "partial.incomplete").write_bytes(b"x" * 1000)
    assert percent() == 99  # 100 only when the step says it is done
