"""ESA's offline step: fit the low-dimensional query and key projections of every layer from a calibration run.

``ds-msattn esa-calibrate --model M [--out DIR] [--tokens N] [--rank r]`` runs the model densely over N tokens of
the built-in corpus (or ``--text-file``), records every layer's rotated queries and keys, turns them into the
vectors the selection scores (:func:`ds_msattn.attention.esa.far_vectors` and ``selection_vectors``: the positions
rule and the grouping are fixed here and recorded) and fits per layer and selection group a pair of matrices
``[G, n, r]``. It writes ``esa_projections.safetensors`` (tensors ``layers.{i}.query`` / ``layers.{i}.key``) and
``esa_projections.json`` (what was fitted and how) to DIR, by default the model's own directory; the model config's
``esa_attention.projections`` names DIR.

Methods (docs/other_methods.md, "ESA"):

- ``lstsq`` (default): the paper's objective, equation 7, ``min sum_{c,m} (q_c . k_m - f(q_c) . g(k_m))^2`` over
  every pair of calibration query and key, for linear f and g of rank r, solved in closed form (a reduced-rank
  problem: with ``Q = Uq Sq Vq^T`` and ``K = Uk Sk Vk^T``, the best rank-r part ``P D R^T`` of ``Sq Vq^T Vk Sk``
  gives ``f = Vq Sq^-1 P D^1/2`` and ``g = Vk Sk^-1 R D^1/2``) instead of the paper's 10 epochs of Adam over two
  linear layers. The columns are ordered by importance, so the first r' < r are the rank-r' solution.
- ``pca``: the comparison of the paper's figure 2 (after Loki, arXiv 2406.02542): the top-r principal directions
  (uncentred) of the keys, used for both queries and keys. At full rank this is the identity: exact scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .esa import FAR_POSITIONS, SELECT_PER, far_vectors, make_params, selection_vectors

WEIGHTS = "esa_projections.safetensors"
META = "esa_projections.json"
METHODS = ("lstsq", "pca")
FORMAT = 1
#: Relative cut-off of singular values treated as zero (directions the calibration data do not span).
RCOND = 1e-7


def _rank_check(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")


def fit_projection(q: torch.Tensor, k: torch.Tensor, rank: int, method: str = "lstsq") -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key projections ``[G, n, rank]`` (float32) from selection vectors ``q [N, G, n]``, ``k [M, G, n]``."""
    _rank_check(rank)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    G, n = q.shape[1:]
    if rank > n:
        raise ValueError(f"rank must be <= the selection vector size n={n}, got {rank}")
    pq, pk = torch.zeros(G, n, rank, dtype=torch.float64), torch.zeros(G, n, rank, dtype=torch.float64)
    for g in range(G):
        Q, K = q[:, g].double(), k[:, g].double()
        if method == "pca":
            evecs = torch.linalg.eigh(K.T @ K).eigenvectors  # ascending eigenvalues
            pq[g] = pk[g] = evecs.flip(-1)[:, :rank]
            continue
        _, sq, vq = torch.linalg.svd(Q, full_matrices=False)
        _, sk, vk = torch.linalg.svd(K, full_matrices=False)
        keep_q, keep_k = sq > RCOND * sq.max(), sk > RCOND * sk.max()
        sq, vq, sk, vk = sq[keep_q], vq[keep_q].T, sk[keep_k], vk[keep_k].T  # vq [n, rq]
        p, d, rt = torch.linalg.svd((sq[:, None] * (vq.T @ vk)) * sk[None, :], full_matrices=False)
        r = min(rank, d.shape[0])
        root = d[:r].sqrt()
        pq[g, :, :r] = (vq / sq) @ p[:, :r] * root
        pk[g, :, :r] = (vk / sk) @ rt[:r].T * root
    return pq.float(), pk.float()


