#!/usr/bin/env python
"""Rewrite the module's CMake file lists from what is on disk (what Testing/test_packaging.py checks):
every .py under BiomedSeg/ as MODULE_PYTHON_SCRIPTS, the JSON resources, model folders' JSON files and
Resources/ as MODULE_PYTHON_RESOURCES."""
import re
from pathlib import Path

MODULE = Path(__file__).resolve().parents[1] / "BiomedSeg"


def block(var: str, items: set[str]) -> str:
    lines = "\n".join("  " + i.replace("BiomedSeg.", "${MODULE_NAME}.", 1) if i.startswith("BiomedSeg.")
                      else "  " + i.replace("/BiomedSeg.", "/${MODULE_NAME}.") for i in sorted(items))
    return f"set({var}\n{lines}\n  )"


def main() -> None:
    path = MODULE / "CMakeLists.txt"
    text = path.read_text()
    scripts = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    data = {str(p.relative_to(MODULE)) for p in (MODULE / "biomedseg" / "resources").glob("*.json")}
    data |= {str(p.relative_to(MODULE)) for p in (MODULE / "biomedseg" / "models").rglob("*.json")}
    data |= {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    for var, items in (("MODULE_PYTHON_SCRIPTS", scripts), ("MODULE_PYTHON_RESOURCES", data)):
        text = re.sub(rf"set\({var}\s+.*?\n  \)", lambda _: block(var, items), text, count=1, flags=re.S)
    path.write_text(text)
    print(f"{path}: {len(scripts)} scripts, {len(data)} resources")


if __name__ == "__main__":
    main()
