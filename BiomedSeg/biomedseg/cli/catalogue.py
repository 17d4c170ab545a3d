"""`biomedseg models`: the catalogue as a table, or one model in full."""
from __future__ import annotations

import json
import sys


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def cmd_models(args) -> int:
    from ..catalog import describe_options, load_catalog

    entries = []
    for e in load_catalog():
        w = e.weights
        entries.append({
            "id": e.id, "version": e.version, "family": e.family, "title": e.title, "task": e.task,
            "input": e.input, "prompt_kind": e.prompt_kind, "modalities": e.modalities,
            "targets": e.targets(), "weights": w, **{f"state_{k}": v for k, v in e.state().items()},
            "prompt_types": e.prompt_types, "results": e.results, "options": e.options,
            "interactive": e.interactive,
        })
    from ..catalog import PROBLEMS

    for problem in PROBLEMS:
        print(f"warning: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    rows = [[m["id"], m["input"].upper(), m["prompt_kind"], ",".join(m["modalities"][:3])
             + ("…" if len(m["modalities"]) > 3 else ""), m["weights"]["license"].split(" ")[0]
             + (" (gated)" if m["weights"]["gated"] else ""), m["state_state"]] for m in entries]
    _print_table(rows, ["model", "input", "prompt", "modalities", "licence", "state on this machine"])
    print()
    for m in entries:
        targets = ", ".join(m["targets"][:10]) + (f", … ({len(m['targets'])} in all)" if len(m["targets"]) > 10 else "")
        print(f"{m['id']}: {m['task']}")
        if targets:
            print(f"    prompts: {targets}")
        if m["prompt_types"] != ["text"]:
            print(f"    prompt types: {', '.join(m['prompt_types'])}; returns {', '.join(m['results'])}")
        if m["options"]:
            print(f"    options: {describe_options(m['options'])}")
        if not m["state_ready"]:
            print(f"    to use it: {m['state_detail']}")
    return 0
