"""MS attention: reference, selection, fast torch path and the public ``ms_attention``."""

from .api import ms_attention
from .reference import ms_attention_reference, reference_selection
from .selection import region_means, select_regions

__all__ = ["ms_attention", "ms_attention_reference", "reference_selection", "region_means", "select_regions"]
