"""Hermes-R (Gao et al., CVPR 2024): a universal 3D segmenter prompted by task and
modality ids, re-implemented in plain PyTorch with the authors' parameter names.

Modules: ``network`` (the model), ``checkpoint`` (loading the authors' files),
``tasks`` (typed prompts -> task ids), ``preprocess`` (their resampling and
normalisation, and the way back to the input grid), ``inference`` (their sliding
window). Importing this package does not import torch.
"""
