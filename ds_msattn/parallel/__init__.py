"""Sequence parallelism: region-sharded MS attention, DeepSpeed-Ulysses, DP x SP groups, the training seam.

- :func:`region_sharded_attention` (``region_shard.py``): each rank holds whole query blocks of one sequence
  and fetches only the selected remote key regions (DESIGN.md);
- :class:`UlyssesMSAttention` (``ulysses.py``): DeepSpeed's ``DistributedAttention`` with ``ms_attention``;
- :func:`setup_sequence_parallel` (``api.py``): what ``ds_msattn.train`` calls.

Imports are lazy so that ``import ds_msattn.parallel`` does not pull in DeepSpeed.
"""

__all__ = ["region_sharded_attention", "TrafficStats", "UlyssesMSAttention", "setup_sequence_parallel"]


def __getattr__(name):
    if name in ("region_sharded_attention", "TrafficStats"):
        from . import region_shard

        return getattr(region_shard, name)
    if name == "UlyssesMSAttention":
        from .ulysses import UlyssesMSAttention

        return UlyssesMSAttention
    if name == "setup_sequence_parallel":
        from .api import setup_sequence_parallel

        return setup_sequence_parallel
    raise AttributeError(name)
