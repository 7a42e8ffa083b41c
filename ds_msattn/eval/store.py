"""Region store of the streaming runner: every region's exact k and v per layer, appended as the input streams.

DESIGN.md, "Long inputs at inference (streaming mode)". Arrays are indexed by region id (rows) and hold every
layer side by side (``[rows, layers, *row_shape]``), so a chunk appends rows once and each layer writes its
slice. Rows live in fixed-size segments: in host memory while the budget (``memory_bytes``) lasts, then in
memory-mapped files under a directory (a temporary one by default, removed on :meth:`RegionStore.close` or at
exit unless ``keep``). Disk space of each file is reserved when it is created (``posix_fallocate``), so a full
disk is an error, never a crash on a write; the planned size is checked before the first row.

Reads take a sorted set of row ids (one gather of whole regions per chunk and layer); :meth:`release` drops the
pages a chunk touched from this process's mappings (they stay in the page cache), so the resident set is
bounded by the chunk, not by the store.
"""

from __future__ import annotations

import math
import mmap
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# numpy has no bfloat16: its rows are kept as int16 bit patterns and viewed back.
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}
SEGMENT_BYTES = 64 << 20


def store_dtype(name_or_dtype) -> torch.dtype:
    """``float32`` | ``float16`` | ``bfloat16`` (or the torch dtype) -> torch dtype; anything else is an error."""
    if isinstance(name_or_dtype, torch.dtype):
        if name_or_dtype in _NUMPY:
            return name_or_dtype
        raise ValueError(f"store dtype must be one of {sorted(STORE_DTYPES)}, got {name_or_dtype}")
    if name_or_dtype not in STORE_DTYPES:
        raise ValueError(f"store dtype must be one of {sorted(STORE_DTYPES)}, got {name_or_dtype!r}")
    return STORE_DTYPES[name_or_dtype]


def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


