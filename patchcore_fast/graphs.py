"""CUDA graphs of the embedder (issue #24, item 4).

One image through WideResNet-50 to layer3 and the aggregation is a few hundred small
kernels; at batch 1 the host's cost of launching them one by one (several microseconds
each) is most of the time the GPU needs for them. A CUDA graph records the kernels of one
call, with the buffers they read and write, and replays them all in one launch.

:class:`GraphedForward` captures one graph per input shape (the last, smaller batch of a
run is a shape of its own), after a warm-up on a side stream (cuDNN and cuBLAS set up
their handles and workspaces outside the capture), and replays it: the images are copied
into the graph's input buffer, the graph runs, and its output buffer is copied out, so
that a result stays valid after the next replay. Each graph keeps its own memory pool
(no ordering constraints between shapes), so the number of graphs is bounded; shapes
beyond it, and every call off CUDA, run the function as it is. A capture that fails (an
operation that cannot be recorded) turns the graphs off for that function, with one
warning naming why; the call is then run as it is.

The function must neither synchronise with the host nor depend on the values of its
inputs for what it launches: the embedder (convolutions, pooling, interpolation, one
matrix product) qualifies. Under bf16 autocast it must not use autocast's weight cache
(:class:`~patchcore_fast.features.PatchEmbedder` turns it off).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

from .errors import first_line

__all__ = ["GraphedForward", "MAX_GRAPHS"]

#: Input shapes captured at most per function (each holds its own activations' memory).
MAX_GRAPHS = 4
#: Eager calls on a side stream before a capture.
WARMUP_CALLS = 2


class GraphedForward:
    """``fn(images) -> (Tensor, extra)`` replayed from one CUDA graph per input shape.

    Args:
        fn: the function; its first result is a tensor, its second anything that depends
            on the input's shape only (the embedder's feature grid).
        max_graphs: input shapes captured at most.
    """

    def __init__(self, fn: Callable[[Tensor], tuple[Tensor, object]],
                 max_graphs: int = MAX_GRAPHS):
        self.fn = fn
        self.max_graphs = int(max_graphs)
        self._graphs: dict[tuple, tuple] = {}
        #: why capturing failed (the graphs are then off), or None
        self.failed: str | None = None

    @property
    def captured(self) -> int:
        """The number of graphs captured so far."""
        return len(self._graphs)

    def __call__(self, images: Tensor) -> tuple[Tensor, object]:
        if images.device.type != "cuda" or self.failed is not None:
            return self.fn(images)
        key = (tuple(images.shape), images.dtype, images.device,
               torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return self.fn(images)
            try:
                entry = self._capture(images)
            except Exception as exc:  # an operation the capture cannot record
                self.failed = first_line(exc)
                warnings.warn(f"CUDA graphs turned off for the embedder, run as it is: "
                              f"{self.failed}", RuntimeWarning, stacklevel=2)
                return self.fn(images)
            self._graphs[key] = entry
        graph, static_in, static_out, extra = entry
        static_in.copy_(images)
        graph.replay()
        return static_out.clone(), extra

    def _capture(self, images: Tensor) -> tuple:
        device = images.device
        static_in = images.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.fn(static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the capture forbids this thread's unsafe CUDA calls only; the
        # reader's pin-memory thread keeps allocating page-locked buffers meanwhile (under
        # the default "global" mode its allocation would fail in that thread).
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out, extra = self.fn(static_in)
        return graph, static_in, static_out, extra
