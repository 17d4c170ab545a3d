"""The engine's backend for UniBiomed: text findings with the masks they talk about.

The model is the authors' own (InternVL2.5 + SAM2, the hub's remote code, loaded by transformers
with ``trust_remote_code`` from the downloaded snapshot, in bf16 on CUDA as their code demands);
nothing of it is re-implemented here. This adapter:

1. ``plan``: settles the task (segment / findings / question), builds each request in the authors'
   phrasing (``prompting``) and the intensity window (``runtime.windows``), without the weights;
2. ``load``: checks the snapshot's remote code (``remote_code``) and the pinned transformers, then
   loads it; when flash-attn is not installed, transformers' import check is told to let it go,
   and the remote code runs its own attention fallback (reported);
3. ``run``: per request, chooses the 5 slices the language model sees (centred on the target:
   ``rank_slice`` asks BiomedCLIP when it is ready here, else the middle), sends the slice videos
   (``frames``; ``ranking``), reads the answer (text, one phrase per ``[SEG]``), and returns the masks on the
   input grid: one per prompt for *segment* (every ``[SEG]`` of its answer), one per grounded phrase
   for *findings* and *question* (named after the phrase, at most model.json's ``phrase_masks``),
   with ``Finding(sentence, segment names)`` per sentence.

An empty answer, or one without ``[SEG]``, is a result: a segment target is then absent with the
answer as the reason, and findings keep the text.
"""
from __future__ import annotations

import contextlib
import importlib.util

import numpy as np

from biomedseg.errors import DependencyMissingError, InputError, WeightsMissingError
from biomedseg.models.base import Backend, LoadContext, Plan
from biomedseg.prompts import PromptSet
from biomedseg.results import Absence, Finding, ModelOutput
from biomedseg.runtime.callbacks import check_cancel
from biomedseg.runtime.windows import choose_window
from biomedseg.volume import Volume

from .frames import LANGUAGE_FRAMES, Frames, check_masks, language_frames, restack, videos
from .prompting import build_request, clean_raw, parse_answer, segment_names, sentence_findings
from .ranking import SliceRanker
from .remote_code import check_snapshot, fetch_small_files, snapshot_folder

TASKS = ("segment", "findings", "question")
DEFAULT_PHRASE_MASKS = 8


