"""Memory planner: arithmetic against DeepSpeed's estimators and transformers, and predictions against the
peak memory of real CPU training steps measured in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from ds_msattn.planner import GIB, PlanConfig, _per_token_layer_bytes, check_fit, main, model_state_bytes
from ds_msattn.planner_measure import MS, TINY
from ds_msattn.planner_presets import PRESETS, resolve_shape, shape_from_config



@pytest.mark.parametrize(
    "name, params",
    [
        ("llama2-7b", 6_738_415_616),
        ("llama2-13b", 13_015_864_320),
        ("mistral-7b", 7_241_732_096),
        ("llama3-8b", 8_030_261_248),
        ("qwen2-7b", 7_615_616_512),
        ("smollm2-135m", 134_515_008),
    ],
)
def test_preset_parameter_counts(name, params):
    assert PRESETS[name].total_params() == params


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_shape_from_transformers_config_counts_like_the_model(tie, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**dict(TINY, num_hidden_layers=2, tie_word_embeddings=tie))
    model = LlamaForCausalLM(cfg)
    real = sum(dict((p.data_ptr(), p.numel()) for p in model.parameters()).values())
    assert shape_from_config(cfg).total_params() == real
    cfg.save_pretrained(tmp_path)
    assert resolve_shape(tmp_path).total_params() == real
    from_file, from_dir = resolve_shape(tmp_path / "config.json"), resolve_shape(tmp_path)
    assert replace(from_file, name="x") == replace(from_dir, name="x") == replace(shape_from_config(cfg), name="x")


@pytest.mark.parametrize("zero, offload", [(2, "none"), (2, "cpu"), (3, "none"), (3, "cpu")])
@pytest.mark.parametrize("gpus, nodes", [(1, 1), (8, 1), (8, 4)])
def test_model_states_equal_deepspeed_estimators(zero, offload, gpus, nodes):
    """Full bf16 fine-tuning: the planner's per-GPU model states and host memory are DeepSpeed's."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = PlanConfig("llama2-7b", 4096, gpus=gpus, nodes=nodes, lora=False, dtype="bf16")
    shape = cfg.model
    states, host, _ = model_state_bytes(cfg, zero, offload, gpus * nodes)
    P = shape.total_params()
    if zero == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(P, gpus, nodes, cpu_offload=offload == "cpu")
    else:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            P, shape.largest_module_params(), gpus, nodes, cpu_offload=offload == "cpu", cpu_offload_params=offload == "cpu"
        )
    assert sum(states.values()) == pytest.approx(gpu, abs=2)
    assert host == pytest.approx(cpu, abs=2)


def test_lora_extends_the_estimators():
    """LoRA: frozen weights cost their 16-bit copy only; gradients and Adam states only for trainable ones."""
    full = PlanConfig("llama2-7b", 4096, gpus=8, lora=False)
    lora = PlanConfig("llama2-7b", 4096, gpus=8, lora=True)
    s_full, _, _ = model_state_bytes(full, 3, "none", 8)
    s_lora, _, _ = model_state_bytes(lora, 3, "none", 8)
    P = full.model.total_params()
    from ds_msattn.planner import trainable_params

    t = trainable_params(lora.model, True, 8)
    # 4096 * 8 (k_proj A) + 4096 * 8 (B) and the same for o_proj, per layer; embeddings; 65 norms
    assert t == 32 * 4 * 8 * 4096 + 32000 * 4096 + 65 * 4096
    assert s_lora["optimizer_states"] == pytest.approx(12 * t / 8)
    assert s_lora["gradients"] == pytest.approx(4 * t / 8)
    assert s_lora["parameters"] == pytest.approx(2 * (P + t) / 8 + 4 * 32000 * 4096)
    assert s_full["optimizer_states"] / s_lora["optimizer_states"] == pytest.approx(P / t)


