"""CRD-NTK positions: cyclic, randomly shifted, dynamically growing NTK RoPE (DESIGN.md).

Two pieces, neither edits model code:
- a rope type "crd_ntk" registered in transformers' ROPE_INIT_FUNCTIONS, giving the NTK base
  `b' = b * (alpha * L / L0 - (alpha - 1)) ** (d / (d - 2))` from `config.rope_parameters`
  (`alpha`, `cycle_length` L, `original_max_position_embeddings` L0);
- a transform of position_ids during training: `p' = (p + s) mod Lc`, with the shift s drawn once per
  optimizer step from a generator seeded by (seed, step), so every rank (and every sequence shard) agrees.

alpha grows as `alpha0 * growth ** floor(step / interval)`, capped by alpha_max; `CrdNtkSchedule.apply`
rebuilds the rotary frequencies of every rotary-embedding module when alpha changes. Inference: no wrap,
no shift, base from a chosen alpha (`set_inference_positions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

ROPE_TYPE = "crd_ntk"


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def ntk_base(base: float, head_dim: int, alpha: float, cycle_length: int, original_length: int) -> float:
    """The CRD-NTK rotary base `b * (alpha * L / L0 - (alpha - 1)) ** (d / (d - 2))`."""
    if head_dim <= 2:
        raise ValueError(f"head_dim must be > 2 for the NTK base, got {head_dim}")
    factor = alpha * cycle_length / original_length - (alpha - 1)
    if factor <= 0:
        raise ValueError(
            f"alpha={alpha}, cycle_length={cycle_length}, original length={original_length} give a "
            f"non-positive NTK factor {factor}")
    return base * factor ** (head_dim / (head_dim - 2))


def compute_crd_ntk_parameters(config, device=None, seq_len: int | None = None,
                               layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """transformers rope-init function for rope_type 'crd_ntk'. Returns (inv_freq [d/2], attention scaling 1.0)."""
    params = config.rope_parameters[layer_type] if layer_type is not None else config.rope_parameters
    d = int(_head_dim(config) * params.get("partial_rotary_factor", 1.0))
    base = ntk_base(params["rope_theta"], d, float(params["alpha"]), int(params["cycle_length"]),
                    int(params["original_max_position_embeddings"]))
    exponents = torch.arange(0, d, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / d
    return 1.0 / (base**exponents), 1.0


def register_rope_type() -> None:
    """Make rope_type 'crd_ntk' known to transformers (idempotent; done on import)."""
    ROPE_INIT_FUNCTIONS[ROPE_TYPE] = compute_crd_ntk_parameters


register_rope_type()


def _original_length(config) -> int:
    params = config.rope_parameters or {}
    return int(params.get("original_max_position_embeddings") or config.max_position_embeddings)


def set_crd_ntk_rope(config, *, alpha: float, cycle_length: int) -> None:
    """Switch `config.rope_parameters` to the crd_ntk type (keeps rope_theta; records L0 on first use)."""
    params = dict(config.rope_parameters or {})
    if params.get("rope_type", "default") not in ("default", ROPE_TYPE):
        raise ValueError(f"positions.enabled needs a model with plain RoPE, got rope_type {params['rope_type']!r}")
    params.update(rope_type=ROPE_TYPE, alpha=float(alpha), cycle_length=int(cycle_length),
                  original_max_position_embeddings=_original_length(config))
    config.rope_parameters = params


def rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every rotary-embedding module (they own the non-persistent `inv_freq` buffer)."""
    return [m for m in model.modules() if hasattr(m, "inv_freq") and hasattr(m, "rope_type")]


@torch.no_grad()
def rebuild_rotary(model: torch.nn.Module, config) -> None:
    """Recompute inv_freq of every rotary module from `config.rope_parameters` (after alpha changed)."""
    for module in rotary_modules(model):
        module.rope_type = config.rope_parameters["rope_type"]
        init = ROPE_INIT_FUNCTIONS.get(module.rope_type) or module.compute_default_rope_parameters
        inv_freq, scaling = init(config, device=module.inv_freq.device)
        module.inv_freq.copy_(inv_freq.to(module.inv_freq.dtype))
        module.original_inv_freq.copy_(inv_freq.to(module.original_inv_freq.dtype))
        module.attention_scaling = scaling


