"""Shared test set-up.

Triton kernels run under the Triton interpreter on machines without an NVIDIA GPU; the variable must be
set before anything imports triton (DeepSpeed and torch may), so it is set here, first.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ds_msattn/torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
