"""Options of MS attention beyond the paper (docs/design.md, "Options of MS attention beyond the paper").

One copy of their validation and of the rotary arithmetic they need, shared by every backend:

- ``far_positions`` (``exact`` | ``compact`` | ``capped`` | ``grouped``, with ``far_window`` W and ``far_group``
  G): where the keys of a block's selected history regions sit for RoPE. :func:`key_shifts` gives, for every
  selected key, ``p' - p``; :func:`rotate` moves an already rotated key by that many positions.
- ``score`` (``rope`` | ``position_free``): region summaries of the rotated q and k, or of q and k with their
  rotation undone (:func:`unrotate`).
- ``select_per`` (``head`` | ``kv_group``): one selection per query head, or one per kv head ranked by the sum
  of the group's query-head scores.

Rotary convention: transformers' ``rotate_half`` (the first and second halves of the head dimension pair up),
angle ``position * inv_freq`` with ``inv_freq [D/2]`` the model's rotary frequencies. Angles are formed in
float64 so that a move by a long distance loses no precision; the rotated values keep the input's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FAR_POSITIONS = ("exact", "compact", "capped", "grouped")
SCORES = ("rope", "position_free")
SELECT_PER = ("head", "kv_group")

#: Defaults of the option keywords of ``ms_attention`` (the first value of each choice: the paper's rule, which
#: needs no rotary frequencies).
DEFAULT_OPTIONS = {
    "far_positions": "exact",
    "far_window": 2048,
    "far_group": 4,
    "score": "rope",
    "select_per": "head",
}
#: Defaults of ``config.ms_attention`` for models (transformers, recipes, ``ds-msattn eval``), where the model's
#: rotary frequencies are at hand: the combination measured best in benchmarks/results/eval_retrieval.md.
MODEL_OPTIONS = {**DEFAULT_OPTIONS, "far_positions": "compact", "score": "position_free"}


@dataclass(frozen=True)
class MSOptions:
    """The validated options; ``needs_rotary`` says whether ``rope_inv_freq`` must be given."""

    far_positions: str = "exact"
    far_window: int = 2048
    far_group: int = 4
    score: str = "rope"
    select_per: str = "head"

    def __post_init__(self):
        for name, value, allowed in (
            ("far_positions", self.far_positions, FAR_POSITIONS),
            ("score", self.score, SCORES),
            ("select_per", self.select_per, SELECT_PER),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name, value, low in (("far_window", self.far_window, 0), ("far_group", self.far_group, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    @property
    def moves_keys(self) -> bool:
        return self.far_positions != "exact"

    @property
    def needs_rotary(self) -> bool:
        return self.moves_keys or self.score == "position_free"

    @property
    def per_kv_group(self) -> bool:
        return self.select_per == "kv_group"


def make_options(**kwargs) -> MSOptions:
    """:class:`MSOptions` from keyword arguments (``None`` values take the defaults)."""
    return MSOptions(**{key: DEFAULT_OPTIONS[key] if value is None else value for key, value in kwargs.items()})


def check_rotary(
    options: MSOptions, rope_inv_freq: torch.Tensor | None, position_ids: torch.Tensor | None, *, B: int, T: int, D: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Validate ``rope_inv_freq [D/2]`` and ``position_ids [T] | [B, T]`` -> (inv_freq fp32, positions ``[B, T]``).

    Both are None when the options need no rotation. ``position_ids`` defaults to ``arange(T)``.
    """
    if not options.needs_rotary:
        return None, None
    if rope_inv_freq is None:
        raise ValueError(
            f"rope_inv_freq (the [D/2] rotary frequencies of the model) is required with "
            f"far_positions={options.far_positions!r}, score={options.score!r}"
        )
    if not isinstance(rope_inv_freq, torch.Tensor) or tuple(rope_inv_freq.shape) != (D // 2,) or D % 2:
        raise ValueError(f"rope_inv_freq must be a tensor of shape [D/2] = [{D // 2}], got {getattr(rope_inv_freq, 'shape', rope_inv_freq)}")
    if position_ids is None:
        positions = torch.arange(T, device=rope_inv_freq.device).expand(B, T)
    else:
        if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
            raise ValueError(f"position_ids must be an integer tensor [T] or [B, T], got {getattr(position_ids, 'dtype', position_ids)}")
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        if position_ids.dim() != 2 or position_ids.shape[-1] != T or position_ids.shape[0] not in (1, B):
            raise ValueError(f"position_ids must have shape [T] or [B, T] = [{B}, {T}], got {tuple(position_ids.shape)}")
        positions = position_ids.expand(B, T)
    return rope_inv_freq.float(), positions


def _cos_sin(angle_positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    angle = angle_positions.double()[..., None] * inv_freq.double()  # [..., D/2]
    return angle.cos().to(dtype), angle.sin().to(dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate_half RoPE of ``x [..., D]`` by angles with ``cos``/``sin [..., D/2]`` (broadcast), in cos's dtype.

    Without autograd it writes the two halves of one output (no concatenation, no temporaries): this runs on
    every gathered key of a chunk, where passes over memory are what it costs."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        x1, x2 = x1.to(cos.dtype), x2.to(cos.dtype)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    shape = torch.broadcast_shapes(x1.shape, cos.shape)
    out = torch.empty(*shape[:-1], 2 * half, dtype=cos.dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    return out.to(x.dtype)


def rotate(x: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., D]`` by ``shift`` positions (broadcastable to ``x[..., 0]``): RoPE at p -> at p + shift."""
    return _apply(x, *_cos_sin(shift, inv_freq, _compute_dtype(x)))


def unrotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x [B, H, T, D]`` rotated at ``positions [B, T]`` -> the unrotated vectors (fp32 or fp64).

    The angle is formed as the model forms it (fp32 ``position * inv_freq``), so that the undo cancels the
    model's own rotation up to rounding.
    """
    angle = (positions.float()[:, None, :, None] * inv_freq.float()).double()  # [B, 1, T, D/2]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _apply(x.to(dtype), angle.cos().to(dtype), -angle.sin().to(dtype))  # rotation by -angle


def moved_index(p: torch.Tensor, block_start: torch.Tensor, options: MSOptions) -> torch.Tensor:
    """``p'`` for key indices ``p`` before ``block_start`` under ``capped`` or ``grouped`` (broadcasting)."""
    W = options.far_window
    edge = block_start - W
    if options.far_positions == "capped":
        return torch.maximum(p, edge)
    if options.far_positions == "grouped":
        G = options.far_group
        far = edge - torch.div(edge - p + G - 1, G, rounding_mode="floor")  # edge - ceil((edge - p) / G)
        return torch.where(p >= edge, p, far)
    raise ValueError(f"moved_index is for capped/grouped, got {options.far_positions!r}")


def key_shifts(sel: torch.Tensor, blocks: torch.Tensor, *, region_size: int, merge: int, options: MSOptions,
               per_region: bool = False) -> torch.Tensor:
    """``p' - p`` of every selected key: ``sel [..., nb, S]`` (ascending, -1 padded at the end) -> ``[..., nb, S, c]``.

    ``blocks [nb]`` are the global block ids of the rows (block b starts at ``b * m * c``). Entries of -1
    slots are 0. ``exact`` and ``compact`` move a region's c keys by one shift: with ``per_region`` they give
    ``[..., nb, S, 1]`` (it broadcasts over the region's tokens, and a rotation forms c times fewer angles);
    ``capped`` and ``grouped`` stay per key.
    """
    c = region_size
    valid = sel >= 0
    block_start = (blocks * (merge * c)).view(*([1] * (sel.dim() - 2)), -1, 1, 1)  # [..., nb, 1, 1]
    u = torch.arange(1 if per_region and options.far_positions in ("exact", "compact") else c, device=sel.device)
    p = sel.clamp(min=0)[..., None] * c + u  # [..., nb, S, c] (or [..., nb, S, 1]: a region's first key)
    if options.far_positions == "exact":
        return torch.zeros_like(p)
    if options.far_positions == "compact":
        S = valid.sum(-1, keepdim=True)  # [..., nb, 1] selected regions of the block
        r = torch.arange(sel.shape[-1], device=sel.device)
        new = block_start - ((S - r)[..., None] * c) + u  # s_b - (S - r) * c + u
    else:
        new = moved_index(p, block_start, options)
    return torch.where(valid[..., None], new - p, 0)


@dataclass(frozen=True)
class KeyMover:
    """Moves the gathered keys of selected regions to their ``far_positions`` (none of this for ``exact``).

    ``positions_sel`` is the selection whose global region ids define the positions (region sharding gathers
    into a buffer with other ids); ``block_offset`` the global id of the first block of the rows.
    """

    options: MSOptions
    inv_freq: torch.Tensor
    region_size: int
    merge: int
    positions_sel: torch.Tensor | None = None
    block_offset: int = 0

    def shifts(self, sel: torch.Tensor, b0: int, b1: int, s: int, every: int = 1) -> torch.Tensor:
        """``p' - p`` of the keys of blocks ``b0..b1`` (their first ``s`` selected regions) -> ``[B*Hq, nb, s, c]``,
        or ``[B*Hq, nb, s, 1]`` where a region's keys move together (``exact``, ``compact``); ``every``: of every
        ``every``-th query head only (one per kv head where a group shares its regions)."""
        ids = (self.positions_sel if self.positions_sel is not None else sel)[:, ::every, b0:b1, :s]  # [B, Hq, nb, s]
        blocks = torch.arange(b0, b1, device=sel.device) + self.block_offset
        shift = key_shifts(ids, blocks, region_size=self.region_size, merge=self.merge, options=self.options,
                           per_region=True)
        return shift.flatten(0, 1)

    max_shift: int = 0
    """bound on ``|p' - p|`` (the input length): per-key shifts (``capped``, ``grouped``) take cos/sin from a table
    of every shift instead of trig per key"""

    def _table(self, dtype: torch.dtype):
        cache = self.__dict__.setdefault("_tables", {})
        if dtype not in cache:
            shifts = torch.arange(-self.max_shift, self.max_shift + 1, device=self.inv_freq.device)
            cache[dtype] = _cos_sin(shifts, self.inv_freq, dtype)  # [2*max_shift + 1, D/2] each
        return cache[dtype]

    def _rotate(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``x [N, nb, s*c, D]`` (gathered keys or their gradient) by ``shift`` of :meth:`shifts`."""
        N, nb, sc, D = x.shape
        xr = x.reshape(N, nb, shift.shape[2], sc // shift.shape[2], D)  # [N, nb, s, c, D]
        if shift.shape[-1] == 1 or self.max_shift <= 0 or int(shift.abs().max()) > self.max_shift:
            # one angle per region (exact, compact): as many angles as gathered regions, formed directly
            return rotate(xr, shift, self.inv_freq).view(N, nb, sc, D)
        cos, sin = self._table(_compute_dtype(x))
        index = (shift + self.max_shift).reshape(-1)
        shape = (*shift.shape, cos.shape[-1])
        return _apply(xr, cos.index_select(0, index).view(shape), sin.index_select(0, index).view(shape)).view(N, nb, sc, D)

    def release(self) -> None:
        """Drop the cos/sin tables (``4 * (2 * max_shift + 1) * D`` bytes each): autograd keeps the mover of every
        layer's forward until its backward, which must not keep a table per layer alive."""
        self.__dict__.pop("_tables", None)

    def move(self, keys: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self._rotate(keys, shift)

    def move_back(self, grad: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the unmoved keys: a rotation is orthogonal, its transpose rotates back."""
        return self._rotate(grad, -shift)
