"""Model backends. Each knows nothing about Slicer, files or processes: it takes a Volume
(or prepared tensors) and prompts and returns probabilities on the input's voxel grid."""
