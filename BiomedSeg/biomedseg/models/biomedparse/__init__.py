"""BiomedParse v1 (Zhao et al., Nature Methods 2024) re-implemented in plain PyTorch.

Modules, one job each: ``tokenizer`` (CLIP BPE and where its vocabulary comes from),
``preprocess`` (the authors' intensity windowing, padding and resize, exact and batched),
``backbone`` (FocalNet-L), ``pixel_decoder`` (transformer encoder + FPN), ``text_encoder``
(CLIP text transformer), ``decoder`` (SEEM decoder), ``model`` (assembly under the
checkpoint's names), ``checkpoint`` (strict loading of ``biomedparse_v1.pt`` into the model),
``inference`` (the forward pass on model images: image and text encoding, per-prompt and
joint decoding, query matching, upsampling -- the one path both the backend and the parity
tests run), ``pvalue`` (the authors' mask plausibility statistics), ``recognition`` (that
test and the recognition rules applied per slice), ``targets`` (modalities, sites and
targets), ``sizing`` (batch size and feature-cache memory), ``backend`` (the engine's
slice-wise backend). Importing this package does not import torch.
"""
