"""Shared fixtures: real data nobody in this project made (see shared/research/real-data.md)."""
from __future__ import annotations

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


def require_file(path: Path, how: str) -> Path:
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing in CI; .ci/run must install it ({how})")
        pytest.skip(f"{path} not installed ({how})")
    return path


def require_tool(name: str, how: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI; .ci/run must install it ({how})")
        pytest.skip(f"{name} not installed ({how})")
    return exe


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