def _saved_bytes(model, ids) -> int:
    """Bytes of distinct storages autograd saves during one forward (with the loss)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("attn", ["sdpa", "ms_attention", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_per_layer_activations_match_autograd(attn, dtype):
    """One more decoder layer adds exactly the planner's per-layer activation bytes (+ its weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import ds_msattn  # noqa: F401

    T = 512 if attn != "eager" else 128
    ids = torch.randint(0, TINY["vocab_size"], (1, T))
    saved = []
    for layers in (1, 2):
        cfg = LlamaConfig(**dict(TINY, num_hidden_layers=layers))
        cfg.ms_attention = MS
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=dtype)
        saved.append(_saved_bytes(model, ids))
    shape = shape_from_config(cfg)
    b = 2 if dtype == torch.bfloat16 else 4
    plan_cfg = PlanConfig(
        shape, T, lora=False, dtype="bf16" if b == 2 else "fp32", attn=attn, checkpointing=False, zero=0, device="cpu", loss_chunk=0,
        region_size=MS["region_size"], top_k=MS["top_k"], merge=MS["merge"],
    )
    weights = b * shape.layer_params()
    predicted_layer = _per_token_layer_bytes(plan_cfg, T) * T
    assert saved[1] - saved[0] - weights == pytest.approx(predicted_layer, rel=1e-6)


def _measure(specs: list[dict]) -> list[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "ds_msattn.planner_measure", "--json", json.dumps(specs)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.strip().splitlines()[-len(specs) :]]


MEASURED = [
    pytest.param("sdpa", 1024, False, id="sdpa-1K-no-ckpt"),
    pytest.param("sdpa", 4096, True, id="sdpa-4K-ckpt"),
    pytest.param("sdpa", 4096, False, id="sdpa-4K-no-ckpt"),
    pytest.param("ms_attention", 1024, True, id="ms-1K-ckpt"),
    pytest.param("ms_attention", 4096, True, id="ms-4K-ckpt"),
    pytest.param("ms_attention", 4096, False, id="ms-4K-no-ckpt"),
]


MEASURED_DEEPSPEED = [
    pytest.param("ms_attention", 1024, True, id="zero3-offload-ms-1K-ckpt"),
    pytest.param("ms_attention", 4096, False, id="zero3-offload-ms-4K-no-ckpt"),
]


@pytest.fixture(scope="module")
def measured():
    """All measured steps in one fresh process (imports once); keyed by (attn, T, checkpointing)."""
    keys = [p.values for p in MEASURED]
    specs = [dict(config=TINY, seq_len=T, attn=a, checkpointing=c, ms_attention=MS) for a, T, c in keys]
    return dict(zip(keys, _measure(specs)))


@pytest.fixture(scope="module")
def measured_deepspeed():
    """Steps of a DeepSpeed ZeRO-3 engine with CPU parameter and optimizer offload (ds_configs/zero3_offload_cpu.json)."""
    keys = [p.values for p in MEASURED_DEEPSPEED]
    specs = [
        dict(config=TINY, seq_len=T, attn=a, checkpointing=c, ms_attention=MS, deepspeed="zero3_offload_cpu.json")
        for a, T, c in keys
    ]
    return dict(zip(keys, _measure(specs)))


def _predicted_increment(attn: str, T: int, checkpointing: bool, zero: int, offload: str) -> float:
    cfg = PlanConfig(
        shape_from_config(TINY, name="tiny"), T, lora=False, dtype="fp32", zero=zero, offload=offload, device="cpu",
        attn=attn, loss_chunk=0, checkpointing=checkpointing, region_size=MS["region_size"], top_k=MS["top_k"],
        merge=MS["merge"],
    )
    plan = check_fit(cfg)
    assert plan.ds_config == (None if zero == 0 else "zero3_offload_cpu.json")
    return plan.increment_gib * GIB


@pytest.mark.slow
@pytest.mark.parametrize("attn, T, checkpointing", MEASURED_DEEPSPEED)
def test_prediction_matches_measured_peak_zero3_offload(measured_deepspeed, attn, T, checkpointing):
    """The same under a real DeepSpeed ZeRO-3 offload engine (fp32, one CPU process): within 15%."""
    got = measured_deepspeed[(attn, T, checkpointing)]["increment_bytes"]
    predicted = _predicted_increment(attn, T, checkpointing, 3, "cpu")
    assert predicted == pytest.approx(got, rel=0.15), f"predicted {predicted / 2**20:.1f} MiB, measured {got / 2**20:.1f} MiB"


@pytest.mark.slow
@pytest.mark.parametrize("attn, T, checkpointing", MEASURED)
def test_prediction_matches_measured_peak(measured, attn, T, checkpointing):
    """Peak-RSS increase of a real forward + backward + AdamW step (tiny Llama, fp32, CPU) within 15%."""
    got = measured[(attn, T, checkpointing)]["increment_bytes"]
    predicted = _predicted_increment(attn, T, checkpointing, 0, "none")
    assert predicted == pytest.approx(got, rel=0.15), f"predicted {predicted / 2**20:.1f} MiB, measured {got / 2**20:.1f} MiB"


