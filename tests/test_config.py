"""Config: files + dotted overrides, type checks and validation errors that name the key; every recipe loads."""

from pathlib import Path

import pytest

from ds_msattn.config import RunConfig, load_config, parse_overrides, save_config, split_argv

RECIPES = sorted((Path(__file__).resolve().parent.parent / "ds_configs" / "recipes").glob("*.yaml"))


def test_defaults_match_the_documented_values():
    cfg = RunConfig()
    p = cfg.positions
    assert (p.enabled, p.cycle_length, p.max_shift, p.alpha0, p.growth, p.interval) == (True, 32768, 4 * 2**20, 16.0,
                                                                                          2.0, 2000)
    assert cfg.lora.target_modules == ["k_proj", "o_proj"] and cfg.lora.modules_to_save == ["embed_tokens", "norm"]
    assert (cfg.lora.r, cfg.lora.alpha) == (8, 16)
    assert cfg.parallel.sequence_parallel_size == 1 and cfg.parallel.sp_mode == "region"


def test_overrides_are_parsed_and_typed(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("output_dir: out\ntrain: {max_steps: 5, lr: 1e-4}\n")
    cfg = load_config(f, ["--train.max_steps=3", "--resume", "auto", "--attention.top_k=32",
                          "--lora.target_modules=[q_proj, o_proj]", "--positions.alpha0=4", "--positions.enabled=false"])
    assert cfg.train.max_steps == 3 and cfg.train.lr == 1e-4 and cfg.resume == "auto"
    assert cfg.attention.top_k == 32 and cfg.lora.target_modules == ["q_proj", "o_proj"]
    assert cfg.positions.alpha0 == 4.0 and isinstance(cfg.positions.alpha0, float) and cfg.positions.enabled is False
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("override,key", [
    pytest.param("--train.max_steps=abc", "train.max_steps", id="type"),
    pytest.param("--train.max_steps=0", "train.max_steps", id="range"),
    pytest.param("--train.max_steps=true", "train.max_steps", id="bool-for-int"),
    pytest.param("--attention.merge=9", "attention.merge", id="merge>top_k"),
    pytest.param("--attention.implementation=flash", "attention.implementation", id="choice"),
    pytest.param("--positions.alpha_max=2", "positions.alpha_max", id="alpha_max<alpha0"),
    pytest.param("--positions.cycle_length=-1", "positions.cycle_length", id="cycle"),
    pytest.param("--lora.target_modules=k_proj", "lora.target_modules", id="list"),
    pytest.param("--parallel.sp_mode=ring", "parallel.sp_mode", id="sp_mode"),
    pytest.param("--parallel.sequence_parallel_size=0", "parallel.sequence_parallel_size", id="sp_size"),
    pytest.param("--data.seq_len=0", "data.seq_len", id="seq_len"),
    pytest.param("--checkpoint.keep_last=0", "checkpoint.keep_last", id="keep_last"),
    pytest.param("--train.not_a_key=1", "train.not_a_key", id="unknown"),
    pytest.param("--model.dtype=float16", "model.dtype", id="dtype"),
    pytest.param("--train.host_mmap_threshold_mib=64", "train.host_mmap_threshold_mib", id="mmap>32"),
    pytest.param("--train.profile_step=-1", "train.profile_step", id="profile_step"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_argv_splitting():
    assert split_argv(["--local_rank=1", "--config", "f.yaml", "--a.b=2"]) == ("f.yaml", 1, ["--a.b=2"])
    assert split_argv(["--config=f.yaml", "--local_rank", "0"]) == ("f.yaml", 0, [])
    with pytest.raises(ValueError, match="overrides"):
        parse_overrides(["positional"])
    with pytest.raises(ValueError, match="--config"):
        load_config("/nonexistent/recipe.yaml")


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipes_load_and_validate(recipe):
    cfg = load_config(recipe)
    assert cfg.data.seq_len >= 1024
    from ds_msattn.train import deepspeed_config

    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] in (2, 3)


def test_training_allocator_threshold_is_what_glibc_gets(monkeypatch):
    """train.host_mmap_threshold_mib reaches mallopt: M_MMAP_THRESHOLD, then M_TRIM_THRESHOLD twice it."""
    from ds_msattn.parallel import zero

    calls = []
    monkeypatch.setattr(zero, "_mallopt", lambda param, value: calls.append((param, value)) or True)
    monkeypatch.setattr(zero.ctypes, "CDLL", lambda name: type("libc", (), {"malloc_trim": staticmethod(lambda n: 0)}))
    zero.loading_allocator(False, load_config(None, ["--train.host_mmap_threshold_mib=4"]).train.host_mmap_threshold_mib)
    assert calls == [(zero.M_MMAP_THRESHOLD, 4 << 20), (zero.M_TRIM_THRESHOLD, 8 << 20)]
