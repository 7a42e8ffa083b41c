"""Progress for work that takes minutes: inside a training step, and over evaluation windows and trials.

Rank 0 only (``ds_msattn.logs.progress_enabled``). On a terminal, evaluation shows a tqdm bar; otherwise (a log
file, a pipe) a plain line at most every ``interval`` seconds, so logs stay readable. Short work prints nothing.
"""

from __future__ import annotations

import sys
import time

from .logs import progress_enabled

INTERVAL_S = 30.0


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class LineProgress:
    """A tqdm-like counter that prints ``desc: n/total unit, elapsed, about T left`` at most every ``interval`` s."""

    def __init__(self, total: int, desc: str, unit: str, interval: float = INTERVAL_S, stream=None,
                 clock=time.monotonic, enabled: bool = True):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.stream, self.clock, self.enabled = stream, clock, enabled
        self.n = 0
        self.start = self.last = clock()

    def line(self) -> str:
        elapsed = self.clock() - self.start
        n = round(self.n, 6)
        done = f"{n:.0f}" if float(n).is_integer() else f"{n:.1f}"
        text = f"{self.desc}: {done}/{self.total} {self.unit}, {_duration(elapsed)} elapsed"
        if 0 < n < self.total:
            text += f", about {_duration(elapsed / self.n * (self.total - self.n))} left"
        return text

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        finished = self.n >= self.total - 1e-9
        if self.enabled and (now - self.last >= self.interval or (finished and now - self.start >= self.interval)):
            self.last = now
            print(self.line(), file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str):
    """tqdm on a terminal, :class:`LineProgress` elsewhere; silent on ranks other than 0."""
    enabled = progress_enabled()
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=f" {unit}", dynamic_ncols=True, file=sys.stderr,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} " + unit + " [{elapsed}<{remaining}]")
    return LineProgress(total, desc, unit, enabled=enabled)


class LayerProgress:
    """Evaluation progress in units of one prefill each (a perplexity window, a passkey trial), advanced per layer.

    A forward hook on every decoder layer adds ``tokens / (unit_tokens * layers)`` of a unit per pass over more than
    one token, so a bar over units moves (and estimates the time left) while a long window runs, and a prefill read
    in chunks (H2O's steps) counts as one unit in all; decoding steps (one token) are not counted. ``unit_tokens``
    (None: every pass is a whole unit) is the length of one unit, set with :meth:`set_unit_tokens` when it changes
    (each passkey length). ``bar`` is what :func:`progress_bar` returns (None until :meth:`next_bar` gives one).
    """

    def __init__(self, bar, layers, unit_tokens: int | None = None):
        self.bar, self.layers, self.unit_tokens = bar, len(layers), unit_tokens
        self.handles = [layer.register_forward_hook(self._on_forward) for layer in layers]

    def set_unit_tokens(self, n: int | None) -> None:
        self.unit_tokens = n

    def next_bar(self, bar, unit_tokens: int | None) -> None:
        """Count the next group of units (a passkey length) on a bar of its own: trials of one length cost alike, so
        its time left is estimated from its own trials (a 64K trial takes 10-30x an 8K one)."""
        if self.bar is not None:
            self.bar.close()
        self.bar, self.unit_tokens = bar, unit_tokens

    def skip_unit(self) -> None:
        """One unit needs no work (a passkey trial resumed from its file): it leaves the total, so the time left
        is estimated from the units that run."""
        self.bar.total -= 1
        if hasattr(self.bar, "refresh"):  # tqdm redraws; LineProgress reads the total at its next line
            self.bar.refresh()

    def _on_forward(self, _module, _args, output) -> None:
        if self.bar is None:
            return
        out = output[0] if isinstance(output, (tuple, list)) else output
        if getattr(out, "dim", lambda: 0)() >= 2 and out.shape[1] > 1:
            share = 1.0 if self.unit_tokens is None else min(1.0, out.shape[1] / self.unit_tokens)
            self.bar.update(share / self.layers)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.bar is not None:
            self.bar.close()


