"""BiomedParse v2 (the authors' branch ``v2``: BoltzFormer decoder, existence head, 3D slice by slice)
re-implemented in plain PyTorch.

The network side -- ``network``, ``decoder``, ``sampler`` (Boltzmann attention sampling),
``preprocess`` (pad to square, uint8 bicubic resize to 512, slice packing with the neighbours),
``postprocess`` (slice NMS), ``checkpoint`` (strict loading of ``biomedparse_v2.ckpt``) and
``inference`` (``V2Inference``: encode slices, tokenise prompts, decode) -- is the one path both
the backend and the parity tests run. The engine side is ``backend`` (the slice-wise run:
display orientation, the intensity rule, batches, feature cache, existence gating, the result on
the input grid) and ``targets`` (modalities, sites, CT windows; no torch). The recommended
targets are ``biomedparse_v2_targets.json``. Importing this package does not import torch.
"""