def test_breakdown_adds_up_and_ms_beats_dense_math():
    cfg = PlanConfig("llama2-7b", 32768, gpu_mem_gib=40.0, zero=3, offload="cpu")
    plan = check_fit(cfg)
    assert sum(plan.breakdown_gib.values()) == pytest.approx(plan.per_gpu_gib, abs=0.02)
    assert plan.breakdown_gib["overlap_credit"] <= 0
    assert plan.ds_config == "zero3_offload.json" and plan.sequence_parallel_size == 1
    eager = check_fit(PlanConfig("llama2-7b", 32768, gpu_mem_gib=40.0, zero=3, offload="cpu", attn="eager"))
    assert eager.breakdown_gib["attention_workspace"] > 100 * plan.breakdown_gib["attention_workspace"] / 4
    assert not eager.fits
    ckpt_off = check_fit(PlanConfig("llama2-7b", 32768, gpu_mem_gib=40.0, zero=3, offload="cpu", checkpointing=False))
    assert ckpt_off.breakdown_gib["activations"] > 10 * plan.breakdown_gib["activations"]


def test_smallest_sequence_parallel_size_is_returned():
    cfg = PlanConfig("llama2-7b", 1 << 20, gpus=8, nodes=8, gpu_mem_gib=80.0, loss_chunk=4096)
    plan = check_fit(cfg)
    assert plan.fits and plan.sequence_parallel_size > 1
    smaller = PlanConfig("llama2-7b", 1 << 20, gpus=8, nodes=8, gpu_mem_gib=80.0, loss_chunk=4096,
                         sp=plan.sequence_parallel_size // 2)
    assert not check_fit(smaller).fits  # every config of ds_configs/ was tried at half the SP size


def test_cli_json(capsys):
    rc = main(["--model", "llama2-7b", "--seq-len", "32768", "--gpus", "1", "--gpu-mem", "40", "--lora", "--zero", "3",
               "--offload", "cpu", "--checkpointing", "on", "--attn", "ms_attention", "--dtype", "bf16", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == (0 if out["fits"] else 1)
    for key in ("fits", "per_gpu_gib", "host_gib", "breakdown_gib", "ds_config", "sequence_parallel_size"):
        assert key in out
    assert out["ds_config"] == "zero3_offload.json"


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(seq_len=0), "seq_len"),
        (dict(dtype="fp16"), "dtype"),
        (dict(attn="flash"), "attn"),
        (dict(zero=1), "zero"),
        (dict(offload="disk"), "offload"),
        (dict(gpus=8, sp=3), "sp"),
        (dict(merge=128, top_k=64), "merge"),
        (dict(model="gpt-9"), "model"),
    ],
)
def test_bad_input_names_the_parameter(kwargs, name):
    args = dict(model="llama2-7b", seq_len=4096)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        PlanConfig(**args)


def test_settings_without_a_config_file_are_still_planned():
    """ZeRO-2 without offload and NVMe offload have no file in ds_configs/: planned, ds_config None."""
    z2 = check_fit(PlanConfig("mistral-7b", 8192, gpus=8, zero=2, offload="none", lora=False))
    nvme = check_fit(PlanConfig("mistral-7b", 8192, gpus=8, zero=3, offload="nvme", lora=False))
    assert z2.ds_config is None and (z2.zero, z2.offload) == (2, "none")
    assert nvme.ds_config is None and nvme.nvme_gib > 0
    # ZeRO-2 replicates the 16-bit parameters; NVMe moves them and the optimizer states off the GPU
    assert z2.breakdown_gib["parameters"] == pytest.approx(2 * 7_241_732_096 / GIB, abs=1e-3)
    assert nvme.breakdown_gib["optimizer_states"] == 0 and nvme.per_gpu_gib < z2.per_gpu_gib


def test_recommended_configs_exist_and_match_their_settings():
    """Every file the planner recommends is in ds_configs/ with the ZeRO stage and offload it is planned as."""
    from ds_msattn.planner import CPU_DS_CONFIG, DS_CONFIG_DIR, DS_CONFIGS

    for name, zero, offload in DS_CONFIGS + ((CPU_DS_CONFIG, 3, "cpu"),):
        cfg = json.loads((DS_CONFIG_DIR / name).read_text())["zero_optimization"]
        assert cfg["stage"] == zero, name
        device = cfg.get("offload_optimizer", {}).get("device", "none")
        assert device == offload, name
