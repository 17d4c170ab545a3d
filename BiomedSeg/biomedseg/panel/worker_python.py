"""The Python the worker runs in when it is not Slicer's own.

Slicer's launcher points Python at its own interpreter and packages through environment
variables; another Python (a separate environment, a conda env) given those would load
Slicer's packages and break. Everything that starts such a Python goes through here.
"""
from __future__ import annotations

import os
from pathlib import Path

#: Variables that point a Python at Slicer's interpreter and packages.
SLICER_PYTHON_VARIABLES = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "PYTHONNOUSERSITE",
                           "__PYVENV_LAUNCHER__", "VIRTUAL_ENV")


def isolated_environment(base: dict | None = None) -> dict:
    """Environment for a Python other than Slicer's: without the variables that point Python at
    Slicer's own interpreter and packages (PYTHONHOME, PYTHONPATH, ...).

    Pass Slicer's startup environment (``slicer.util.startupEnvironment()``), which also has
    none of the library paths Slicer's launcher adds.
    """
    env = dict(os.environ if base is None else base)
    for name in SLICER_PYTHON_VARIABLES:
        env.pop(name, None)
    return env


def same_python(a: str, b: str) -> bool:
    """Whether two interpreter paths are the same Python (so no other process needs asking).

    A virtual environment's python is a link to its base interpreter but has other packages,
    so the same file is the same Python only inside the same environment.
    """
    try:
        same_file = os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
    return same_file and _environment_of(a) == _environment_of(b)


def _environment_of(python: str) -> Path | None:
    """The virtual environment an interpreter path belongs to (the folder with pyvenv.cfg), or None."""
    folder = Path(os.path.abspath(python)).parent.parent
    return folder.resolve() if (folder / "pyvenv.cfg").is_file() else None


def with_engine_on_path(env: dict, engine_root: str | os.PathLike) -> dict:
    """``env`` with the folder holding ``biomedseg`` first on PYTHONPATH (the engine is not installed there)."""
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(engine_root), env.get("PYTHONPATH")]))
    return env


__all__ = ["isolated_environment", "same_python", "with_engine_on_path"]