def _slice_choice(value):
    """None ('auto') or a slice number from the ``slices`` option."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())):
        raise InputError(f"UniBiomed's 'slices' option must be 'auto' or a slice number, got {value!r}.")
    return int(value)


@contextlib.contextmanager
def _flash_attn_optional(installed: bool):
    """transformers refuses remote code whose files import a missing package, even where the code itself
    falls back without it (the authors' flash_attention.py); let that one package go when it is absent."""
    if installed:
        yield
        return
    from transformers import dynamic_module_utils as dmu

    original = dmu.get_imports
    dmu.get_imports = lambda filename: [name for name in original(filename) if name != "flash_attn"]
    try:
        yield
    finally:
        dmu.get_imports = original


class UniBiomedBackend(Backend):
    #: the device kind the authors' code runs on (``.cuda()`` is written into it)
    REQUIRED_DEVICE = "cuda"

    def __init__(self, device: str = "cuda"):
        super().__init__(device)
        self.model = None
        self.predict = None
        self.loaded: dict = {}
        self.phrase_masks = DEFAULT_PHRASE_MASKS
        self.ranker: SliceRanker | None = None

    # ---- plan ----------------------------------------------------------------------------
    def plan(self, volume: Volume, prompts: PromptSet, options: dict, *, plane: str = "axial") -> Plan:
        if self.REQUIRED_DEVICE and not self.device.startswith(self.REQUIRED_DEVICE):
            raise InputError(f"UniBiomed runs only on an NVIDIA GPU (its code is written for CUDA and bfloat16); "
                             f"this run would be on '{self.device}'.",
                             hint="Use a machine with an NVIDIA GPU and the unibiomed environment "
                                  "(biomedseg env create unibiomed).")
        task = options.get("task") or ("segment" if prompts.texts else "findings")
        texts = list(prompts.texts)
        if task == "segment" and not texts:
            raise InputError("UniBiomed's segment task needs the target to segment.",
                             hint="Give it with --prompt (e.g. --prompt liver), or ask for the findings with "
                                  "--option task=findings.")
        if task != "segment" and texts:
            where = "--option about=REGION" if task == "findings" else '--option question="..."'
            raise InputError(f"UniBiomed's {task} task takes no prompts (got {', '.join(map(repr, texts))}); its "
                             "masks are named after the phrases of the answer.", hint=f"Use {where} instead.")
        question = " ".join(str(options.get("question") or "").split())
        if task == "question" and not question:
            raise InputError("UniBiomed's question task needs the question.", hint='--option question="Is there a '
                                                                                  'lesion in the liver?"')
        if volume.channels_last:
            window, rule = None, "colour image as it is"
        else:
            lo, hi, rule = choose_window(volume, options.get("window"))
            window = (lo, hi)
        ground = True if options.get("ground") is None else bool(options["ground"])
        if task == "segment":
            requests = [(t, build_request("segment", target=t)) for t in texts]
        else:
            requests = [(None, build_request(task, about=options.get("about"), question=question, ground=ground))]
        details = {"task": task, "plane": plane, "window": window, "window_option": options.get("window"),
                   "slices": _slice_choice(options.get("slices")), "propagate": options.get("propagate") or "both",
                   "requests": requests}
        report = {"task": task, "requests": [text for _, text in requests], "window": rule,
                  "propagate": details["propagate"]}
        if window is not None:
            report["intensity_window"] = [float(window[0]), float(window[1])]
        return Plan(units="requests", details=details, report=report)

    # ---- weights -------------------------------------------------------------------------
    def load(self, context: LoadContext) -> None:
        import torch
        import transformers
        from biomedseg.runtime.weights import offline_mode

        self.phrase_masks = int(context.entry.get("phrase_masks", DEFAULT_PHRASE_MASKS))
        folder = snapshot_folder(context.weights[0])
        requires = context.entry.get("requires", [])
        check = check_snapshot(folder, requires)
        if check["problems"] and fetch_small_files(folder, offline_mode()):  # the catalogue fetched only the weights
            check = check_snapshot(folder, requires)
        if check["problems"]:
            raise WeightsMissingError(f"The UniBiomed files of commit {folder.name} are not what this adapter "
                                      f"expects: {'; '.join(check['problems'])}.",
                                      hint="Download them again while online (the code and tokenizer files come "
                                           "with the first run), or report the new upload.")
        pins = {p.split("==")[0]: p.split("==")[1] for p in context.entry.get("environment", {}).get("packages", [])
                if "==" in p}
        wanted = pins.get("transformers")
        if wanted and transformers.__version__ != wanted:
            raise DependencyMissingError(f"UniBiomed's remote code needs transformers {wanted}; this worker's Python "
                                         f"has {transformers.__version__}.",
                                         hint="Run `biomedseg env create unibiomed`; the CLI then starts this model's "
                                              "worker in that environment.")
        if not self.device.startswith("cuda") or not torch.cuda.is_available():
            raise InputError("UniBiomed runs only on an NVIDIA GPU, and none is visible to this worker.")
        torch.cuda.set_device(torch.device(self.device))
        flash = importlib.util.find_spec("flash_attn") is not None
        from transformers import AutoModel, AutoTokenizer

        with _flash_attn_optional(flash):
            model = AutoModel.from_pretrained(str(folder), torch_dtype=torch.bfloat16, low_cpu_mem_usage=True,
                                              use_flash_attn=flash, trust_remote_code=True,
                                              local_files_only=True).eval().cuda()
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
        self.model = model
        self.predict = lambda **kwargs: model.predict_forward(tokenizer=tokenizer, **kwargs)
        self.loaded = {"revision": folder.name, "flash_attn": flash, "transformers": transformers.__version__,
                       "torch": torch.__version__, "language_frames": check["language_frames"] or LANGUAGE_FRAMES,
                       "imports": check["imports"]}

    def modules(self) -> list:
        return [self.model] if self.model is not None else []

    def release(self) -> None:
        self.model = self.predict = self.ranker = None

    def ask(self, frames: Frames, order: list[int], text: str) -> dict:
        """One ``predict_forward``: a video of the frames in ``order`` (or the image of a one-slice input)."""
        context = contextlib.nullcontext()
        if self.model is not None:
            import torch

            context = torch.inference_mode()
        with context:
            if frames.count == 1:
                return self.predict(image=frames.image(order[0]), text=text)
            return self.predict(video=[frames.image(f) for f in order], text=text)

    # ---- which slices the language model sees ----------------------------------------------
    def rank_slice(self, volume: Volume, target: str, details: dict) -> tuple[int | None, str]:
        """(slice number, how) of BiomedCLIP's best slice for ``target``, or (None, why not): only when
        BiomedCLIP and its weights are already here (``ranking``; nothing is downloaded for it)."""
        if self.ranker is None:
            self.ranker = SliceRanker(self.device)
        try:
            if not self.ranker.available():
                return None, self.ranker.why
            number, score = self.ranker.best(volume, target, details["plane"], details.get("window_option"))
        except Exception as exc:  # noqa: BLE001 -- a ranking that fails leaves the middle, with the reason
            said = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            return None, f"BiomedCLIP's ranking failed ({said})"
        return number, f"BiomedCLIP's best slice for '{target}' (score {score:.3f})"

    def centre(self, frames: Frames, target: str | None, details: dict) -> tuple[int, str]:
        chosen = details.get("slices")
        if chosen is not None:
            return frames.frame_of_slice_number(chosen), f"slice {chosen} (chosen)"
        middle = frames.count // 2
        if target is None:
            return middle, "the middle of the slice range (findings and questions name no target to look for)"
        number, how = self.rank_slice(frames.volume, target, details)
        if number is None:
            return middle, f"the middle of the slice range ({how})"
        return frames.frame_of_slice_number(number), how

    # ---- run -----------------------------------------------------------------------------
    def run(self, volume: Volume, prompts: PromptSet, plan: Plan, *, progress, cancelled) -> ModelOutput:
        d = plan.details
        frames = Frames(volume, d["plane"], d["window"])
        height, width = frames.display.shape[1:3]
        lm_frames = int(self.loaded.get("language_frames") or LANGUAGE_FRAMES)
        out = ModelOutput(report={"task": d["task"], "answers": [], "remote_code": dict(self.loaded)})
        taken = list(prompts.targets)
        schedule = []
        for target, text in d["requests"]:
            centre, how = self.centre(frames, target, d)
            first = language_frames(frames.count, centre, lm_frames)
            schedule.append((target, text, how, first, videos(frames.count, first, d["propagate"])))
        total, done = sum(len(s[4]) for s in schedule), 0
        for target, text, how, first, passes in schedule:
            answered = []
            for name, order in passes:
                check_cancel(cancelled, "UniBiomed")
                progress(f"UniBiomed: {target or d['task']} ({name})", done, total)
                reply = self.ask(frames, order, text) or {}
                stacks = check_masks(reply.get("prediction_masks"), len(order), height, width)
                answered.append((name, order, str(reply.get("prediction") or ""), stacks))
                done += 1
                progress(f"UniBiomed: {target or d['task']} ({name})", done, total)
            self._read(out, frames, target, text, how, first, answered, taken)
        return out

    def _read(self, out: ModelOutput, frames: Frames, target, text, how, first, answered, taken) -> None:
        """One request's passes into masks, absences, findings and its report entry."""
        _, _, raw, stacks = answered[0]
        answer = parse_answer(raw, len(stacks), target)
        notes = list(answer.notes)
        used = [(answered[0][1], stacks)]
        for name, order, other, other_stacks in answered[1:]:
            if clean_raw(other) == clean_raw(raw) and len(other_stacks) == len(stacks):
                used.append((order, other_stacks))
            else:
                notes.append(f"the {name} pass answered differently ({clean_raw(other)[:200]!r}); its slices were "
                             "left without masks")
        shape = (frames.count,) + frames.display.shape[1:3]
        stacked = restack(shape, used, len(first), len(stacks))
        grounded = [(g, m) for g, m in zip(answer.grounded, stacked) if g.has_mask]
        if target is not None:
            names = [target] * len(answer.grounded)
            if grounded:
                union = np.logical_or.reduce([m for _, m in grounded])
                out.probabilities[target] = frames.to_volume(union).astype(np.uint8)
            else:
                said = f'UniBiomed answered "{answer.text[:300]}" without a [SEG] token, so it drew nothing' \
                    if answer.text else "UniBiomed gave an empty answer"
                out.absent[target] = Absence(said, "model")
        else:
            names = segment_names(answer, taken)
            kept = 0
            for (g, mask), name in zip(((g, m) for g, m in zip(answer.grounded, stacked)), names):
                if not g.has_mask:
                    continue
                if kept >= self.phrase_masks:
                    notes.append(f"'{name}' was not kept: at most {self.phrase_masks} masks per answer")
                    g.has_mask = False
                    continue
                out.probabilities[name] = frames.to_volume(mask).astype(np.uint8)
                taken.append(name)
                kept += 1
        findings = [Finding(sentence, list(dict.fromkeys(ts))) for sentence, ts in sentence_findings(answer, names)]
        if not findings and target is None:
            findings = [Finding("(UniBiomed gave an empty answer)", [])]
        out.findings.extend(findings)
        out.report["answers"].append({
            "target": target, "request": text, "answer": raw, "kind": answer.kind, "text": answer.text,
            "language_model_slices": [frames.slice_number(f) for f in first], "centre": how,
            "passes": [{"pass": name, "slices": [frames.slice_number(f) for f in order], "answer": other,
                        "masks": len(st)} for name, order, other, st in answered],
            "phrases": {name: g.phrase for g, name in zip(answer.grounded, names) if g.has_mask},
            "notes": notes})
