"""Shared fixtures: real data nobody in this project made (see shared/research/real-data.md)."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from pathlib import Path

import pytest

#: The authors' reference outputs live in the shared folder beside the repository
#: (CI clones the repo next to shared/); BIOMEDSEG_PARITY_DIR overrides.
PARITY_DIR = Path(os.environ.get("BIOMEDSEG_PARITY_DIR")
                  or Path(__file__).resolve().parents[2] / "shared" / "parity")

COLIN = Path("/usr/share/mricron/templates/ch2.nii.gz")
COLIN_BET = Path("/usr/share/mricron/templates/ch2bet.nii.gz")

#: Folder of the test model folders the worker tests register (see worker_test_models).
WORKER_MODELS = Path(__file__).parent / "worker_models"


def require_file(path: Path, how: str) -> Path:
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing in CI; .ci/run must install it ({how})")
        pytest.skip(f"{path} not installed ({how})")
    return path


def parity_file(relative: str) -> Path:
    """A file of the authors' reference outputs under PARITY_DIR (missing: fail in CI, skip elsewhere)."""
    return require_file(PARITY_DIR / relative, "shared/parity beside the repository, or set BIOMEDSEG_PARITY_DIR")


def load_detweights():
    """shared/parity/detweights.py as a module: the deterministic name-keyed weights of the fixtures."""
    spec = importlib.util.spec_from_file_location("detweights", parity_file("detweights.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_bpe_vocab() -> Path:
    """CLIP's BPE vocabulary from the open_clip_torch wheel (setup.sh installs it for the tests)."""
    from biomedseg.models.biomedparse.tokenizer import find_bpe_vocab

    try:
        return find_bpe_vocab()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CLIP BPE vocabulary missing in CI: {exc}")
        pytest.skip(str(exc))


def require_tool(name: str, how: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI; .ci/run must install it ({how})")
        pytest.skip(f"{name} not installed ({how})")
    return exe


#: A small BiomedBERT-style vocabulary ([PAD] 0, [CLS] 2, [SEP] 3 as the real one) for BiomedCLIP tests.
BIOMEDCLIP_WORDS = ["this", "is", "a", "photo", "of", "ct", "scan", "an", "mri", "x", "-", "ray", "image", "the",
                    "chest", "liver", "brain", "lung", "lungs", "kidney", "left", "right", "slice", "axial", "coronal",
                    "sagittal", "abdomen", "head", "and", "heart", "tumor", "##s", "##ing", "tissue", "sample", "skin",
                    "eye", "spleen"]


def chest_like(direction=None, origin=(0.0, 0.0, 0.0)):
    """A CT-like volume for BiomedCLIP tests: air outside, soft tissue, two dark 'lungs'; each slice a
    little different (so no two slices share an embedding)."""
    import numpy as np

    from biomedseg.volume import Volume
    from geometry_cases import affine

    k, j, i = np.indices((12, 32, 32))
    body = (j - 16) ** 2 + (i - 16) ** 2 < 14 ** 2
    lungs = ((j - 14) ** 2 + (i - 9) ** 2 < 4 ** 2) | ((j - 14) ** 2 + (i - 23) ** 2 < 4 ** 2)
    array = np.where(body, 40, -1000) + np.where(lungs & (k > 3), -800, 0) + 5 * k
    return Volume(array.astype(np.int16), affine(direction if direction is not None else np.eye(3),
                                                  (0.8, 0.8, 3.0), origin), name="chest")


@pytest.fixture(scope="session")
def biomedclip_weights(tmp_path_factory):
    """A BiomedCLIP weights folder as the catalogue names it: the deterministic-weights checkpoint
    (``open_clip_pytorch_model.bin``, written once per test session: 784 MB) and a small vocabulary."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from biomedseg.models.biomedclip.network import BiomedCLIPNet

    folder = tmp_path_factory.mktemp("biomedclip")
    net = BiomedCLIPNet()
    load_detweights().fill_module(net)
    torch.save(net.state_dict(), folder / "open_clip_pytorch_model.bin")
    del net
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BIOMEDCLIP_WORDS) + "\n")
    return folder


@pytest.fixture(scope="module")
def two_torch_threads():
    """Parity modules run with 2 torch threads (their fixtures' noise was measured at 1 and 2), and put
    the count back afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def colin_path() -> Path:
    return require_file(COLIN, "apt-get install mricron-data")


@pytest.fixture(scope="session")
def colin_bet_path() -> Path:
    return require_file(COLIN_BET, "apt-get install mricron-data")


@pytest.fixture(scope="session")
def ct_chest_path() -> Path:
    import slicerio

    return Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"


@contextlib.contextmanager
def mrml_scene():
    """A vtkMRMLScene with Slicer's default colour tables and segmentation converter rules, as in the application."""
    import slicer

    from biomedseg import slicer_bridge as sb

    sb.ensure_converter_rules()
    scene = slicer.vtkMRMLScene()
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(scene)
    try:
        yield scene
    finally:
        color_logic.SetMRMLScene(None)
        scene.Clear(1)


@contextlib.contextmanager
def registered_models(folder):
    """Register the model folders under ``folder`` in this process and in the workers it starts, through
    $BIOMEDSEG_EXTRA_MODELS as a site would.

    The variable is restored on exit; the catalogue cache is cleared on entry and exit so it is
    re-read with the current environment.
    """
    from biomedseg.catalog import load_catalog

    saved = os.environ.get("BIOMEDSEG_EXTRA_MODELS")
    os.environ["BIOMEDSEG_EXTRA_MODELS"] = str(folder)
    load_catalog.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("BIOMEDSEG_EXTRA_MODELS", None)
        else:
            os.environ["BIOMEDSEG_EXTRA_MODELS"] = saved
        load_catalog.cache_clear()


def worker_test_models():
    """The controllable test models (the model folders under worker_models/), registered (``registered_models``)."""
    return registered_models(WORKER_MODELS)


def load_model_module(folder: str, name: str = "backend"):
    """A module of a test model folder under worker_models/ (e.g. the Hermes stand-in's helpers)."""
    path = WORKER_MODELS / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"worker_models_{folder}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def standin_registered(model_id: str):
    """The test models registered (``worker_test_models``); afterwards ``model_id``'s warm backends in this
    process are dropped, so a later module loads its own."""
    with worker_test_models():
        yield
    from biomedseg.engine import loading

    for key in [k for k in loading._WARM if k[0] == model_id]:
        loading._WARM.pop(key)


@contextlib.contextmanager
def worker_client(**kwargs):
    """A WorkerClient, closed afterwards."""
    from biomedseg.worker.client import WorkerClient

    client = WorkerClient(**kwargs)
    try:
        yield client
    finally:
        client.close()
