"""zero.Init random init: each rank fills its own ZeRO-3 partition, and the gathered model is the plain build.

Three gloo ranks (so partitions are padded and cut rows and draw blocks in the middle), a tiny Llama with an odd
vocabulary, and draw blocks of 100 elements (many blocks per matrix, partition edges inside blocks): the full
state dict gathered after ``build_model`` must equal, bit for bit, the one of a plain one-process build.
"""

from __future__ import annotations

from pathlib import Path

import torch
from subprocess_env import run_ranks

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "ds_configs" / "recipes" / "tiny.yaml"
SHAPE = {"vocab_size": 321, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
BLOCK = 100

RANK_SCRIPT = r"""
import os, sys, torch
import ds_msattn.models as models
models.SEED_BLOCK_ELEMS = int(sys.argv[2])
from ds_msattn.config import load_config
from ds_msattn.parallel.zero import gathered_state_dict
from ds_msattn.train import build_model, deepspeed_config, default_distributed_env, init_distributed
import json
cfg = load_config(sys.argv[1], {"model": {"tiny": json.loads(sys.argv[3])}, "parallel": {"zero_init": True}})
default_distributed_env()
init_distributed(cfg)
import torch.distributed as dist
model = build_model(cfg, deepspeed_config(cfg))
assert all(hasattr(p, "ds_id") for p in model.parameters()), "not partitioned"
state = gathered_state_dict(model, dist.get_rank())
if dist.get_rank() == 0:
    torch.save(state, sys.argv[4])
dist.barrier()
from ds_msattn.parallel.exit import exit_rank
exit_rank(0)
"""


def _plain_state() -> dict:
    import ds_msattn.models as models
    from ds_msattn.config import load_config
    from ds_msattn.train import build_model

    old = models.SEED_BLOCK_ELEMS
    models.SEED_BLOCK_ELEMS = BLOCK
    try:
        cfg = load_config(RECIPE, {"model": {"tiny": SHAPE}, "parallel": {"zero_init": True}})
        return {k: v.detach().clone() for k, v in build_model(cfg, None).state_dict().items()}
    finally:
        models.SEED_BLOCK_ELEMS = old


def test_partitioned_random_init_equals_the_plain_build(tmp_path):
    import json

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "state.pt"
    run_ranks(script, [str(RECIPE), str(BLOCK), json.dumps(SHAPE), str(out)], 3, ROOT)
    partitioned = torch.load(out)
    plain = _plain_state()
    assert partitioned.keys() == plain.keys()
    for name, tensor in plain.items():
        assert torch.equal(partitioned[name], tensor), name
    # the fill is not trivially constant: matrices differ from each other and are not all ones
    assert not torch.equal(plain["model.embed_tokens.weight"][:1], plain["model.embed_tokens.weight"][1:2])
