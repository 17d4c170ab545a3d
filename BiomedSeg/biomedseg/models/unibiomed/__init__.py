"""UniBiomed (Wu et al. 2025, Apache-2.0): the authors' own model (InternVL2.5 + SAM2, hub remote code) run in
its own CUDA environment; this folder only frames the image, asks, parses and puts the masks back."""
