"""Suite-wide settings.

Tests use tiny models, for which a second intra-op thread buys nothing, while several test files
start subprocesses (DDP, SIGKILL resume) that would fight for the 2 cores. One thread keeps the
suite fast and its timing stable.
"""

import os

import torch

torch.set_num_threads(1)

# Progress lines (dynaslice.progress) appear on stderr every 10 s of a long step when stderr is not
# a terminal; on a loaded machine a tiny run can pass 10 s, and tests that count stderr lines would
# then depend on the load. Off for the suite (subprocesses inherit it); tests of progress set it.
os.environ["DYNASLICE_PROGRESS_SECONDS"] = "86400"
