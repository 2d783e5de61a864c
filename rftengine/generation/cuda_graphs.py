"""CUDA graphs of the decode step, one per (rows bucket, live cache length), one shared pool.

Each graph replays forward + sampling + log-prob + bookkeeping on the fixed buffers of
`RolloutState` and `StaticKVCache`; it keeps no output tensor of its own (everything is written
into those buffers), so the graphs can share one memory pool and be replayed in any order.
The sampling noise is keyed by device tensors of `RolloutState` (seed, sequence ids, steps),
so a new seed, offset or row content reaches the replays without recapture. A graph is captured
when a rollout first needs it, mid-rollout (`Generator._replay` puts back the per-row state the
capture's warm-up step advanced).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def row_buckets(max_rows: int) -> list[int]:
    """Batch sizes a graph is captured for: 1, 2, 4, 8, then every 16, then ``max_rows``."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_rows] + list(range(16, max_rows, 16))
    return sizes + [max_rows]


def bucket_for(rows: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= rows)


class DecodeGraphs:
    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}

    def __contains__(self, key: tuple) -> bool:
        return key in self.graphs

    def __len__(self) -> int:
        return len(self.graphs)

    def capture(self, key: tuple, step: Callable[[], None]) -> None:
        """Run ``step`` once eagerly on a side stream (compiles Triton kernels, creates the cuBLAS
        workspace; its writes must be harmless), then record it. Must precede the rollout's reset."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step()
        self.graphs[key] = graph

    def replay(self, key: tuple) -> None:
        self.graphs[key].replay()

    def clear(self) -> None:
        self.graphs.clear()
