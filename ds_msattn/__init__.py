"""ds_msattn: long-context fine-tuning and inference with MS attention on DeepSpeed."""

import os

# DeepSpeed JIT-compiles its ops into TORCH_EXTENSIONS_DIR; every venv shares the default cache and
# another venv's build there can break a run, so this project keeps its own.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ds_msattn/torch_extensions"))

from .attention import ms_attention, ms_attention_reference, select_regions  # noqa: E402
from . import hf  # noqa: E402,F401  (registers attention "ms_attention" with transformers)
from . import positions  # noqa: E402,F401  (registers rope type "crd_ntk" with transformers)

__version__ = "0.1.0"
__all__ = ["ms_attention", "ms_attention_reference", "select_regions", "__version__"]
