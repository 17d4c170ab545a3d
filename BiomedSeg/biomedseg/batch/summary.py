"""The summary table (OUTDIR/summary.csv and summary.json) and the resume rule.

summary.json is the resume record: a case is skipped when its record says it finished (ok, or
nothing found) with the same settings hash and its outputs are still there. Both files are
rewritten whole and atomically after every case, so a run killed at any moment loses at most the
case it was running.
"""
from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import os
from pathlib import Path

from .. import __version__
from ..errors import InputError
from ..io.atomic import atomic_write
from ..results import jsonable

SCHEMA = "biomedseg.batch-summary/1"
#: statuses of a case that needs no re-run (``outcome`` keeps what the run that made it found)
FINISHED = ("ok", "empty", "skipped")


def settings_hash(settings: dict) -> str:
    """sha256 of the settings that decide a case's result (canonical JSON), first 16 hex digits."""
    text = json.dumps(jsonable(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_identity(path) -> dict | None:
    """Path, size and modification time: a replaced input or weights file changes the hash (its
    content is not hashed: a cohort of large images would be read twice)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return {"path": str(path)}
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class Summary:
    """The records of one OUTDIR, keyed by case name, in the order cases were first seen."""

    def __init__(self, outdir: Path, records: list[dict] | None = None):
        self.outdir = Path(outdir)
        self.records: dict[str, dict] = {r["case"]: r for r in records or []}
        #: this run's cases, in the order of INPUTS: the files list them so (earlier runs' other cases after)
        self.order: list[str] = []

    @property
    def json_path(self) -> Path:
        return self.outdir / "summary.json"

    @property
    def csv_path(self) -> Path:
        return self.outdir / "summary.csv"

    @classmethod
    def load(cls, outdir: Path) -> "Summary":
        """The summary an earlier run left (none: empty); a damaged one is refused, not overwritten."""
        path = Path(outdir) / "summary.json"
        if not path.exists():
            return cls(outdir)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        records = data.get("cases") if isinstance(data, dict) and data.get("schema") == SCHEMA else None
        if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("case"), str)
                                                    for r in records):
            raise InputError(f"'{path}' is not a batch summary this version can read.",
                             hint="Move it away (or choose another -o folder) to start the batch afresh.")
        return cls(outdir, records)

    def finished(self, name: str, digest: str, outputs: list[Path], report: Path | None) -> dict | None:
        """The earlier record of a case that needs no re-run, or None: same settings, and every file this
        run would write is there (only the report, if asked for, when nothing was found)."""
        record = self.records.get(name)
        if record is None or record.get("status") not in FINISHED or record.get("settings_hash") != digest:
            return None
        needed = list(outputs) if record.get("outcome") == "ok" else [report] if report else []
        return record if all(p.exists() for p in needed) else None

    def owns(self, name: str) -> list[str]:
        """The files an earlier run wrote for this case (they may be replaced by a re-run)."""
        return list((self.records.get(name) or {}).get("outputs", []))

    def record(self, record: dict) -> None:
        """Add or replace a case's record and rewrite both files."""
        self.records[record["case"]] = jsonable(record)
        self.write()

    def ordered(self) -> list[dict]:
        rank = {name: n for n, name in enumerate(self.order)}
        return sorted(self.records.values(), key=lambda r: rank.get(r["case"], len(rank)))

    def write(self) -> None:
        self.outdir.mkdir(parents=True, exist_ok=True)
        records = self.ordered()
        data = {"schema": SCHEMA, "engine": __version__,
                "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "cases": records}
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        atomic_write(self.json_path, lambda tmp: tmp.write_text(text), overwrite=True)
        table = csv_text(records)
        atomic_write(self.csv_path, lambda tmp: tmp.write_text(table), overwrite=True)

    def counts(self, names: list[str]) -> dict:
        out: dict[str, int] = {}
        for name in names:
            status = self.records.get(name, {}).get("status", "missing")
            out[status] = out.get(status, 0) + 1
        return out


def csv_text(records: list[dict]) -> str:
    """One row per case; per segment a voxels and a mL (or mm² for one-slice images) column."""
    names: list[str] = []
    for record in records:
        names += [n for n in record.get("segments", {}) if n not in names]
    size_columns = []
    for name in names:
        area = any("area_mm2" in (r.get("segments", {}).get(name) or {}) for r in records)
        size_columns += [(name, "voxels"), (name, "area_mm2" if area else "volume_ml")]
    header = (["case", "status", "outcome", "seconds", "model_seconds"]
              + [f"{n} {'mm2' if k == 'area_mm2' else 'mL' if k == 'volume_ml' else k}" for n, k in size_columns]
              + ["absent", "model", "model_version", "weights_sha256", "engine", "device", "input", "outputs",
                 "error_kind", "error", "settings_hash"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in records:
        sizes = [(r.get("segments", {}).get(n) or {}).get(k, "") for n, k in size_columns]
        error = r.get("error") or {}
        weights = ";".join(f"{w.get('file')}:{w.get('sha256') or ''}" for w in r.get("weights", []))
        writer.writerow([r["case"], r.get("status"), r.get("outcome"), r.get("seconds"), r.get("model_seconds"),
                         *sizes, ";".join(r.get("absent", {})), r.get("model"), r.get("model_version"), weights,
                         r.get("engine"), r.get("device"), r.get("input"), ";".join(r.get("outputs", [])),
                         error.get("kind", ""), error.get("message", ""), r.get("settings_hash")])
    return buffer.getvalue()
