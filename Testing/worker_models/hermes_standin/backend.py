"""Model 'hermes-standin': Hermes' own backend (prompt mapping, preprocessing, sliding windows,
resampling back) around a stand-in network instead of the trained one, so geometry can be
checked through a real worker without a checkpoint."""
from biomedseg.models.base import Backend
from biomedseg.models.hermes.backend import HermesBackend


def intensity_net(threshold: float, slope: float = 20.0, mirror: bool = False, swap: bool = False):
    """Stand-in for Hermes-R: logit = slope * (threshold - x) for every task, so voxels whose
    preprocessed intensity is below ``threshold`` (a dark sphere) come out above 0.5.
    ``mirror`` / ``swap`` plant the bugs a geometry check has to catch."""
    import torch

    class IntensityNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.threshold, self.slope, self.mirror, self.swap = threshold, slope, mirror, swap
            self.calls = 0

        def forward(self, x, tgt_idx, mod_idx):
            self.calls += 1
            logit = self.slope * (self.threshold - x)
            if self.mirror:
                logit = torch.flip(logit, dims=(4,))
            if self.swap:
                logit = logit.transpose(2, 4)
            return logit.expand(-1, tgt_idx.shape[1], -1, -1, -1).contiguous(), torch.zeros(x.shape[0], 6)

    return IntensityNet()


def hermes_with(net, device="cpu") -> HermesBackend:
    """Hermes' own backend around ``net`` instead of the trained network (no checkpoint needed)."""
    backend = HermesBackend(device)
    backend.net = net
    return backend


class HermesStandInBackend(Backend):
    """Hermes' plan and run with ``intensity_net(options['threshold_z'])`` as the network."""

    def load(self, context):
        pass

    def plan(self, volume, prompts, options, *, plane="axial"):
        options = dict(options)
        threshold = float(options.pop("threshold_z"))
        plan = HermesBackend(self.device).plan(volume, prompts, options, plane=plane)
        plan.details["threshold_z"] = threshold
        return plan

    def run(self, volume, prompts, plan, *, progress, cancelled):
        backend = hermes_with(intensity_net(plan.details["threshold_z"]), self.device)
        return backend.run(volume, prompts, plan, progress=progress, cancelled=cancelled)