def alpha_at_step(step: int, *, alpha0: float, growth: float, interval: int, alpha_max: float) -> float:
    """alpha_t = min(alpha0 * growth ** floor(step / interval), alpha_max)."""
    return min(alpha0 * growth ** (step // interval), alpha_max)


def shift_at_step(step: int, *, seed: int, max_shift: int) -> int:
    """The step's random shift in [0, max_shift): same (seed, step) -> same shift on every rank and run."""
    rng = np.random.default_rng([int(seed), int(step)])
    return int(rng.integers(0, max_shift))


def cyclic_positions(position_ids: torch.Tensor, *, shift: int, cycle_length: int) -> torch.Tensor:
    """p' = (p + shift) mod cycle_length, elementwise on global positions `[B, T]` (int64)."""
    return torch.remainder(position_ids.long() + shift, cycle_length)


def training_position_ids(batch_size: int, length: int, *, shift: int, cycle_length: int,
                          start: int = 0) -> torch.Tensor:
    """Training positions `[B, length]` for global token positions start .. start+length-1.

    A sequence-parallel shard calls this with its own start; the result equals the matching slice of
    the unsplit sequence's positions (tests check this).
    """
    pos = torch.arange(start, start + length, dtype=torch.long).expand(batch_size, length)
    return cyclic_positions(pos, shift=shift, cycle_length=cycle_length)


@dataclass
class CrdNtkSchedule:
    """Applies CRD-NTK during training: call `apply(model, config, step)` before each optimizer step."""

    cycle_length: int
    max_shift: int
    alpha0: float
    growth: float
    interval: int
    alpha_max: float
    seed: int
    current_alpha: float | None = None

    @classmethod
    def from_config(cls, positions) -> "CrdNtkSchedule":
        """From a `ds_msattn.config.PositionsConfig`."""
        return cls(positions.cycle_length, positions.max_shift, positions.alpha0, positions.growth,
                   positions.interval, positions.alpha_max, positions.seed)

    def alpha(self, step: int) -> float:
        return alpha_at_step(step, alpha0=self.alpha0, growth=self.growth, interval=self.interval,
                             alpha_max=self.alpha_max)

    def shift(self, step: int) -> int:
        return shift_at_step(step, seed=self.seed, max_shift=self.max_shift)

    def apply(self, model: torch.nn.Module, config, step: int) -> bool:
        """Set alpha for `step` (0-based count of finished optimizer steps); rebuild frequencies if it changed."""
        alpha = self.alpha(step)
        if alpha == self.current_alpha:
            return False
        set_crd_ntk_rope(config, alpha=alpha, cycle_length=self.cycle_length)
        rebuild_rotary(model, config)
        self.current_alpha = alpha
        return True

    def position_ids(self, batch_size: int, length: int, step: int, start: int = 0) -> torch.Tensor:
        return training_position_ids(batch_size, length, shift=self.shift(step), cycle_length=self.cycle_length,
                                     start=start)


def alpha_for_length(target_length: int, original_length: int) -> float:
    """A common inference choice: alpha = target / L0 (at least 1), as dynamic NTK does."""
    return max(1.0, target_length / original_length)


def plain_rope_parameters(config) -> dict:
    """Equivalent plain ('default') rope parameters for a crd_ntk config: the same inv_freq from rope_theta=b'.

    Used when exporting, so the merged model loads in plain transformers without this package.
    """
    params = config.rope_parameters
    if params.get("rope_type") != ROPE_TYPE:
        return dict(params)
    d = int(_head_dim(config) * params.get("partial_rotary_factor", 1.0))
    base = ntk_base(params["rope_theta"], d, float(params["alpha"]), int(params["cycle_length"]),
                    int(params["original_max_position_embeddings"]))
    out = {k: v for k, v in params.items()
           if k not in ("alpha", "cycle_length", "original_max_position_embeddings", "rope_type", "rope_theta")}
    out.update(rope_type="default", rope_theta=base)
    return out


def set_inference_positions(model: torch.nn.Module, config, *, alpha: float, cycle_length: int) -> None:
    """Inference mode: positions are used as they are (no wrap, no shift); base from the chosen alpha."""
    if not math.isfinite(alpha) or alpha < 1:
        raise ValueError(f"alpha must be a finite number >= 1, got {alpha!r}")
    set_crd_ntk_rope(config, alpha=alpha, cycle_length=cycle_length)
    rebuild_rotary(model, config)
