"""``ds-msattn eval stream``: passkey prompts streamed chunk by chunk (the same ids as make_passkey_prompt) and a
text's NLL per segment, through a store on disk that is removed afterwards."""

from __future__ import annotations

import json

import pytest
import torch

from test_eval_cli import tiny_dir  # noqa: F401  (fixture)


def test_passkey_chunks_are_the_prompt(tiny_dir):  # noqa: F811
    from ds_msattn.eval.passkey import make_passkey_prompt
    from ds_msattn.eval.stream import passkey_chunks
    from ds_msattn.models import load_tokenizer

    tok = load_tokenizer(str(tiny_dir))
    for length, depth, chunk in ((400, 0.0, 64), (401, 0.37, 32), (333, 1.0, 128)):
        want = make_passkey_prompt(tok, length, 12345, depth).input_ids
        pieces = list(passkey_chunks(tok, length, 12345, depth, chunk))
        assert all(p.shape[0] == chunk for p in pieces[:-1])
        assert torch.cat(pieces).tolist() == want


def test_stream_cli_passkey_and_text(tiny_dir, tmp_path):  # noqa: F811
    from ds_msattn.eval.cli import main

    common = ["--model", str(tiny_dir), "--region-size", "4", "--top-k", "4", "--merge", "2", "--chunk", "32",
              "--window-regions", "4", "--scales", "1,2,8", "--beam", "2", "--far-positions", "compact",
              "--score", "position_free", "--store-memory-gib", "0", "--store-dtype", "float16",
              "--store-dir", str(tmp_path / "store"), "--local-regions", "1", "--quiet"]
    out = tmp_path / "pk.json"
    assert main(["stream", "--passkey-lengths", "300", "--trials", "2", "--output", str(out), *common]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["passed"]) == {"300"} and len(rep["trials"]) == 2
    assert all(t["store_disk_gib"] > 0 and t["prefill_tokens_per_s"] > 0 for t in rep["trials"])
    assert rep["stream"]["far_positions"] == "compact" and rep["stream"]["score"] == "position_free"
    assert rep["stream"]["coarse_score"] == "bound"  # the default
    assert rep["stream"]["local_regions"] == 1
    out = tmp_path / "text.json"
    assert main(["stream", "--text-file", str(tiny_dir / "doc.txt"), "--segment-tokens", "256", "--new-tokens", "3",
                 "--coarse-score", "mean", "--output", str(out), *common]) == 0
    rep = json.loads(out.read_text())
    assert rep["stream"]["coarse_score"] == "mean"
    assert rep["tokens"] > 500 and len(rep["new_tokens"]) == 3 and len(rep["segments"]) == -(-rep["tokens"] // 256)
    assert rep["documents"] == [{"name": "doc", "start": 0}]
    assert not any((tmp_path / "store").iterdir())  # the store's files are gone


def test_joined_ids_marks_where_each_work_starts(tiny_dir):  # noqa: F811
    from ds_msattn.eval.stream import joined_ids
    from ds_msattn.models import load_tokenizer

    tok = load_tokenizer(str(tiny_dir))
    texts = {"a": "one two three", "b": "four five", "c": "six"}
    each = [tok("\n\n" + t, add_special_tokens=False)["input_ids"] for t in texts.values()]
    ids, works = joined_ids(tok, texts, None)
    assert ids.tolist() == [i for e in each for i in e]
    assert works == [{"name": "a", "start": 0}, {"name": "b", "start": len(each[0])},
                     {"name": "c", "start": len(each[0]) + len(each[1])}]
    ids, works = joined_ids(tok, texts, len(each[0]) + 1)  # stops at the work that reaches max_tokens
    assert ids.shape[0] == len(each[0]) + 1 and [w["name"] for w in works] == ["a", "b"]


def test_stream_cli_bad_store_dtype(tiny_dir, tmp_path):  # noqa: F811
    from ds_msattn.eval.cli import main

    with pytest.raises(SystemExit):
        main(["stream", "--model", str(tiny_dir), "--passkey-lengths", "300", "--store-dtype", "int8",
              "--output", str(tmp_path / "x.json")])


def test_stream_cli_local_regions_beyond_budget(tiny_dir, tmp_path, capsys):  # noqa: F811
    from ds_msattn.cli import main as ds_main

    # the default --local-regions 16 does not fit top_k 4 - merge 2 - 1 sink: one line naming the limit
    rc = ds_main(["eval", "stream", "--model", str(tiny_dir), "--passkey-lengths", "300", "--region-size", "4",
                  "--top-k", "4", "--merge", "2", "--chunk", "32", "--window-regions", "4",
                  "--output", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "local_regions must be in [0, top_k - merge - sinks] = [0, 1], got 16" in err
    assert "Traceback" not in err
