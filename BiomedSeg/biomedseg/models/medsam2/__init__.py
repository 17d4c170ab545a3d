"""MedSAM2 (SAM2.1 Hiera-T, 512x512) re-implemented in plain PyTorch under the authors' names."""
