"""Region store of the streaming runner: every region's exact k and v per layer, appended as the input streams.

DESIGN.md, "Long inputs at inference (streaming mode)". Arrays are indexed by region id (rows) and hold every
layer (``[rows, layers, *row_shape]``), so a chunk appends rows once and each layer writes its slice. Rows live
in fixed-size segments: in host memory while the budget (``memory_bytes``) lasts, then in one file per array under
a directory (a temporary one by default, removed on :meth:`RegionStore.close` or at exit unless ``keep``); one
file, not one per segment, so the open descriptors do not grow with the input. Disk space of each segment is
reserved when it is added (``posix_fallocate``), so a full disk is an error, never a crash on a write; the
planned size is checked before the first row.

Files are read and written with ``preadv``/``pwrite`` into the caller's tensors, never memory-mapped: a mapped
page that was read counts in the process's resident set until it is unmapped (with the kernel's fault-around,
neighbouring rows and other layers' slices too), so the resident set grew with the regions a chunk reads over all
layers, i.e. with the history (SmolLM2, 30 layers: about 300 MiB inside a chunk at 32K tokens, growing). Read
through the page cache, the data is resident only in the tensors asked for. In the file a segment is layer-major
(``[layers, seg_rows, *row_shape]``), so a run of consecutive rows of one layer is one system call.

Reads take a sorted set of row ids; each run of consecutive ids inside a segment is one copy or one ``preadv``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SEGMENT_BYTES = 64 << 20


def store_dtype(name_or_dtype) -> torch.dtype:
    """``float32`` | ``float16`` | ``bfloat16`` (or the torch dtype) -> torch dtype; anything else is an error."""
    if isinstance(name_or_dtype, torch.dtype):
        if name_or_dtype in STORE_DTYPES.values():
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
        self.slice_bytes = self.row_bytes // layers  # one layer's row
        self.segments: list[torch.Tensor | None] = []  # RAM: [seg_rows, layers, *row_shape]; file: None
        self.offsets: list[int | None] = []  # file segments: byte offset in the array's file; RAM: None
        self.fd: list[int] = []  # the array's one file (0 or 1 descriptor), one per array whatever the length
        weakref.finalize(self, _close_fds, self.fd)  # a store dropped without close() keeps no descriptor open
        self.rows = 0

    @property
    def seg_bytes(self) -> int:
        return self.seg_rows * self.row_bytes

    def _new_segment(self) -> None:
        st = self.store
        if st.ram_bytes + self.seg_bytes <= st.memory_bytes:
            self.segments.append(torch.empty(self.seg_rows, *self.inner, dtype=self.dtype))
            self.offsets.append(None)
            st.ram_bytes += self.seg_bytes
            return
        path = st.directory() / f"{self.name}.bin"
        if not self.fd:
            self.fd.append(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600))
        base = sum(o is not None for o in self.offsets) * self.seg_bytes
        try:
            os.posix_fallocate(self.fd[0], base, self.seg_bytes)
        except OSError as e:
            if base == 0:
                _close_fds(self.fd)
                path.unlink(missing_ok=True)
            raise OSError(e.errno, f"region store: no space for {self.seg_bytes / 2**20:.0f} MiB more under {st.dir} "
                                   f"({e.strerror}): free space, pass --store-dir on a larger disk, a smaller "
                                   f"--store-dtype or a larger --store-memory-gib") from None
        self.segments.append(None)
        self.offsets.append(base)
        st.disk_bytes += self.seg_bytes

    def grow(self, rows: int) -> None:
        """Make room for rows ``[0, rows)``."""
        while len(self.segments) * self.seg_rows < rows:
            self._new_segment()
        self.rows = max(self.rows, rows)

    def _bytes(self, t: torch.Tensor) -> memoryview:
        """The bytes of a contiguous CPU tensor of this array's dtype (shares its memory; numpy has no bfloat16,
        so those are viewed as int16 bit patterns)."""
        arr = (t.view(torch.int16) if self.dtype == torch.bfloat16 else t).numpy()
        return memoryview(arr).cast("B")

    def _file_offset(self, s: int, layer: int, off: int) -> int:
        return self.offsets[s] + (layer * self.seg_rows + off) * self.slice_bytes

    def write(self, layer: int, start: int, values: torch.Tensor) -> None:
        """Rows ``[start, start + n)`` of ``layer`` := ``values [n, *row_shape]``."""
        n = values.shape[0]
        self.grow(start + n)
        values = values.detach().to("cpu", self.dtype).contiguous()
        buf = None
        done = 0
        while done < n:
            s, off = divmod(start + done, self.seg_rows)
            take = min(n - done, self.seg_rows - off)
            if self.offsets[s] is None:
                self.segments[s][off : off + take, layer] = values[done : done + take]
            else:
                buf = self._bytes(values) if buf is None else buf
                sb = self.slice_bytes
                _pwrite_all(self.fd[0], buf[done * sb : (done + take) * sb], self._file_offset(s, layer, off))
            done += take

    def read(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (sorted, unique int64, all written) of ``layer`` -> ``[len(ids), *row_shape]``."""
        n = ids.shape[0]
        out = torch.empty(n, *self.inner[1:], dtype=self.dtype)
        if n == 0:
            return out
        ids = ids.to("cpu", torch.int64)
        # Runs of consecutive ids inside one segment: [a, e) of out <- rows first..first+e-a.
        brk = torch.ones(n, dtype=torch.bool)
        brk[1:] = (ids[1:] != ids[:-1] + 1) | (ids[1:] % self.seg_rows == 0)
        starts = brk.nonzero().flatten()
        ends = torch.cat([starts[1:], torch.tensor([n])])
        buf = None
        sb = self.slice_bytes
        for a, e, first in zip(starts.tolist(), ends.tolist(), ids[starts].tolist()):
            s, off = divmod(first, self.seg_rows)
            if self.offsets[s] is None:
                out[a:e] = self.segments[s][off : off + e - a, layer]
            else:
                buf = self._bytes(out) if buf is None else buf
                _pread_all(self.fd[0], buf[a * sb : e * sb], self._file_offset(s, layer, off))
        return out

    def close(self) -> None:
        self.segments = []
        _close_fds(self.fd)


def _close_fds(fds: list[int | None]) -> None:
    while fds:
        fd = fds.pop()
        if fd is not None:
            os.close(fd)


def _pread_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        got = os.preadv(fd, [buf], offset)
        if got <= 0:
            raise OSError(f"region store: short read at offset {offset} ({len(buf)} bytes missing)")
        buf, offset = buf[got:], offset + got


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        got = os.pwrite(fd, buf, offset)
        buf, offset = buf[got:], offset + got


class RegionStore:
    """Append-only per-layer arrays indexed by region id: ``k``, ``v`` (the store dtype) and named fp32 extras.

    Args:
        layers: model layers (every array holds all of them per row).
        arrays: ``{name: (row_shape, dtype)}``, e.g. ``{"k": ((B, Hkv, c, D), torch.float16), ...}``.
        memory_bytes: host-memory budget; segments beyond it are files.
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

    def nbytes(self) -> dict[str, int]:
        return {"ram": self.ram_bytes, "disk": self.disk_bytes}

    def close(self) -> None:
        for arr in self.arrays.values():
            arr.close()
        if self._finalizer is not None:
            self._finalizer()
