"""Settings shared by the whole test suite."""

import torch

# The test models are tiny: intra-op threads only add overhead, and on small
# (2-vCPU) machines MKL/OpenMP thread hand-offs made each 8×88 matrix product
# take ~15 ms instead of ~5 µs. One thread keeps the suite fast and deterministic.
torch.set_num_threads(1)
