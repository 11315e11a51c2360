"""Test-session settings."""
import torch

# The suite is dominated by small tensors, where a second intra-op thread costs more in synchronisation than it
# gains; one thread also keeps timings stable when the machine is shared.
torch.set_num_threads(1)