@dataclass
class ESAProjections:
    """Every layer's (query, key) projections ``[G, n, r]`` and the metadata they were fitted with."""

    meta: dict
    query: list[torch.Tensor]
    key: list[torch.Tensor]

    def layer(self, i: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's pair, cut to the first ``rank`` columns (None: all)."""
        if not 0 <= i < len(self.query):
            raise ValueError(f"the projections hold {len(self.query)} layers, no layer {i}")
        if rank is None:
            return self.query[i], self.key[i]
        _rank_check(rank)
        if rank > self.meta["rank"]:
            raise ValueError(f"rank must be <= the calibrated rank {self.meta['rank']}, got {rank}")
        return self.query[i][..., :rank], self.key[i][..., :rank]


def save_projections(out: str | Path, proj: ESAProjections) -> Path:
    """Write ``esa_projections.safetensors`` and ``.json`` into directory ``out``; returns the directory."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, (pq, pk) in enumerate(zip(proj.query, proj.key)):
        tensors[f"layers.{i}.query"], tensors[f"layers.{i}.key"] = pq.contiguous(), pk.contiguous()
    save_file(tensors, str(out / WEIGHTS))
    (out / META).write_text(json.dumps({"format": FORMAT, **proj.meta}, indent=1))
    return out


_LOADED: dict = {}


def projection_dir(path: str | Path) -> Path:
    """The directory of a projections path (the directory itself, or one of its two files)."""
    path = Path(path)
    return path.parent if path.name in (WEIGHTS, META) else path


def load_projections(path: str | Path) -> ESAProjections:
    """Read what :func:`save_projections` wrote (cached per directory and modification time)."""
    from safetensors.torch import load_file

    folder = projection_dir(path)
    weights, meta_file = folder / WEIGHTS, folder / META
    for f in (meta_file, weights):
        if not f.is_file():
            raise FileNotFoundError(2, f"No ESA projections here (run ds-msattn esa-calibrate)", str(f))
    key = (str(folder.resolve()), weights.stat().st_mtime_ns, meta_file.stat().st_mtime_ns)
    if key not in _LOADED:
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_file}: unknown format {meta.get('format')!r} (expected {FORMAT})")
        tensors = load_file(str(weights))
        n = meta["num_layers"]
        _LOADED.clear()
        _LOADED[key] = ESAProjections(meta, [tensors[f"layers.{i}.query"] for i in range(n)],
                                      [tensors[f"layers.{i}.key"] for i in range(n)])
    return _LOADED[key]


# ------------------------------------------------------------------ the calibration run

CAPTURE = "esa_capture"
_captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def _capture_forward(module, query, key, value, attention_mask, **kwargs):
    """Dense SDPA that records the layer's rotated query and key ``[B, H, T, D]``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _captured.setdefault(module.layer_idx, []).append((query.detach().cpu(), key.detach().cpu()))
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _register_capture() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE, _capture_forward)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)


@torch.no_grad()
def calibrate(model, sequences: list[torch.Tensor], *, rank: int, method: str = "lstsq", select_per: str = "layer",
              far_positions: str = "fixed", local_window: int = 4096, far_distance: int | None = None) -> ESAProjections:
    """Fit the projections of every layer of ``model`` (a Llama-like causal LM) on token ``sequences`` (1-D each).

    The selection vectors of each sequence are computed at positions ``arange(len)`` with the rule of
    ``far_positions`` / ``far_distance`` (None: ``local_window``) and ``select_per``, as the attention computes them.
    """
    from ds_msattn.hf import rope_frequencies

    params = make_params(select_per=select_per, far_positions=far_positions, local_window=local_window,
                         far_distance=far_distance)
    _rank_check(rank)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not sequences:
        raise ValueError("no calibration tokens")
    _register_capture()
    cfg = model.config
    previous = cfg._attn_implementation
    device = next(model.parameters()).device
    _captured.clear()
    try:
        cfg._attn_implementation = CAPTURE
        for ids in sequences:
            model.model(input_ids=ids.view(1, -1).to(device), use_cache=False)
    finally:
        cfg._attn_implementation = previous
    layers = sorted(_captured)
    qs, ks = {i: [] for i in layers}, {i: [] for i in layers}
    head_dim = _captured[layers[0]][0][1].shape[-1]
    for i in layers:
        for query, key in _captured[i]:
            T = query.shape[2]
            positions = torch.arange(T)[None]
            inv_freq = rope_frequencies(cfg, positions, T, "cpu") if params.far_positions == "fixed" else None
            q_far, k_far = far_vectors(query.float(), key.float(), params, inv_freq, positions)
            q_sel, k_sel = selection_vectors(q_far, k_far, params.select_per)  # [1, G, T, n]
            qs[i].append(q_sel[0].transpose(0, 1))
            ks[i].append(k_sel[0].transpose(0, 1))
    _captured.clear()
    query, key = [], []
    for i in layers:
        pq, pk = fit_projection(torch.cat(qs[i]), torch.cat(ks[i]), rank, method)
        query.append(pq)
        key.append(pk)
    meta = {
        "method": method, "rank": rank, "select_per": params.select_per, "far_positions": params.far_positions,
        "far_distance": params.distance if params.far_positions == "fixed" else None,
        "num_layers": len(layers), "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        "head_dim": head_dim,
        "tokens": int(sum(s.numel() for s in sequences)), "sequences": len(sequences),
    }
    return ESAProjections(meta, query, key)


