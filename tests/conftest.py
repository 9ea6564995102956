"""Suite-wide settings.

Tests use tiny models, for which a second intra-op thread buys nothing, while several test files
start subprocesses (DDP, SIGKILL resume) that would fight for the 2 cores. One thread keeps the
suite fast and its timing stable.
"""

import torch

torch.set_num_threads(1)