class StepProgress:
    """Progress inside a training step, counted in decoder-layer passes (rank 0).

    Every decoder layer gets a forward hook: it counts the layer's forward pass and puts a gradient hook on the
    layer's output, which counts its backward pass (recomputation under activation checkpointing is not counted).
    A step makes ``2 * layers * micro_batches`` passes. A line is printed at most every ``interval`` seconds and only
    once the step has run that long, so short steps print nothing. From the second step on the estimate of the time
    left reads the first step's timings at the same pass; during the first step it is extrapolated (a backward pass
    counted as twice a forward one: rough).
    """

    def __init__(self, layers, *, micro_batches: int, total_steps: int, interval: float = INTERVAL_S, stream=None,
                 clock=time.monotonic):
        self.layers = len(layers)
        self.per_micro = 2 * self.layers
        self.expected = self.per_micro * micro_batches
        self.total_steps, self.interval, self.stream, self.clock = total_steps, interval, stream, clock
        self.reference: list[float] | None = None  # offsets of each pass in the first complete step
        self.reference_total = 0.0
        self.step = 0
        self.times: list[float] = []
        self.t0 = self.last = 0.0
        self.active = False
        self.handles = [layer.register_forward_hook(self._on_forward) for layer in layers]

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def begin(self, step: int) -> None:
        self.step, self.times, self.active = step, [], True
        self.t0 = self.last = self.clock()

    def _left(self, done: int, elapsed: float) -> tuple[float, bool] | None:
        if self.reference and done <= len(self.reference) and self.reference[done - 1] > 0:
            ref = self.reference[done - 1]
            return (self.reference_total - ref) * elapsed / ref, False
        fwd = min(done, self.layers)
        if fwd == 0:
            return None
        per_forward = self.times[fwd - 1] / fwd if done <= self.layers else None
        if per_forward is None:  # in backward: the rate since its first pass (the loss and lm_head come before it)
            back = done - self.layers
            if back < 2:
                return None
            per_back = (elapsed - self.times[self.layers]) / (back - 1)
            return per_back * max(0, self.expected - done), True
        remaining = (self.layers - done) + 2 * (self.expected - self.layers)
        return per_forward * remaining, True

    def _on_forward(self, _module, _args, output) -> None:
        import torch

        if not self.active or torch._C._current_graph_task_id() != -1:  # a recomputation inside backward
            return
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._on_backward)
        self._on_pass()

    def _on_backward(self, grad):
        self._on_pass()
        return grad

    def _on_pass(self) -> None:
        if not self.active:
            return
        now = self.clock()
        self.times.append(now - self.t0)
        if now - self.last < self.interval:
            return
        self.last = now
        done, elapsed = len(self.times), now - self.t0
        within = (done - 1) % self.per_micro + 1
        phase = "forward" if within <= self.layers else "backward"
        text = (f"train: step {self.step + 1}/{self.total_steps}: layer pass {min(done, self.expected)}/{self.expected} "
                f"({phase}), {_duration(elapsed)} elapsed")
        left = self._left(done, elapsed)
        if left is not None:
            text += f", about {_duration(left[0])} left in this step" + (" (rough, first step)" if left[1] else "")
        self._print(text)

    def end(self) -> None:
        """Close the step; a long one reports its duration and the time left for the run."""
        self.active = False
        elapsed = self.clock() - self.t0
        if self.reference is None and self.times:
            self.reference, self.reference_total = list(self.times), elapsed
            self.expected = len(self.times)
        remaining = self.total_steps - self.step - 1
        if elapsed >= self.interval:
            text = f"train: step {self.step + 1}/{self.total_steps} took {_duration(elapsed)}"
            if remaining > 0:
                text += f"; about {_duration(remaining * elapsed)} left for {remaining} more step{'s' * (remaining > 1)}"
            self._print(text)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
