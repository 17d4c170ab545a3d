"""deepbet: T1 brain extraction with the TorchScript networks that ship in the deepbet wheel.

Two stages, as the deepbet authors define them: a coarse network on the whole head at
128^3 finds the brain's bounding box (plus 10 % margin), a fine network segments the
box resampled to 256^3, and the result is resampled back (nearest, as they do). Inputs
are presented in RAS-closest canonical axis order, intensities clipped to the 0.5-99.5
percentile range of the coarse image and standardised. We use only the model files
from the package (found via its metadata), not its code, so none of its extra
dependencies are imported.
"""
from __future__ import annotations

import numpy as np

from biomedseg.errors import CancelledError, InputError
from biomedseg.models.base import Backend, LoadContext, Plan
from biomedseg.results import ModelOutput
from biomedseg.runtime.postprocess import largest_component
from biomedseg.runtime.weights import trusted_code_bytes
from biomedseg.volume import Volume

COARSE_SHAPE = (128, 128, 128)
FINE_SHAPE = (256, 256, 256)
BOX_MARGIN = 0.1
BOX_OCCUPANCY = 0.02  # a plane belongs to the box when >2 % of its coarse voxels are brain


class DeepBetBackend(Backend):
    """Two TorchScript stages; keeps the largest component and fills voids (model.json's postprocess)."""

    def load(self, context: LoadContext) -> None:
        """TorchScript runs code when loaded: it is loaded from bytes checked as they were read."""
        import io

        import torch

        spec = context.entry.get("weights", {})
        self._torch = torch
        self.coarse, self.fine = (
            torch.jit.load(io.BytesIO(trusted_code_bytes(context.weight(name), spec)), map_location=self.device).eval()
            for name in ("bbox_model.pt", "model.pt"))

    def plan(self, volume: Volume, prompts, options: dict, *, plane: str = "axial") -> Plan:
        unknown = [p for p in prompts.texts if p.strip().lower() != "brain"]
        if unknown:
            raise InputError(f"deepbet segments only 'brain'; it cannot segment {', '.join(map(repr, unknown))}.")
        return Plan(units="stages")

    # ---- orientation ---------------------------------------------------------------------
    @staticmethod
    def _to_canonical(volume: Volume):
        """(k, j, i) array -> (R, A, S)-ordered array and the orientation used."""
        import nibabel.orientations as no

        ornt = no.io_orientation(volume.ijk_to_ras)
        data = np.transpose(volume.grayscale(), (2, 1, 0))
        return no.apply_orientation(data, ornt), ornt

    @staticmethod
    def _from_canonical(array: np.ndarray, ornt) -> np.ndarray:
        import nibabel.orientations as no

        back = no.ornt_transform(no.axcodes2ornt("RAS"), ornt)
        return np.ascontiguousarray(np.transpose(no.apply_orientation(array, back), (2, 1, 0)))

    # ---- the two stages -----------------------------------------------------------------
    def _normalise(self, x, low, high):
        x = ((x - low) / (high - low)).clamp(0, 1)
        x = (x - x.mean()) / x.std()
        return 0.226 * x + 0.449

    def _resize(self, x, shape):
        return self._torch.nn.functional.interpolate(x[None, None], size=shape, mode="nearest-exact")[0, 0]

    @staticmethod
    def _bounding_box(coarse_mask: np.ndarray, full_shape) -> tuple[slice, ...]:
        mask = largest_component(coarse_mask)
        box = []
        for axis in range(3):
            others = tuple(a for a in range(3) if a != axis)
            occupied = np.nonzero(mask.mean(axis=others) > BOX_OCCUPANCY)[0]
            if occupied.size == 0:
                raise InputError("deepbet found no brain in this image; is it a T1-weighted head MRI?")
            scale = full_shape[axis] / mask.shape[axis]
            centre = (occupied.max() + 1 + occupied.min()) / 2 * scale
            size = (occupied.max() + 1 - occupied.min()) * scale * (1 + 2 * BOX_MARGIN)
            centre, size = np.round(centre), np.round(size)
            box.append(slice(max(0, int(centre - size / 2)), min(full_shape[axis], int(centre + size / 2))))
        return tuple(box)

    def run(self, volume: Volume, prompts, plan: Plan, *, progress, cancelled) -> ModelOutput:
        torch = self._torch
        stages = 4

        def step(done, name):
            if cancelled():
                raise CancelledError("Segmentation was cancelled; nothing was written.")
            progress(name, done, stages)

        step(0, "preparing")
        canonical, ornt = self._to_canonical(volume)
        with torch.inference_mode():
            x = torch.nan_to_num(torch.as_tensor(np.ascontiguousarray(canonical), dtype=torch.float32,
                                                 device=self.device))
            small = self._resize(x, COARSE_SHAPE)
            low, high = torch.quantile(small.flatten(), torch.tensor([0.005, 0.995], device=self.device))
            if float(high - low) <= 0:
                raise InputError("The image has (almost) constant intensity; deepbet cannot find a brain in it.")
            step(1, "locating brain")
            coarse = self.coarse(self._normalise(small, low, high)[None, None])[0, 1]
            box = self._bounding_box((coarse > 0.5).cpu().numpy(), tuple(x.shape))
            step(2, "segmenting brain")
            crop = x[box]
            fine = self.fine(self._normalise(self._resize(crop, FINE_SHAPE), low, high)[None, None])[0, 1]
            prob = torch.zeros_like(x)
            prob[box] = self._resize(fine, tuple(crop.shape))
            step(3, "restoring grid")
            result = self._from_canonical(prob.float().cpu().numpy(), ornt)
        progress("done", stages, stages)
        return ModelOutput({target: result.astype(np.float32) for target in prompts.targets})
