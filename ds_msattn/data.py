"""Training data: text documents -> tokens -> fixed-length packed sequences -> a resumable, seeded loader.

- Sources (`data.source`): `builtin:NAME` (ds_msattn.corpora, fetched and checksum-verified at set-up), or local
  files read with `datasets`: `.txt` (one document per file), `.jsonl`/`.json` and `.parquet` (a text column).
- Tokenising: the model's tokenizer, or `bytes` (UTF-8 bytes 0..255, EOS 256: tiny models need no tokenizer).
  Documents are joined with EOS between them.
- Packing: the token stream is cut into sequences of `seq_len + 1` tokens that overlap by one, so
  `input_ids = chunk[:-1]` and `labels = chunk[1:]` are both `[seq_len]`: labels are already shifted, so a
  sequence can be split into shards (sequence parallelism) with every label beside its token.
- Order: one permutation per epoch from a generator seeded by (seed, epoch). The loader's state is the number
  of sequences consumed by the whole job; restoring it continues exactly where an interrupted run stopped.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IGNORE_INDEX = -100


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 and EOS = 256 (vocab 257): lets tiny random models train on real text."""

    vocab_size = 257
    eos_token_id = 256
    name_or_path = "bytes"

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, texts: list[str], **_) -> dict:
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def load_tokenizer(spec: str, model_name: str | None = None):
    """`bytes`, `model` (the tokenizer of `model_name`) or a tokenizer directory/alias."""
    if spec == "bytes":
        return ByteTokenizer()
    name = model_name if spec == "model" else spec
    if spec == "model" and (model_name is None or model_name == "tiny"):
        raise ValueError("data.tokenizer='model' needs a pretrained model; for model.name='tiny' use 'bytes'")
    from .models import load_tokenizer as load_model_tokenizer

    return load_model_tokenizer(name)


def _files(source: str) -> list[str]:
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".json", ".parquet"))
    else:
        files = sorted(glob.glob(source))
    if not files:
        raise ValueError(f"data.source: no .txt/.jsonl/.json/.parquet files at {source!r}")
    return files


def load_documents(source: str, *, text_field: str = "text", max_documents: int | None = None):
    """A `datasets.Dataset` with a `text` column, one row per document, in a fixed order."""
    import datasets

    if source.startswith("builtin:"):
        from .corpora import corpus_texts

        texts = corpus_texts(source.split(":", 1)[1])  # name-ordered {work: text}
        ds = datasets.Dataset.from_dict({"name": list(texts), "text": list(texts.values())})
    else:
        files = _files(source)
        kinds = {Path(f).suffix for f in files}
        if len(kinds) > 1:
            raise ValueError(f"data.source mixes file types {sorted(kinds)}; use one of .txt, .jsonl, .parquet")
        kind = kinds.pop()
        if kind == ".txt":
            ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train")
        else:
            builder = "parquet" if kind == ".parquet" else "json"
            ds = datasets.load_dataset(builder, data_files=files, split="train")
            if text_field not in ds.column_names:
                raise ValueError(f"data.text_field {text_field!r} is not a column of {source!r}: {ds.column_names}")
            if text_field != "text":
                ds = ds.rename_column(text_field, "text")
    if max_documents is not None:
        ds = ds.select(range(min(max_documents, len(ds))))
    return ds


def tokenize_documents(ds, tokenizer) -> np.ndarray:
    """All documents as one int64 token stream, EOS after each document."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; documents need a separator")

    if isinstance(tokenizer, ByteTokenizer):  # no Python lists of ints for millions of bytes
        parts = []
        for text in ds["text"]:
            parts += [np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64), np.array([eos])]
        return np.concatenate(parts)

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    tokenized = ds.map(encode, batched=True, batch_size=8, remove_columns=ds.column_names)
    return np.concatenate([np.asarray(x, dtype=np.int64) for x in tokenized["input_ids"]])


def pack_sequences(tokens: np.ndarray, seq_len: int) -> torch.Tensor:
    """`[N, seq_len + 1]` chunks of the stream, consecutive chunks sharing one token (the next label)."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(f"data.seq_len={seq_len} is longer than the whole corpus ({len(tokens)} tokens)")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(tokens[idx])


@dataclass
class PackedDataset:
    """Packed sequences `[N, seq_len + 1]`; item i -> input_ids [seq_len], labels [seq_len] (pre-shifted)."""

    chunks: torch.Tensor

    def __len__(self) -> int:
        return self.chunks.shape[0]

    @property
    def seq_len(self) -> int:
        return self.chunks.shape[1] - 1

    def __getitem__(self, i: int) -> dict:
        chunk = self.chunks[i]
        return {"input_ids": chunk[:-1].clone(), "labels": chunk[1:].clone()}


def build_dataset(data_cfg, tokenizer) -> PackedDataset:
    """From a `ds_msattn.config.DataConfig`."""
    docs = load_documents(data_cfg.source, text_field=data_cfg.text_field, max_documents=data_cfg.max_documents)
    return PackedDataset(pack_sequences(tokenize_documents(docs, tokenizer), data_cfg.seq_len))


class ResumableLoader:
    """Deterministic, shuffled batches for one data-parallel rank, with a saveable position.

    The job consumes a stream of sequence indices: epoch e is a permutation of range(N) from a generator seeded
    by (seed, e). Each micro-step takes the next `micro_batch_size * dp_size` of them; DP rank r gets the slice
    [r * micro_batch_size, (r + 1) * micro_batch_size). `position` counts sequences consumed by the whole job.
    """

    def __init__(self, dataset: PackedDataset, *, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.dataset, self.mb, self.dp_rank, self.dp_size, self.seed = dataset, micro_batch_size, dp_rank, dp_size, seed
        self.position = 0
        self._perm_epoch, self._perm = -1, None

    def _index(self, k: int) -> int:
        n = len(self.dataset)
        epoch = k // n
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
            self._perm, self._perm_epoch = torch.randperm(n, generator=gen), epoch
        return int(self._perm[k % n])

    def next_batch(self) -> dict:
        """{'input_ids': [mb, seq_len], 'labels': [mb, seq_len], 'indices': [mb]} for this rank."""
        start = self.position + self.dp_rank * self.mb
        indices = [self._index(start + i) for i in range(self.mb)]
        self.position += self.mb * self.dp_size
        items = [self.dataset[i] for i in indices]
        return {"input_ids": torch.stack([it["input_ids"] for it in items]),
                "labels": torch.stack([it["labels"] for it in items]),
                "indices": torch.tensor(indices)}

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "num_sequences": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_sequences", len(self.dataset)) != len(self.dataset):
            raise ValueError(f"checkpoint's data has {state['num_sequences']} sequences, this run's {len(self.dataset)}:"
                             " data.source, data.seq_len or the tokenizer changed")
        self.position = int(state["position"])

