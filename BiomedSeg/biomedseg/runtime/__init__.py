"""What every model needs at run time and no model owns: the device and its memory, finding
weights, the slice-wise and sliding-window strategies, and mask clean-up. Importing this
package does not import torch."""
