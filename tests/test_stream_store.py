"""Region store of the streaming runner: rows round-trip exactly in memory and through files on disk
(across segments, every dtype), files go away at close unless kept, and bad set-ups fail with what to do."""

from __future__ import annotations

import os

import pytest
import torch

from ds_msattn.eval import store as store_mod
from ds_msattn.eval.store import RegionStore, store_dtype


def _store(tmp_path, memory, dtype=torch.float32, **kw):
    arrays = {"k": ((1, 2, 4, 8), dtype), "kbar0": ((1, 2, 8), torch.float32)}
    return RegionStore(layers=3, arrays=arrays, memory_bytes=memory, directory=tmp_path, segment_bytes=3000, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory", [0, 7000, 1 << 30], ids=["disk", "mixed", "ram"])
def test_round_trip(tmp_path, dtype, memory):
    st = _store(tmp_path, memory, dtype)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 50, 1, 2, 4, 8, generator=g).to(dtype)  # [layers, regions, ...]
    for layer in range(3):  # appended in uneven pieces, as chunks and decode steps do
        for a, b in ((0, 7), (7, 8), (8, 31), (31, 50)):
            st["k"].write(layer, a, rows[layer, a:b])
    ids = torch.tensor([0, 3, 4, 5, 17, 18, 30, 31, 49])
    for layer in range(3):
        got = st["k"].read(layer, ids)
        assert got.dtype == dtype and torch.equal(got, rows[layer, ids])
    assert len(st["k"].segments) > 2
    assert (st.disk_bytes > 0) == (memory < 1 << 30) and (st.ram_bytes > 0) == (memory > 0)
    assert torch.equal(st["k"].read(1, ids), rows[1, ids])  # a second read of the same rows gives the same data
    directory = st.dir
    st.close()
    assert directory is None or not directory.exists()


def test_keep_leaves_the_files(tmp_path):
    st = _store(tmp_path, 0, keep=True)
    st["k"].write(0, 0, torch.ones(10, 1, 2, 4, 8))
    st.close()
    assert st.dir.exists() and any(st.dir.iterdir())


def test_bad_set_ups(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="store dtype"):
        store_dtype("int8")
    with pytest.raises(ValueError, match="store dtype"):
        store_dtype(torch.float64)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    st = _store(blocker / "sub", 0)  # a directory that cannot be made
    with pytest.raises(PermissionError, match="not writable.*--store-dir"):
        st["k"].write(0, 0, torch.ones(1, 1, 2, 4, 8))
    with pytest.raises(PermissionError, match="not writable"):
        _store(blocker / "sub", 0, planned_rows={"k": 100})
    monkeypatch.setattr(store_mod, "_free_bytes", lambda d: 10_000)
    with pytest.raises(OSError, match="needs .* GiB on disk .* --store-dtype"):
        _store(tmp_path, 0, planned_rows={"k": 1000, "kbar0": 1000})
    _store(tmp_path, 1 << 30, planned_rows={"k": 1000, "kbar0": 1000})  # fits in memory: no disk needed


def _resident_kib(directory) -> int:
    """Resident KiB of this process's mappings of files under ``directory`` (/proc/self/smaps)."""
    total, inside = 0, False
    prefix = str(directory)
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping: range perms offset dev inode [path]
                inside = len(head) >= 6 and head[5].startswith(prefix)
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
def test_reads_leave_no_store_page_resident(tmp_path):
    """Rows written to and read back from file segments count in no mapping of this process: the resident set
    does not grow with the rows read (memory-mapped segments kept every page read resident until released)."""
    st = _store(tmp_path, 0)
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 300, 1, 2, 4, 8, generator=g)
    for layer in range(3):
        st["k"].write(layer, 0, rows[layer])
        st["kbar0"].write(layer, 0, rows[layer, :, :, :, 0])
    ids = torch.arange(0, 300, 2)
    for layer in range(3):
        assert torch.equal(st["k"].read(layer, ids), rows[layer, ids])
        assert torch.equal(st["kbar0"].read(layer, ids), rows[layer, ids, :, :, 0])
    assert st.disk_bytes > 0 and _resident_kib(st.dir) == 0
    st.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs Linux /proc/self/fd")
def test_one_open_file_per_array(tmp_path):
    """However many segments go to disk, each array holds one open file (a file per segment ran into the
    descriptor limit on long inputs); close releases them."""
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    before = fds()
    st = _store(tmp_path, 0)
    st["k"].write(0, 0, torch.ones(400, 1, 2, 4, 8))
    st["kbar0"].write(0, 0, torch.ones(400, 1, 2, 8))
    assert len(st["k"].segments) > 50 and fds() == before + 2
    st.close()
    assert fds() == before
