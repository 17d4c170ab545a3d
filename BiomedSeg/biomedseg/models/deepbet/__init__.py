"""deepbet (Fisch et al. 2024): T1 brain extraction with the TorchScript networks that ship in
the deepbet wheel. Importing this package does not import torch."""
