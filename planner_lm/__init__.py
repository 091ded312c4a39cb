"""planner-lm: teach a language model to plan (planner pretraining + end-to-end joint fine-tuning)."""
from __future__ import annotations

import os as _os
import sys as _sys

# PyTorch's CPU allocator backs large tensors with transparent huge pages when this is set before
# torch's first allocation. An LM step on CPU allocates several 200 MB logit buffers; with 4 KiB
# pages most of its time goes to page faults (bench/bench_cpu_allocator.py: ~1.3x faster steps).
if "torch" not in _sys.modules:
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
