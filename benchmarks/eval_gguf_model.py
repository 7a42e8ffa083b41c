"""Rebuild the SmolLM2-135M transformers directory from its GGUF without transformers' GGUF loader.

Used to move the real model to a machine that cannot install packages (the GPU machine used for
benchmarks/results/eval_smollm2_*): the GGUF travels in parts, this script joins and dequantizes it
with the `gguf` package and writes ``model.safetensors`` next to the config and tokenizer files. It
checks itself against the directory ``ds_msattn.models.resolve_model("smollm2")`` writes (bit-exact).

    python benchmarks/eval_gguf_model.py GGUF_FILE CONFIG_DIR OUT_DIR [--check REFERENCE_DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary pair; HF Llama uses halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(gguf_file: str, config: dict) -> dict[str, torch.Tensor]:
    import gguf

    reader = gguf.GGUFReader(gguf_file)
    out = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)])  # GGUF lists dims fastest first
        name = t.name
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        else:
            _, layer, kind, _ = name.split(".")
            if kind == "attn_q":
                w = _unpermute(w, config["num_attention_heads"])
            elif kind == "attn_k":
                w = _unpermute(w, config["num_key_value_heads"])
            key = f"model.layers.{layer}.{NAMES[kind]}.weight"
        out[key] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf_file")
    ap.add_argument("config_dir", help="directory with config.json and tokenizer files")
    ap.add_argument("out_dir")
    ap.add_argument("--check", default=None, help="reference model directory to compare with")
    a = ap.parse_args()
    from safetensors.torch import load_file, save_file

    cfg = json.loads((Path(a.config_dir) / "config.json").read_text())
    sd = convert(a.gguf_file, cfg)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(a.config_dir).iterdir():
        if f.is_file() and f.suffix in (".json", ".jinja"):
            shutil.copy(f, out / f.name)
    save_file(sd, str(out / "model.safetensors"))
    if a.check:
        ref = load_file(str(Path(a.check) / "model.safetensors"))
        missing = sorted(set(ref) ^ set(sd))
        bad = [k for k in ref if k in sd and not torch.equal(ref[k], sd[k])]
        print(f"check: {len(ref)} tensors, differing names {missing}, differing values {bad[:5]} ({len(bad)})")
        if missing or bad:
            raise SystemExit(1)
    print(f"wrote {out} ({len(sd)} tensors)")


if __name__ == "__main__":
    main()
