"""peft's ``modules_to_save`` copies of a ZeRO-3 partitioned model are partitioned as soon as peft has made them.

Three gloo ranks (odd vocabulary: padded partitions) build a tiny Llama under ``deepspeed.zero.Init`` and apply
reduced LoRA, untied and tied, two ways: inside ``partitioned_peft_copies`` (peft copies meta stand-ins, never
gathering) and plain peft (it gathers to copy) followed by ``release_copied_partitions``. Every parameter of
every copy must hold only its 1/world partition, and gathered it must equal the original module bit for bit;
the originals must be the same partitioned, frozen parameters as before.
"""

from __future__ import annotations

import json
from pathlib import Path

from subprocess_env import run_ranks

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "ds_configs" / "recipes" / "tiny.yaml"
SHAPE = {"vocab_size": 321, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}

RANK_SCRIPT = r"""
import json, math, os, sys, torch
from ds_msattn.config import load_config
from ds_msattn.train import build_model, deepspeed_config, default_distributed_env, init_distributed
default_distributed_env()
recipe, shape, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
import deepspeed
import torch.distributed as dist
from peft.utils.other import ModulesToSaveWrapper
from ds_msattn.lora import apply_reduced_lora
from ds_msattn.parallel.zero import partitioned_loading, partitioned_peft_copies, release_copied_partitions

gathers = []
real_gathered = deepspeed.zero.GatheredParameters
def counting_gathered(params, *args, **kwargs):  # peft looks it up at call time
    gathers.append(1)
    return real_gathered(params, *args, **kwargs)

summary = {}
for tied in (False, True):
    for mode in ("stand_in", "gathered"):
        cfg = load_config(recipe, {"model": {"tiny": dict(shape, tie_word_embeddings=tied)},
                                   "parallel": {"zero_init": True}})
        if not dist.is_initialized():
            init_distributed(cfg)
        world = dist.get_world_size()
        ds = deepspeed_config(cfg)
        model = build_model(cfg, ds)
        before = {id(p) for p in model.parameters()}
        gathers.clear()
        deepspeed.zero.GatheredParameters = counting_gathered
        try:
            if mode == "stand_in":
                with partitioned_loading(ds, True), partitioned_peft_copies(model, cfg.lora.modules_to_save):
                    peft_model = apply_reduced_lora(model, cfg.lora)
            else:
                with partitioned_loading(ds, True):
                    peft_model = apply_reduced_lora(model, cfg.lora)
                release_copied_partitions(model)
        finally:
            deepspeed.zero.GatheredParameters = real_gathered
        assert not any(p.is_meta for p in peft_model.parameters()), "a meta stand-in is left"
        seen, checked = set(), []
        for wrapper in [m for m in peft_model.modules() if isinstance(m, ModulesToSaveWrapper)]:
            originals = dict(wrapper.original_module.named_parameters())
            for name, copy in wrapper.modules_to_save["default"].named_parameters():
                if id(copy) in seen:  # tied: the output projection is the embedding copy
                    continue
                seen.add(id(copy))
                original = originals[name]
                assert id(original) in before and hasattr(original, "ds_id"), name
                assert not original.requires_grad and copy.requires_grad, name
                assert hasattr(copy, "ds_id") and copy.ds_id != original.ds_id, f"{name}: copy not partitioned"
                assert copy.data.numel() == 0, f"{name}: copy holds {copy.data.numel()} elements"
                share = math.ceil(copy.ds_numel / world)
                assert copy.ds_numel == original.ds_numel and copy.ds_tensor.numel() == share, name
                with deepspeed.zero.GatheredParameters([copy, original]):
                    assert copy.shape == original.shape and torch.equal(copy.data, original.data), name
                    full = copy.data.clone()
                assert copy.data.numel() == 0
                checked.append([name, copy.ds_numel, float(full.float().abs().sum())])
        trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        assert all("lora_" in n or "modules_to_save" in n for n in trainable), trainable
        summary[f"{'tied' if tied else 'untied'}_{mode}"] = {"checked": checked, "gathers": len(gathers)}
if dist.get_rank() == 0:
    Path = __import__("pathlib").Path
    Path(out).write_text(json.dumps(summary))
dist.barrier()
from ds_msattn.parallel.exit import exit_rank
exit_rank(0)
"""


def test_peft_copies_of_partitioned_modules_are_partitioned_and_equal_to_the_originals(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "summary.json"
    run_ranks(script, [str(RECIPE), json.dumps(SHAPE), str(out)], 3, ROOT)
    summary = json.loads(out.read_text())
    norms = 2 * SHAPE["num_hidden_layers"] + 1
    for case, result in summary.items():
        names = [name for name, _, _ in result["checked"]]
        # the embedding copy and every norm copy (peft's "norm" suffix matches the layer norms as well)
        assert len(names) == 1 + norms, (case, names)
        numels = sorted(numel for _, numel, _ in result["checked"])
        assert numels == [SHAPE["hidden_size"]] * norms + [SHAPE["vocab_size"] * SHAPE["hidden_size"]], case
    # the same weights both ways, and not trivially zero
    for tie in ("untied", "tied"):
        assert summary[f"{tie}_stand_in"]["checked"] == summary[f"{tie}_gathered"]["checked"]
        assert all(total > 0 for _, _, total in summary[f"{tie}_stand_in"]["checked"])
    # peft gathered nothing to copy the stand-ins (untied: no other module to copy)
    assert summary["untied_stand_in"]["gathers"] == 0 and summary["untied_gathered"]["gathers"] > 0
