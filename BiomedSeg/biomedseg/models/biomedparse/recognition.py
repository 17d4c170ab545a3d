"""The authors' p-value test and recognition rules applied to the slices of a volume (the statistics
themselves are in ``pvalue``).

p-values on volumes. The authors fitted their reference distributions to single 2D images
(each statistic is the mean over one image's mask), and v1 was trained on slices that
contain the target, so it draws something for any prompt. The test is therefore applied
where it was defined: per slice, on the model-grid image and probabilities, for every slice
whose map has a pixel >= 128/255. With scope "slice" a slice whose adjusted p-value is below
the threshold has that prompt's map set to zero; a prompt left with no voxel above the
threshold is reported absent by the runner instead of being written as noise. With scope
"volume" no slice is changed, and a prompt is zeroed (absent) only when no checked slice
passes. Prompts without a reference distribution for the modality/site are not checked.

Recognition follows the authors' ``interactive_infer_image_all``: every candidate target
(``targets.recognition_targets``: the catalogue's targets for the modality and site that have
a reference distribution; requested prompts must be among them) is decoded on its own; per
slice, candidates whose p-value is below the threshold are rejected; the rest, best p-value
first, go through ``recognize_slice``. A target keeps its probabilities on the pixels assigned
to it and gets zero elsewhere.

Importing this module does not import torch (the tensors come from the caller).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from biomedseg.errors import InputError
from . import targets as tg


def slice_p_values(probs, images, prompts: list[str], params: dict) -> dict:
    """{(slice, prompt index): adjusted p-value} for the prompts with Beta parameters in ``params`` and a
    mask on that slice. ``probs`` [B, P, S, S] on the model grid, ``images`` the uint8 model images [B, 3, S, S]."""
    from .pvalue import p_value_of_stats

    out = {}
    mask = probs.double() * 255
    rgb = images.double()
    for i, prompt in enumerate(prompts):
        prompt_params = params.get(prompt)
        if prompt_params is None:
            continue
        for s in range(probs.shape[0]):
            m = mask[s, i]
            if float(m.max()) <= 127:
                continue  # no mask on this slice: nothing to test
            sel = m >= 128
            n = sel.sum()
            if int(n) == 0:
                continue
            stats = [float(m[sel].sum() / n / 256)] + [float(rgb[s, c][sel].sum() / n / 256) for c in range(3)]
            out[(s, i)] = p_value_of_stats(stats, prompt_params).p_value
    return out


def recognize_slice(probs, order: list[int]) -> dict:
    """The authors' overlap rules on one slice's probability maps ``probs`` [P, H, W] (torch).

    ``order``: indices of the candidates that passed the p-value test, best p-value first.
    Returns {index: bool mask} of the targets recognised on this slice.
    1. Keep a candidate unless its mask (> 0.5) is empty or more than half of it lies in the mask of
       an already kept candidate.
    2. Over the pixels where some kept candidate is above 0.1, give each pixel to the candidate with
       the highest probability (first in ``order`` on ties). Drop a candidate that wins less than half
       of its own > 0.1 area, unless it has the highest mean probability over that area.
    3. Each pixel goes to the most probable remaining candidate that is above 0.5 there.
    """
    import torch

    kept, kept_masks = [], []
    for i in order:
        region = probs[i] > 0.5
        area = int(region.sum())
        if area == 0:
            continue
        if any(int((region & other).sum()) > 0.5 * area for other in kept_masks):
            continue
        kept.append(i)
        kept_masks.append(region)
    if not kept:
        return {}
    maps = probs[kept]  # [K, H, W] in kept order
    above = maps > 0.1
    area = above.flatten(1).sum(1)
    mean = torch.where(area > 0, (maps * above).flatten(1).sum(1) / area.clamp_min(1), torch.zeros_like(maps[:, 0, 0]))
    covered = above.any(0)
    winner = torch.where(above, maps, torch.full_like(maps, -1.0)).argmax(0)
    won = torch.stack([((winner == k) & covered).sum() for k in range(len(kept))])
    best = int(mean.argmax())  # first of the most confident
    keep = [k for k in range(len(kept)) if k == best or not bool(won[k] < 0.5 * area[k])]
    candidates = maps[keep]
    eligible = candidates > 0.5
    choice = torch.where(eligible, candidates, torch.full_like(candidates, -1.0)).argmax(0)
    assigned = eligible.any(0)
    return {kept[k]: (choice == j) & assigned for j, k in enumerate(keep)}


@dataclass
class SliceChecks:
    """The test's settings for one run and what it found: ``records`` {prompt: {"checked", "rejected",
    "passed"}} counts slices over the run. ``checks`` {prompt: targets.Check}, ``params`` {prompt: [[a, b] x 4]}."""

    p_value: float = 0.0
    scope: str = "slice"
    recognize: bool = False
    checks: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)

    def __post_init__(self):
        for prompt in self.checks:
            self.records.setdefault(prompt, {"checked": 0, "rejected": 0, "passed": 0})

    def apply(self, probs, images, prompts: list[str]):
        """Probabilities [B, P, S, S] of a batch after the test (or recognition); unchanged when off."""
        if self.recognize:
            return self.recognize_slices(probs, images, prompts)
        if self.p_value > 0 and self.checks:
            return self.apply_p_values(probs, images, prompts)
        return probs

    def apply_p_values(self, probs, images, prompts: list[str]):
        """Count every tested slice; with scope "slice", zero the maps that fail (in place)."""
        for (s, i), p in slice_p_values(probs, images, prompts, self.params).items():
            record = self.records[prompts[i]]
            record["checked"] += 1
            record["best_p"] = max(record.get("best_p", 0.0), float(p))
            if p < self.p_value:
                record["rejected"] += 1
                record["best_rejected_p"] = max(record.get("best_rejected_p", 0.0), float(p))
                if self.scope == "slice":
                    probs[s, i] = 0
            else:
                record["passed"] += 1
        return probs

    def recognize_slices(self, probs, images, prompts: list[str]):
        """The recognition rules per slice: probabilities kept on the pixels each target wins, zero elsewhere."""
        pvals = slice_p_values(probs, images, prompts, self.params)
        out = probs.new_zeros(probs.shape)
        for s in range(probs.shape[0]):
            kept = []
            for i, prompt in enumerate(prompts):
                p = pvals.get((s, i))
                if p is None:
                    continue
                record = self.records[prompt]
                record["checked"] += 1
                if self.p_value > 0 and p < self.p_value:
                    record["rejected"] += 1
                    continue
                kept.append((p, i))
            order = [i for _, i in sorted(kept, key=lambda t: -t[0])]  # stable: ties keep the candidate order
            for i, mask in recognize_slice(probs[s], order).items():
                out[s, i] = probs[s, i] * mask
                self.records[prompts[i]]["passed"] += 1
        return out

    def absent_in_volume(self) -> list[str]:
        """With scope "volume": the prompts tested on some slice and passed on none (to be zeroed)."""
        if self.p_value <= 0 or self.scope != "volume" or self.recognize:
            return []
        return [p for p, record in self.records.items() if record["checked"] and not record["passed"]]


def recognition_prompts(requested: list[str], modality: str, site: str | None, dist: dict) -> list[str]:
    """What recognition decodes: the requested prompts, then the other candidates for the modality and site.
    Raises InputError when there is no candidate or a requested prompt is not one."""
    where = f"{modality}{' ' + site if site else ''}"
    candidates = tg.recognition_targets(modality, site, dist)
    if not candidates:
        raise InputError(f"Recognition has no candidate targets for {where}: none of the catalogue's targets "
                         "there has a reference distribution.", hint="Segment the targets by name instead.")
    lower = {c.lower(): c for c in candidates}
    bad = [p for p in requested if " ".join(p.lower().split()) not in lower]
    if bad:
        raise InputError(f"Recognition can only test targets with a reference distribution for {where}; "
                         f"{', '.join(map(repr, bad))} {'has' if len(bad) == 1 else 'have'} none.",
                         hint="Candidates: " + ", ".join(candidates) + ".")
    chosen = [lower[" ".join(p.lower().split())] for p in requested]
    return list(requested) + [c for c in candidates if c not in chosen]


def p_value_report(prompts: list[str], p_value: float, recognize: bool, dist: dict | None, checks: dict,
                   records: dict, note: str = "") -> dict:
    """{prompt: "off" | "not checked: why" | {modality_type, target, checked, rejected, passed}} for ``last_run``."""
    if p_value <= 0 and not recognize:
        return {p: "off" for p in prompts}
    if dist is None:
        return {p: f"not checked: {note}" for p in prompts}
    out = {}
    for p in prompts:
        check = checks.get(p)
        if check is None or check.modality_type is None:
            out[p] = f"not checked: {check.reason if check else 'no distribution'}"
        else:
            out[p] = {"modality_type": check.modality_type, "target": check.target, **records.get(p, {})}
    return out
