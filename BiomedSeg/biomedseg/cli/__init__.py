"""Command line: `biomedseg models | segment | refine | classify | doctor | serve | batch | env`.

Errors print one sentence and what to do, with an exit code by kind (2 bad input,
3 weights or dependencies missing, 4 out of memory, 5 cancelled, 1 anything else).
Outputs are never half-written and an existing output is not replaced without --overwrite.
"""
from __future__ import annotations

import argparse
import re
import sys

from .. import __version__
from ..errors import BiomedSegError
from .batch import add_batch_parser
from .catalogue import cmd_models
from .doctor import cmd_doctor, doctor_report, worker_report
from .environments import add_env_parser
from .prompt_args import prompts_file, prompts_of
from .serve import add_serve_parser, add_server_arguments
from .segment import add_model_run_arguments, cmd_classify, cmd_refine, cmd_segment, model_options, region_of

EXIT_CODES = {"bad_input": 2, "wrong_modality": 2, "weights_missing": 3, "dependency_missing": 3, "out_of_memory": 4, "cancelled": 5,
              "access_denied": 2, "server_unavailable": 6}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biomedseg", description="Biomedical foundation-model segmentation.")
    parser.add_argument("--version", action="version", version=f"biomedseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model catalogue, or show one model in full")
    p.add_argument("model", nargs="?", help="a model id: its targets per modality and site, options, weights, licence")
    p.add_argument("--json", action="store_true", help="machine-readable output (targets nested by modality and site)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("segment", help="segment an image file or DICOM folder")
    p.add_argument("input", help="NIfTI, NRRD, MHA, DICOM file or folder, PNG/JPEG/TIFF")
    p.add_argument("--model", default="deepbet", help="model id from `biomedseg models` (default: deepbet)")
    _prompt_arguments(p)
    _run_arguments(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("refine", help="refine a segment of a segmentation file with MedSAM2 (the segment is "
                                      "the prompt)")
    p.add_argument("input", help="the image the segmentation belongs to")
    p.add_argument("--segmentation", required=True, help=".seg.nrrd or labelmap holding the segment")
    p.add_argument("--segment", required=True, help="name of the segment to refine")
    p.add_argument("--model", default="medsam2", help="a model that takes mask prompts (default: medsam2)")
    p.add_argument("--only", action="store_true", help="write only the refined segment, not the others beside it")
    _run_arguments(p)
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("classify", help="zero-shot classification of an image with your labels (BiomedCLIP)")
    p.add_argument("input", help="image file (PNG/JPEG/TIFF, NIfTI, NRRD, DICOM...)")
    p.add_argument("--labels", nargs="+", required=True, help="two or more labels, each in quotes")
    p.add_argument("--model", default="biomedclip", help="a model that returns labels (default: biomedclip)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--series-uid", help="DICOM series to read when a folder holds several")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--weights", help="local weights file or folder instead of the catalogue's source")
    p.add_argument("--plane", choices=["axial", "coronal", "sagittal"], help="slice plane of a volume (default axial)")
    p.add_argument("--slice-range", type=int, nargs=2, metavar=("FIRST", "LAST"), help="only these slices")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="model option, e.g. template=...")
    p.add_argument("--in-process", action="store_true", help="run in this process instead of the worker")
    p.add_argument("--worker-python", help="Python executable for the worker")
    add_server_arguments(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("doctor", help="report Python, torch, devices, memory and model readiness")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", action="store_true", help="also start a worker and check it end to end")
    p.add_argument("--worker-python", help="Python executable for the worker to check")
    p.add_argument("--server", metavar="URL", help="also check a BiomedSeg server: token, version, a transfer through "
                                                   "its worker, its queue and its models' state there")
    p.add_argument("--token", help="the server's token (default: $BIOMEDSEG_TOKEN, or this machine's token file)")
    p.add_argument("--ca-cert", help="CA file that signed the server's TLS certificate")
    p.set_defaults(func=cmd_doctor)

    add_serve_parser(sub)  # `serve`: the worker behind HTTP (remote/)
    add_batch_parser(sub)  # `batch`: a cohort, locally or on a Ray cluster (cli/batch.py, batch/)
    add_env_parser(sub)  # `env create NAME`: a model's own Python environment (cli/environments.py)
    return parser


def _prompt_arguments(p) -> None:
    p.add_argument("--prompt", action="append", help="target to segment; repeat for several, or separate by commas")
    p.add_argument("--box", action="append", nargs="+", metavar="R1,A1,S1,R2,A2,S2",
                   help="box prompt: two RAS corners in mm (comma-separated or six numbers), drawn on --plane "
                        "(or 3D with --box-3d); repeatable")
    p.add_argument("--box-3d", action="store_true", help="--box prompts are 3D boxes, not boxes on one slice")
    p.add_argument("--point", action="append", nargs="+", metavar="R,A,S[,exclude]",
                   help="point prompt on the object (RAS mm; ',exclude' marks background); repeatable")
    p.add_argument("--exclude-point", action="append", nargs="+", metavar="R,A,S",
                   help="point prompt on the background (RAS mm); repeatable")
    p.add_argument("--prompts", metavar="FILE.json",
                   help="prompts for several objects and slices (see the README: a list of prompts, or objects)")
    p.add_argument("--target", help="name of the object the box and point prompts describe (default: object)")


def _run_arguments(p) -> None:
    p.add_argument("-o", "--output", required=True,
                   help="output: .seg.nrrd, .nii.gz, .nrrd labelmap, .dcm (DICOM SEG), or .json (labels, findings, "
                        "segment summary; for models that return no masks)")
    p.add_argument("--preview", help="also write a PNG with outlines (three orthogonal slices; one for a 2D image)")
    p.add_argument("--report", metavar="RUN.json", help="also write the run report: input, model, weights sha256, "
                                                        "options, what was decided and found, times (see the README)")
    p.add_argument("--probabilities", metavar="OUT.nrrd",
                   help="also write each target's probability map on the input grid (with the threshold used)")
    p.add_argument("--series-uid", help="DICOM series to read when a folder holds several")
    add_model_run_arguments(p)
    p.add_argument("--modality", help="image modality for the model (e.g. CT, MRI, MRI-T1); guessed from DICOM "
                                      "tags and intensities when not given")
    p.add_argument("--site", help="anatomic site (e.g. abdomen, head), for models with site-specific preprocessing")
    p.add_argument("--plane", choices=["axial", "coronal", "sagittal"],
                   help="slice plane: 2D (slice-wise) models cut along it, --slice-range and box prompts count "
                        "along it (default axial)")
    p.add_argument("--slice-range", type=int, nargs=2, metavar=("FIRST", "LAST"),
                   help="only slices FIRST..LAST (array indices along the --plane axis), for any model")
    p.add_argument("--batch-size", type=int, help="slices or windows per model call (default: chosen from free memory)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="any other backend option (value parsed as JSON when possible); repeatable")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--in-process", action="store_true",
                   help="run the model in this process instead of the background worker (debugging)")
    p.add_argument("--worker-python", help="Python executable for the worker (default: this one, or "
                                           "$BIOMEDSEG_WORKER_PYTHON)")
    p.add_argument("--free-text", action="store_true",
                   help="send text prompts the model does not list as written (free-text models only)")
    p.add_argument("--force", action="store_true",
                   help="run even when the image is not one of the model's modalities (say why in your notes)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the written paths")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the model's plan, report and weights")
    add_server_arguments(p)


GEOMETRY_FLAGS = ("--box", "--point", "--exclude-point")
_GEOMETRY_VALUE = re.compile(r"^(-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|include|exclude)(,(-?(\d+\.?\d*|\.\d+)"
                             r"([eE][-+]?\d+)?|include|exclude))*,?$", re.IGNORECASE)


def joined_geometry_arguments(argv: list[str]) -> list[str]:
    """``--box -29,-29,10 -10,-10,10`` as ``--box=-29,-29,10,-10,-10,10``: argparse would take a value
    that starts with a minus sign and holds a comma for an option. Every number (or comma list, or
    include/exclude) right after a geometry flag joins it."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token not in GEOMETRY_FLAGS:
            out.append(token)
            continue
        values = []
        while i < len(argv) and _GEOMETRY_VALUE.match(argv[i]):
            values.append(argv[i].rstrip(","))
            i += 1
        out.append(f"{token}={','.join(values)}" if values else token)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(joined_geometry_arguments(argv))
    try:
        return args.func(args)
    except BiomedSegError as err:
        print(f"error: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"  what to do: {err.hint}", file=sys.stderr)
        return EXIT_CODES.get(err.kind, 1)
    except KeyboardInterrupt:
        print("cancelled; nothing was written.", file=sys.stderr)
        return EXIT_CODES["cancelled"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["main", "build_parser", "EXIT_CODES", "doctor_report", "worker_report", "model_options",
           "prompts_of", "prompts_file", "region_of", "joined_geometry_arguments"]
