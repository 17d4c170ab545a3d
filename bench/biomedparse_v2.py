"""BiomedParse v2 on a CT volume: BiomedSeg's engine against the authors' loop run the naive way.

The input is bench/biomedparse.py's synthetic abdominal CT (int16 HU, LPS). Weights are the
deterministic name-keyed ones (shared/parity/detweights.py) written as a Lightning-style
checkpoint (``state_dict`` under ``model.``, without the pixel mean/std buffers, as the authors'
loader fills them), so the figures are about speed, not segmentation quality.

  naive   -- the authors' volume loop (``inference.segment_slices``: pack each batch of 4 slices with
             its neighbours, encode, decode every prompt of the call) called once per prompt, as a
             person adding one prompt after another gets it from their script: every prompt
             encodes every slice again. Then their ``postprocess`` and the way back to the grid.
  engine  -- ``biomedseg.engine.segment`` with the v2 backend: the same slices encoded once in
             batches of 4 and kept in the feature cache; each new prompt runs only the decoder.

Both use the seed-0 sampler and batches of 4, so the first prompt's maps must agree (printed).
Printed, one ``name: value`` per line: encode seconds per 512x512 slice, decode seconds per
prompt per slice, ``seconds_per_slice`` (encode + one prompt, the engine's first run / slices),
the re-prompt speed-up, peak RSS, and ``speedup_vs_naive`` (naive / engine over the prompts asked
one after another). CPU defaults (4 slices of 256x256) finish in a few minutes on 2 cores.
Usage: python bench/biomedparse_v2.py [--device auto|cpu|cuda] [--slices N] [--rows R] [--prompts a,b,c]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from common import load_detweights  # noqa: E402  (also puts the engine on sys.path)
from biomedparse import PeakMemory, synthetic_ct  # noqa: E402

MODEL = "biomedparse-v2"


def write_checkpoint(folder: Path) -> Path:
    """Deterministic weights as the released file is laid out (Lightning ``state_dict``, prefix ``model.``)."""
    import torch

    from biomedseg.models.biomedparse_v2.checkpoint import OPTIONAL_KEYS, PREFIX, expected_shapes

    shapes = {k: s for k, s in expected_shapes().items() if k not in OPTIONAL_KEYS}
    state = load_detweights().det_state_dict(shapes)
    path = folder / "biomedparse_v2.ckpt"
    torch.save({"state_dict": {PREFIX + k: v for k, v in state.items()}}, path)
    return path


def naive_segment(inference, volume, prompt: str, device: str) -> np.ndarray:
    """The authors' loop for one prompt on the axial slices (an LPS volume's k planes), back on the grid."""
    import torch

    from biomedseg.models.biomedparse_v2 import postprocess, preprocess
    from biomedseg.models.biomedparse_v2.backend import intensity_bounds_of, to_uint8
    from biomedseg.models.biomedparse_v2.inference import segment_slices
    from biomedseg.models.biomedparse_v2.sampler import BoltzmannSampler
    from biomedseg.models.biomedparse_v2.targets import V2_CT_WINDOWS

    u8 = to_uint8(volume.array, intensity_bounds_of(volume.array, V2_CT_WINDOWS["soft tissue"], "CT"))
    resized, pad_width, padded = preprocess.resize_to_model(u8)
    with torch.no_grad():
        logits, existence = segment_slices(inference, resized.to(device), [prompt], 4, BoltzmannSampler.seeded(0))
        probs, _ = postprocess.postprocess(postprocess.probabilities_512(logits), existence)
        return preprocess.restore_from_model(probs[0], pad_width, padded).float().cpu().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--slices", type=int, default=None, help="slices in the volume (default 4 on CPU, 32 on GPU)")
    parser.add_argument("--rows", type=int, default=None, help="slice edge in voxels (default 256 on CPU, 512 on GPU)")
    parser.add_argument("--prompts", default="liver,spleen,left kidney", help="asked one after another")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of both ways, alternated; the fastest time of each prompt counts (a shared "
                             "machine's load moves single runs by 2-5x)")
    args = parser.parse_args()

    import torch

    from biomedseg.engine import load_backend, segment
    from biomedseg.runtime.device import resolve_device

    device, reason = resolve_device(args.device)
    gpu = device.startswith("cuda")
    n_slices, rows = args.slices or (32 if gpu else 4), args.rows or (512 if gpu else 256)
    prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
    volume = synthetic_ct(n_slices, rows)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {device} ({reason})")
    print(f"volume: {n_slices} axial slices of {rows}x{rows} (int16 HU) -> 512x512 with neighbours; prompts {prompts}")
    tmp = tempfile.TemporaryDirectory(prefix="biomedparse-v2-bench-")
    t = time.perf_counter()
    checkpoint = write_checkpoint(Path(tmp.name))
    print(f"deterministic checkpoint written in {time.perf_counter() - t:.1f} s")
    backend, _ = load_backend(MODEL, device, str(checkpoint))
    inference = backend.inference

    def sync():
        if gpu:
            torch.cuda.synchronize()

    # warm-up (allocator, kernels) and the parts on their own: one batch of 4 packed slices
    from biomedseg.models.biomedparse_v2 import preprocess
    from biomedseg.models.biomedparse_v2.sampler import BoltzmannSampler

    batch = torch.as_tensor(preprocess.pack_slices(torch.zeros(4, 512, 512, dtype=torch.uint8), 0, 4)).to(device)
    tokens = inference.prompt_tokens(prompts[:1])
    with torch.no_grad():
        inference.decode(inference.encode(batch[:1]), tokens, BoltzmannSampler.seeded(0))
        sync()
        t0 = time.perf_counter()
        features = inference.encode(batch)
        sync()
        encode_s = (time.perf_counter() - t0) / 4
        t0 = time.perf_counter()
        inference.decode(features, tokens, BoltzmannSampler.seeded(0))
        sync()
        decode_s = (time.perf_counter() - t0) / 4
    del features

    options = {"existence_threshold": 0.5}
    engine_times, naive_times = [float("inf")] * len(prompts), [float("inf")] * len(prompts)
    engine_out, naive_first = {}, None
    for round_ in range(max(1, args.repeat)):
        backend.cache.clear()  # every round starts cold: the first prompt encodes
        with PeakMemory(device) as engine_mem:
            for i, prompt in enumerate(prompts):
                sync()
                t0 = time.perf_counter()
                result = segment(volume, MODEL, [prompt], device=device, weights=str(checkpoint), options=options,
                                 keep_probabilities=True, free_text=True)
                sync()
                engine_times[i] = min(engine_times[i], time.perf_counter() - t0)
                engine_out[prompt] = result.probabilities.get(prompt)
                print(f"round {round_ + 1} engine '{prompt}': {time.perf_counter() - t0:.2f} s, encoded "
                      f"{result.report['encoded_slices']} slices, cache {result.report['cache']}")
        with PeakMemory(device) as naive_mem:
            for i, prompt in enumerate(prompts):
                sync()
                t0 = time.perf_counter()
                out = naive_segment(inference, volume, prompt, device)
                sync()
                naive_times[i] = min(naive_times[i], time.perf_counter() - t0)
                naive_first = out if naive_first is None else naive_first
                print(f"round {round_ + 1} naive  '{prompt}': {time.perf_counter() - t0:.2f} s "
                      f"(encodes all {n_slices} slices again)")
    first = engine_out[prompts[0]]
    diff = float(np.abs(first - naive_first).max()) if first is not None else float(np.abs(naive_first).max())
    print(f"first prompt, engine vs naive probabilities: max |diff| {diff:.2e}")
    reprompt = float(np.mean(engine_times[1:])) if len(engine_times) > 1 else float("nan")
    print(f"encode_seconds_per_slice: {encode_s:.3f}")
    print(f"decode_seconds_per_prompt_per_slice: {decode_s:.3f}")
    print(f"seconds_per_slice: {engine_times[0] / n_slices:.3f}")
    print(f"reprompt_seconds_per_slice: {reprompt / n_slices:.3f}")
    print(f"reprompt_speedup: {engine_times[0] / reprompt:.2f}")
    print(f"peak_rss_gb: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f}")
    print(f"peak_extra_gb_engine: {engine_mem.peak / 1e9:.2f}")
    print(f"peak_extra_gb_naive: {naive_mem.peak / 1e9:.2f}")
    print(f"speedup_vs_naive: {sum(naive_times) / sum(engine_times):.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
