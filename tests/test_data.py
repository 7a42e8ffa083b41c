"""Data: loading text/jsonl/parquet with datasets, packing with shifted labels, seeded order, resumable loader."""

import json

import numpy as np
import pytest
import torch

from ds_msattn import data
from ds_msattn.config import DataConfig

DOCS = ["First document, long enough to pack. " * 20, "Second one: Ünïcode too. " * 30, "Third. " * 50]


def test_pack_sequences_labels_are_the_next_tokens():
    tokens = np.arange(103)
    chunks = data.pack_sequences(tokens, 10)
    assert chunks.shape == (10, 11)  # (103 - 1) // 10
    ds = data.PackedDataset(chunks)
    for i in range(len(ds)):
        item = ds[i]
        assert item["input_ids"].tolist() == list(range(10 * i, 10 * i + 10))
        assert item["labels"].tolist() == list(range(10 * i + 1, 10 * i + 11))
    with pytest.raises(ValueError, match="seq_len"):
        data.pack_sequences(np.arange(5), 10)


def _expected_stream(texts):
    out = []
    for t in texts:
        out += list(t.encode("utf-8")) + [256]
    return out


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files_load_tokenise_and_pack(tmp_path, kind):
    if kind == "txt":
        for i, d in enumerate(DOCS):
            (tmp_path / f"doc{i}.txt").write_text(d)
        source, field = str(tmp_path), "text"
    elif kind == "jsonl":
        with open(tmp_path / "docs.jsonl", "w") as f:
            for d in DOCS:
                f.write(json.dumps({"body": d}) + "\n")
        source, field = str(tmp_path / "docs.jsonl"), "body"
    else:
        import datasets

        datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(tmp_path / "docs.parquet"))
        source, field = str(tmp_path / "docs.parquet"), "text"
    ds = data.build_dataset(DataConfig(source=source, text_field=field, seq_len=64), data.ByteTokenizer())
    stream = _expected_stream(DOCS)
    assert len(ds) == (len(stream) - 1) // 64
    flat = torch.cat([ds[i]["input_ids"] for i in range(len(ds))]).tolist()
    assert flat == stream[: len(flat)]


def test_bad_source_and_field_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.source"):
        data.load_documents(str(tmp_path / "nothing*.txt"))
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="data.text_field"):
        data.load_documents(str(tmp_path / "a.jsonl"), text_field="text")


def _dataset(n=23, seq=4):
    return data.PackedDataset(data.pack_sequences(np.arange(n * seq + 1), seq))


def test_order_is_seeded_and_covers_each_epoch():
    ds = _dataset()
    a = data.ResumableLoader(ds, micro_batch_size=1, seed=5)
    b = data.ResumableLoader(ds, micro_batch_size=1, seed=5)
    c = data.ResumableLoader(ds, micro_batch_size=1, seed=6)
    ia = [a.next_batch()["indices"].item() for _ in range(46)]
    assert ia == [b.next_batch()["indices"].item() for _ in range(46)]
    assert ia != [c.next_batch()["indices"].item() for _ in range(46)]
    assert sorted(ia[:23]) == list(range(23)) and sorted(ia[23:]) == list(range(23))
    assert ia[:23] != ia[23:]  # a new permutation per epoch


def test_data_parallel_ranks_split_the_single_process_batches():
    ds = _dataset()
    single = data.ResumableLoader(ds, micro_batch_size=3, seed=1)
    ranks = [data.ResumableLoader(ds, micro_batch_size=1, dp_rank=r, dp_size=3, seed=1) for r in range(3)]
    for _ in range(10):
        expected = single.next_batch()
        got = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([g["input_ids"] for g in got]), expected["input_ids"])
        assert torch.equal(torch.cat([g["labels"] for g in got]), expected["labels"])


def test_loader_resumes_at_its_saved_position():
    ds = _dataset()
    run = data.ResumableLoader(ds, micro_batch_size=2, dp_rank=1, dp_size=2, seed=3)
    for _ in range(7):
        run.next_batch()
    state = run.state_dict()
    expected = [run.next_batch()["input_ids"] for _ in range(20)]
    resumed = data.ResumableLoader(ds, micro_batch_size=2, dp_rank=1, dp_size=2, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch()["input_ids"], e) for e in expected)
    with pytest.raises(ValueError, match="sequences"):
        data.ResumableLoader(_dataset(n=10), micro_batch_size=1).load_state_dict(state)


def test_builtin_corpus_tokenises():
    ds = data.build_dataset(DataConfig(source="builtin:shakespeare", seq_len=1024, max_documents=2),
                            data.ByteTokenizer())
    assert len(ds) > 100 and ds.chunks.max() <= 256
