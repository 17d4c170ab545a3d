"""BiomedParse v1 (Zhao et al., Nature Methods 2024) re-implemented in plain PyTorch.

Modules, one job each: ``tokenizer`` (CLIP BPE), ``preprocess`` (the authors' intensity
windowing, padding and resize), ``backbone`` (FocalNet-L), ``pixel_decoder`` (transformer
encoder + FPN), ``text_encoder`` (CLIP text transformer), ``decoder`` (SEEM decoder),
``model`` (assembly under the checkpoint's names), ``checkpoint`` (strict loading of
``biomedparse_v1.pt``), ``inference`` (joint and per-prompt decoding), ``pvalue`` (the
authors' mask plausibility test). Importing this package does not import torch.
"""