class _Array:
    """Rows ``[layers, *row_shape]`` of one dtype in segments of ``seg_rows`` rows (RAM or mapped file)."""

    def __init__(self, store: RegionStore, name: str, layers: int, row_shape: tuple[int, ...], dtype: torch.dtype):
        self.store, self.name, self.dtype = store, name, dtype
        self.inner = (layers, *row_shape)
        self.row_bytes = math.prod(self.inner) * torch.empty((), dtype=dtype).element_size()
        self.seg_rows = max(1, store.segment_bytes // self.row_bytes)
        self.segments: list[torch.Tensor] = []  # [seg_rows, layers, *row_shape] each
        self.maps: list[mmap.mmap | None] = []
        self.rows = 0

    @property
    def seg_bytes(self) -> int:
        return self.seg_rows * self.row_bytes

    def _new_segment(self) -> None:
        st = self.store
        if st.ram_bytes + self.seg_bytes <= st.memory_bytes:
            self.segments.append(torch.empty(self.seg_rows, *self.inner, dtype=self.dtype))
            self.maps.append(None)
            st.ram_bytes += self.seg_bytes
            return
        path = st.directory() / f"{self.name}-{len(self.segments):05d}.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.seg_bytes)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise OSError(e.errno, f"region store: no space for {self.seg_bytes / 2**20:.0f} MiB more under {st.dir} "
                                   f"({e.strerror}): free space, pass --store-dir on a larger disk, a smaller "
                                   f"--store-dtype or a larger --store-memory-gib") from None
        mm = mmap.mmap(fd, self.seg_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(fd)  # the mapping keeps the file open
        arr = np.frombuffer(mm, dtype=_NUMPY[self.dtype]).reshape(self.seg_rows, *self.inner)
        seg = torch.from_numpy(arr)
        self.segments.append(seg.view(self.dtype) if self.dtype == torch.bfloat16 else seg)
        self.maps.append(mm)
        st.disk_bytes += self.seg_bytes

    def grow(self, rows: int) -> None:
        """Make room for rows ``[0, rows)``."""
        while len(self.segments) * self.seg_rows < rows:
            self._new_segment()
        self.rows = max(self.rows, rows)

    def write(self, layer: int, start: int, values: torch.Tensor) -> None:
        """Rows ``[start, start + n)`` of ``layer`` := ``values [n, *row_shape]``."""
        n = values.shape[0]
        self.grow(start + n)
        values = values.detach().to("cpu", self.dtype)
        done = 0
        while done < n:
            s, off = divmod(start + done, self.seg_rows)
            take = min(n - done, self.seg_rows - off)
            self.segments[s][off : off + take, layer] = values[done : done + take]
            self.store.touched.add((self.name, s))
            done += take

    def read(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (sorted, unique int64, all written) of ``layer`` -> ``[len(ids), *row_shape]``."""
        out = torch.empty(ids.shape[0], *self.inner[1:], dtype=self.dtype)
        if ids.numel() == 0:
            return out
        seg = torch.div(ids, self.seg_rows, rounding_mode="floor")
        bounds = torch.searchsorted(seg, torch.arange(int(seg[-1]) + 2))
        for s in range(int(seg[0]), int(seg[-1]) + 1):
            a, b = int(bounds[s]), int(bounds[s + 1])
            if a == b:
                continue
            out[a:b] = self.segments[s][ids[a:b] - s * self.seg_rows, layer]
            self.store.touched.add((self.name, s))
        return out

    def release(self, s: int) -> None:
        mm = self.maps[s]
        if mm is not None:
            mm.madvise(mmap.MADV_DONTNEED)  # shared file mapping: the data stays in the file / page cache

    def close(self) -> None:
        self.segments = []
        for mm in self.maps:
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # a tensor still views it: the mapping goes with that tensor
                    pass
        self.maps = []


class RegionStore:
    """Append-only per-layer arrays indexed by region id: ``k``, ``v`` (the store dtype) and named fp32 extras.

    Args:
        layers: model layers (every array holds all of them per row).
        arrays: ``{name: (row_shape, dtype)}``, e.g. ``{"k": ((B, Hkv, c, D), torch.float16), ...}``.
        memory_bytes: host-memory budget; segments beyond it are memory-mapped files.
        directory: where the store's files go (a fresh sub-directory is made in it); default: the system temp dir.
        keep: leave the files in place at close (their directory is :attr:`dir`).
        planned_rows: ``{name: rows}`` the input will need; the disk space it needs beyond the memory budget is
            checked against the free space before anything is written.
    """

    def __init__(self, *, layers: int, arrays: dict[str, tuple[tuple[int, ...], torch.dtype]], memory_bytes: int,
                 directory: str | os.PathLike | None = None, keep: bool = False,
                 planned_rows: dict[str, int] | None = None, segment_bytes: int = SEGMENT_BYTES):
        if memory_bytes < 0:
            raise ValueError(f"store memory budget must be >= 0 bytes, got {memory_bytes}")
        self.memory_bytes, self.segment_bytes, self.keep = int(memory_bytes), int(segment_bytes), keep
        self.parent = Path(directory) if directory is not None else Path(tempfile.gettempdir())
        self.dir: Path | None = None
        self.ram_bytes = self.disk_bytes = 0
        self.touched: set[tuple[str, int]] = set()
        self.arrays = {name: _Array(self, name, layers, tuple(shape), dt) for name, (shape, dt) in arrays.items()}
        self._finalizer = None
        if planned_rows:
            self.check_space(planned_rows)

    def __getitem__(self, name: str) -> _Array:
        return self.arrays[name]

    def planned_bytes(self, planned_rows: dict[str, int]) -> tuple[int, int]:
        """(RAM bytes, disk bytes) the arrays will allocate for ``planned_rows``, in allocation order."""
        ram = disk = 0
        for name, rows in planned_rows.items():
            arr = self.arrays[name]
            for _ in range(math.ceil(rows / arr.seg_rows)):
                if ram + arr.seg_bytes <= self.memory_bytes:
                    ram += arr.seg_bytes
                else:
                    disk += arr.seg_bytes
        return ram, disk

    def check_space(self, planned_rows: dict[str, int]) -> None:
        _, disk = self.planned_bytes(planned_rows)
        if disk == 0:
            return
        self._check_parent()
        free = _free_bytes(self.parent)
        if disk > free:
            raise OSError(f"region store needs {disk / 2**30:.2f} GiB on disk under {self.parent} but only "
                          f"{free / 2**30:.2f} GiB are free: pass --store-dir on a larger disk, a smaller "
                          f"--store-dtype (float16/bfloat16 halve float32) or a larger --store-memory-gib")

    def _check_parent(self) -> None:
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.parent, prefix=".ds_msattn-probe-")
            probe.close()
        except OSError as e:
            raise PermissionError(f"store directory {self.parent} is not writable ({e.strerror or e}): pass "
                                  f"--store-dir with a writable directory") from None

    def directory(self) -> Path:
        """The store's own directory (made on first use)."""
        if self.dir is None:
            self._check_parent()
            self.dir = Path(tempfile.mkdtemp(prefix="ds_msattn-store-", dir=self.parent))
            if not self.keep:
                self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        return self.dir

    def release(self) -> None:
        """Drop the mapped pages touched since the last call from this process's resident set."""
        for name, s in self.touched:
            self.arrays[name].release(s)
        self.touched.clear()

    def nbytes(self) -> dict[str, int]:
        return {"ram": self.ram_bytes, "disk": self.disk_bytes}

    def close(self) -> None:
        for arr in self.arrays.values():
            arr.close()
        if self._finalizer is not None:
            self._finalizer()
