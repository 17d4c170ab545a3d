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


def model_record(e) -> dict:
    """One model as `models --json` gives it: targets nested {modality: {site: [name, ...]}}."""
    return {
        "id": e.id, "version": e.version, "family": e.family, "title": e.title, "task": e.task,
        "input": e.input, "prompt_kind": e.prompt_kind, "modalities": e.modalities,
        "targets": e.target_table(), "target_names": e.targets(), "synonyms": synonyms_of(e), "weights": e.weights,
        **{f"state_{k}": v for k, v in e.state().items()}, "prompt_types": e.prompt_types, "results": e.results,
        "options": e.options, "interactive": e.interactive, "reference": e.data.get("reference"),
        "free_text": e.prompt_kind == "text" and not e.data.get("prompts_free_text"),
    }


def synonyms_of(e) -> dict:
    """{target: [other words for it]} from the model's ``synonyms_provider``, when it has one."""
    path = e.data.get("synonyms_provider")
    return dict(e.resolve(path)()) if path else {}


def cmd_models(args) -> int:
    from ..catalog import PROBLEMS, get_model, load_catalog

    chosen = [get_model(args.model)] if args.model else list(load_catalog())
    entries = [model_record(e) for e in chosen]
    for problem in PROBLEMS:
        print(f"warning: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(entries[0] if args.model else entries, indent=2))
        return 0
    if args.model:
        print_model(entries[0])
        return 0
    rows = [[m["id"], m["input"].upper(), m["prompt_kind"], ",".join(m["modalities"]), m["weights"]["license"].split(" ")[0]
             + (" (gated)" if m["weights"]["gated"] else ""), m["state_state"]] for m in entries]
    _print_table(rows, ["model", "input", "prompt", "modalities", "licence", "state on this machine"])
    print()
    for m in entries:
        names = m["target_names"]
        print(f"{m['id']}: {m['task']}")
        if names:
            print(f"    {len(names)} target(s): {', '.join(names[:6])}{', …' if len(names) > 6 else ''}"
                  f"  (all of them: biomedseg models {m['id']})")
        if not m["state_ready"]:
            print(f"    to use it: {m['state_detail']}")
    return 0


def print_model(m: dict) -> None:
    """One model in full: what it does, its targets per modality and site, prompts, options, weights."""
    from ..catalog import TYPE_WORDS

    print(f"{m['id']}  {m['title']} (version {m['version']})")
    print(f"  {m['task']}")
    print(f"  input: {m['input'].upper()}; modalities: {', '.join(m['modalities'])}")
    print(f"  prompts: {', '.join(m['prompt_types'])}" + ("; free text with --free-text" if m["free_text"] else "")
          + f"; returns {', '.join(m['results'])}")
    if m["targets"]:
        print("  targets:")
        for modality, sites in m["targets"].items():
            for site, names in sites.items():
                print(f"    {modality} / {site}: {', '.join(names)}")
    if m["synonyms"]:
        print("  also understood:")
        for name, words in sorted(m["synonyms"].items()):
            print(f"    {name}: {', '.join(words)}")
    if m["options"]:
        print("  options (--option NAME=VALUE):")
        for name, spec in sorted(m["options"].items()):
            kind = TYPE_WORDS.get(spec["type"], spec["type"])
            kind += f" {', '.join(map(str, spec['choices']))}" if spec.get("choices") else ""
            default = "" if spec.get("default") is None else f"; default {json.dumps(spec['default'])}"
            print(f"    {name} ({kind}{default}): {spec['help']}")
    w = m["weights"]
    where = {"hub": f"the hub repository {w.get('repo')} ({', '.join(w['files'])})",
             "package": f"the Python package {w.get('package')}"}.get(w["source"], "a file you give with --weights")
    print(f"  weights: {where}" + (f", about {w['size_bytes'] / 1e9:.1f} GB" if w.get("size_bytes") else ""))
    print(f"  licence: {w['license']}" + (" (gated: accept it on the model page and log in)" if w.get("gated") else ""))
    if m.get("reference"):
        print(f"  reference: {m['reference']}")
    print(f"  state here: {m['state_state']} - {m['state_detail']}")