def corpus_sequences(tokenizer, texts: dict[str, str], tokens: int, seq_len: int) -> list[torch.Tensor]:
    """Up to ``tokens`` tokens of ``texts`` (in name order) in sequences of at most ``seq_len`` tokens."""
    sequences, left = [], tokens
    for name in sorted(texts):
        ids = tokenizer(texts[name])["input_ids"]
        for a in range(0, len(ids), seq_len):
            piece = ids[a: a + min(seq_len, left)]
            if len(piece) < 2:
                break
            sequences.append(torch.tensor(piece))
            left -= len(piece)
            if left <= 0:
                return sequences
    if not sequences:
        raise ValueError("the calibration text has no tokens")
    return sequences


def build_parser() -> argparse.ArgumentParser:
    from ds_msattn.logs import OneLineArgumentParser

    p = OneLineArgumentParser(prog="ds-msattn esa-calibrate",
                              description="fit ESA's low-dimensional query/key projections (docs/other_methods.md)")
    p.add_argument("--model", default="smollm2", help="alias (smollm2) or transformers model directory")
    p.add_argument("--out", default=None, help="directory for esa_projections.{safetensors,json} (default: the model's)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    p.add_argument("--rank", type=int, default=32, help="r, the reduced dimension")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per calibration sequence")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--corpus", default="shakespeare", help="built-in corpus name (default shakespeare)")
    src.add_argument("--text-file", default=None, help="calibrate on this text instead")
    p.add_argument("--method", default="lstsq", choices=list(METHODS))
    p.add_argument("--select-per", default="layer", choices=list(SELECT_PER))
    p.add_argument("--far-positions", default="fixed", choices=list(FAR_POSITIONS))
    p.add_argument("--local-window", type=int, default=4096, help="ESA's local window (w defaults to it)")
    p.add_argument("--far-distance", type=int, default=None, help="w of far_positions=fixed (default: the window)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from ds_msattn.logs import say

    for flag, value, low in (("--tokens", args.tokens, 2), ("--seq-len", args.seq_len, 2)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    _rank_check(args.rank)
    make_params(local_window=args.local_window, far_distance=args.far_distance)  # a bad value names itself
    if args.text_file and not Path(args.text_file).is_file():
        raise FileNotFoundError(2, "No such file or directory", args.text_file)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ds_msattn.models import load_model, load_tokenizer, resolve_model

    tokenizer = load_tokenizer(args.model)  # a bad --model fails here
    if args.text_file:
        texts = {Path(args.text_file).stem: Path(args.text_file).read_text(encoding="utf-8", errors="replace")}
    else:
        from ds_msattn.corpora import corpus_texts

        texts = corpus_texts(args.corpus)
    sequences = corpus_sequences(tokenizer, texts, args.tokens, args.seq_len)
    model = load_model(args.model).eval().to(args.device)
    n = model.config.num_key_value_heads * (getattr(model.config, "head_dim", None)
                                            or model.config.hidden_size // model.config.num_attention_heads)
    if args.select_per == "kv_group":
        n //= model.config.num_key_value_heads
    if args.rank > n:
        raise ValueError(f"--rank must be <= {n} (the selection vector size of this model with --select-per "
                         f"{args.select_per}), got {args.rank}")
    say(f"esa-calibrate: {sum(s.numel() for s in sequences)} tokens in {len(sequences)} sequences, rank {args.rank}")
    proj = calibrate(model, sequences, rank=args.rank, method=args.method, select_per=args.select_per,
                     far_positions=args.far_positions, local_window=args.local_window, far_distance=args.far_distance)
    proj.meta.update(model=args.model, source=args.text_file or f"corpus:{args.corpus}", seq_len=args.seq_len)
    out = save_projections(args.out or resolve_model(args.model), proj)
    print(f"wrote {out / WEIGHTS} and {out / META}")
    return 0


if __name__ == "__main__":
    from ds_msattn.logs import run_command

    sys.exit(run_command("ds-msattn esa-calibrate", main, sys.argv[1:]))
