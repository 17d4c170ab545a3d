"""`batch`: a cohort (folder, glob or manifest) through one warm worker, or on a Ray cluster (--ray).

The work is in ``biomedseg.batch``; this file reads the arguments and shows progress: a bar over
the cases and one within the current case on a terminal, whole lines anywhere else.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputError
from .progress import ProgressBar, _is_terminal
from .segment import add_model_run_arguments
from .serve import add_server_arguments


def add_batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="segment a cohort: a folder, a glob or a CSV/JSON manifest, one output per "
                                     "case and a summary table; resumable; locally or on a Ray cluster")
    p.add_argument("inputs", help="a folder of images (and DICOM folders), a quoted glob ('data/*/T1.nii.gz'), or a "
                                  "manifest .csv/.json with a row per case: input, case, prompt, options, modality, site")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="folder for the outputs (CASE.seg.nrrd ...), summary.csv and summary.json (the resume record)")
    p.add_argument("--model", default="deepbet", help="model id from `biomedseg models` (default: deepbet)")
    p.add_argument("--prompt", action="append", help="target to segment, for every case without its own; repeat "
                                                     "for several, or separate by commas")
    p.add_argument("--format", default="seg.nrrd", choices=["seg.nrrd", "nii.gz", "nrrd"],
                   help="each case's output: Slicer segmentation (default) or a labelmap with its label tables")
    p.add_argument("--preview", action="store_true", help="also write CASE.png (outlines on three slices)")
    p.add_argument("--report", action="store_true", help="also write CASE.run.json (the run report of `segment`)")
    add_model_run_arguments(p)
    p.add_argument("--modality", help="image modality of every case (a manifest's column overrides it)")
    p.add_argument("--site", help="anatomic site of every case (a manifest's column overrides it)")
    p.add_argument("--plane", choices=["axial", "coronal", "sagittal"], help="slice plane of 2D models (default axial)")
    p.add_argument("--batch-size", type=int, help="slices or windows per model call (default: from free memory)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="model option for every case; repeatable")
    p.add_argument("--free-text", action="store_true", help="send text prompts the model does not list as written")
    p.add_argument("--force", action="store_true", help="run even where an image is not one of the model's modalities")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files in OUTDIR that this batch's summary does not list as its own")
    p.add_argument("--worker-python", help="Python executable for the local worker")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run on a Ray cluster: 'auto' (the one `ray start` made), HOST:PORT, ray://HOST:PORT, or "
                        "'local' to start one here (needs pip install 'biomedseg[cluster]')")
    p.add_argument("--ray-cpus", type=int, help="with --ray local: CPUs of the local cluster (default: all)")
    p.add_argument("--ray-gpus-per-case", type=float, help="GPUs per case (default: 1 for a CUDA model on a "
                                                           "cluster with GPUs, else 0; fractions share a GPU)")
    p.add_argument("--ray-cpus-per-case", type=float, help="CPUs per case (default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary paths")
    add_server_arguments(p)  # the cohort on a `biomedseg serve` machine, case by case
    p.set_defaults(func=cmd_batch)


def settings_of(args):
    """The batch's settings from the arguments (the output folder as given, resolved)."""
    from ..batch import BatchSettings
    from ..prompts import TextPrompt, parse_text_prompts
    from .segment import model_options

    return BatchSettings(
        model=args.model, outdir=Path(args.output).expanduser().resolve(),
        prompts=[TextPrompt(t) for t in parse_text_prompts(";".join(args.prompt or []))],
        options=model_options(args), threshold=args.threshold, keep_largest=args.largest,
        fill_holes=args.fill_holes, weights=args.weights, device=args.device, plane=args.plane or "axial",
        free_text=args.free_text, force=args.force, format="." + args.format, preview=args.preview,
        report=args.report, overwrite=args.overwrite)


def cmd_batch(args) -> int:
    from ..batch import run_batch

    settings = settings_of(args)
    if args.ray and args.server:
        raise InputError("--ray and --server name two different places to run.", hint="Choose one.")
    if args.ray:
        from ..batch.ray_runner import import_ray, run_ray

        import_ray()  # exit 3 with what to install, before anything else

        def runner(jobs, s, summary, region, events):
            run_ray(jobs, s, summary, region, events, address=args.ray, cpus=args.ray_cpus,
                    gpus_per_case=args.ray_gpus_per_case, cpus_per_case=args.ray_cpus_per_case)
    else:
        from ..batch.local import run_local
        from .serve import worker_for

        def runner(jobs, s, summary, region, events):
            run_local(jobs, s, summary, region, events, client=worker_for(args, args.model))  # or the server's

    events = BatchProgress(enabled=not args.quiet)
    try:
        summary, names = run_batch(args.inputs, settings, runner, events)
    finally:
        events.close()
    counts = summary.counts(names)
    failed = counts.get("failed", 0)
    done = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(summary.json_path)
    print(summary.csv_path)
    if failed:
        print(f"error: {failed} of {len(names)} case(s) failed ({done}); each one's error is in {summary.json_path} "
              "and summary.csv.", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{len(names)} case(s): {done}.", file=sys.stderr)
    return 0


def describe(record: dict) -> str:
    """One line for a finished case: its sizes, what was absent, or its error."""
    status = record.get("status")
    if status == "failed":
        error = record.get("error") or {}
        return f"failed ({error.get('kind')}): {error.get('message')}"
    sizes = []
    for name, size in (record.get("segments") or {}).items():
        amount = f"{size['volume_ml']:.2f} mL" if "volume_ml" in size else f"{size.get('area_mm2', 0):.1f} mm²"
        sizes.append(f"{name} {amount}")
    absent = list(record.get("absent") or {})
    text = ", ".join(sizes + ([f"not found: {', '.join(absent)}"] if absent else []))
    if status == "skipped":
        return f"skipped (finished earlier with the same settings: {record.get('outcome')})"
    return f"{status} in {record.get('seconds', 0):.1f} s" + (f": {text}" if text else "")


class BatchProgress:
    """``batch.Events`` for a person: a bar over the cases (tqdm) above `segment`'s bar for the current
    case on a terminal; off a terminal a line per case and `segment`'s progress lines."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and _is_terminal(self.stream)
        self.total = self.finished = 0
        self.outer = None
        self.inner: ProgressBar | None = None

    def _say(self, line: str) -> None:
        if not self.enabled:
            return
        if self.outer is not None:
            self.outer.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def start(self, total: int, to_run: int) -> None:
        self.total = total
        self._say(f"{total} case(s): {to_run} to run, {total - to_run} finished or refused already")
        if self.tty:
            from tqdm import tqdm

            self.outer = tqdm(total=total, unit="case", file=self.stream, desc="cases",
                              bar_format="{desc:<20} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")

    def case_started(self, name: str) -> None:
        self._close_inner()
        if self.outer is not None:
            self.outer.set_description_str(name[:20])
        self.inner = ProgressBar(enabled=self.enabled, stream=self.stream)

    def progress(self, stage: str, done: int, total: int) -> None:
        if self.inner is not None:
            self.inner(stage, done, total)

    def case_done(self, record: dict) -> None:
        self._close_inner()
        self.finished += 1
        self._say(f"[{self.finished}/{self.total}] {record['case']}: {describe(record)}")
        if self.outer is not None:
            self.outer.update(1)

    def _close_inner(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None

    def close(self) -> None:
        self._close_inner()
        if self.outer is not None:
            self.outer.close()
            self.outer = None
