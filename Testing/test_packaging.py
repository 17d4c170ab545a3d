"""The Slicer extension skeleton stays in step with the sources."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "BiomedSeg"


def _cmake_list(text: str, var: str) -> set[str]:
    block = re.search(rf"set\({var}\s+(.*?)\)", text, re.S).group(1)
    return {line.strip().replace("${MODULE_NAME}", "BiomedSeg") for line in block.splitlines() if line.strip()}


def test_module_cmake_lists_every_python_file_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    assert scripts == on_disk
    data = {str(p.relative_to(MODULE)) for p in (MODULE / "biomedseg" / "resources").glob("*.json")}
    data |= {str(p.relative_to(MODULE)) for p in (MODULE / "biomedseg" / "models").rglob("*.json")}  # model folders
    data |= {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    assert resources == data
    assert "slicerMacroBuildScriptedModule" in text and "slicer_add_python_unittest" in text


def test_extension_cmake_has_metadata():
    text = (ROOT / "CMakeLists.txt").read_text()
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                  "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({field} \S", text), field
    assert "add_subdirectory(BiomedSeg)" in text and "Slicer_EXTENSION_CPACK" in text


def test_module_file_declares_metadata_and_test():
    tree = ast.parse((MODULE / "BiomedSeg.py").read_text())
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"BiomedSeg", "BiomedSegWidget", "BiomedSegLogic", "BiomedSegTest"} <= classes
    assigned = {t.attr for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Attribute)}
    assert {"title", "categories", "contributors", "helpText", "acknowledgementText"} <= assigned


def test_engine_import_does_not_load_torch():
    code = ("import sys, biomedseg, biomedseg.io, biomedseg.catalog, biomedseg.segments;"
            "biomedseg.catalog.load_catalog();"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
