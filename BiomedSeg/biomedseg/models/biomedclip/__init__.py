"""BiomedCLIP (Microsoft, MIT): image-text embeddings in plain PyTorch; the API is in network.py's docstring."""
