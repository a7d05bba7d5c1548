"""The torch backend's UNet step on the GPU: the step function, its CUDA graph (captured once
per input shape, so a step costs its kernels, not the ~1,500 Python-issued launches of an
eager forward) and CUDA-event timing. Shared by the backend and benchmarks/sd15_unet_step.py."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def unet_step(unet: torch.nn.Module, channels_last: bool, device) -> Callable:
    """``step(sample, step_index, context)`` of a CachedTimeUNet (or its RingForward wrapper)."""
    zero = torch.zeros((), device=device)  # the ignored timestep, on the device: an int would be copied from the host under capture

    def step(sample: torch.Tensor, step_index: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        return unet(sample, step_index, context, timestep=zero).contiguous()

    return step


def cuda_time_ms(call: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``runs`` calls after ``warmup`` untimed ones, by CUDA events."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


_capture_streams: dict[tuple[int, int], torch.cuda.Stream] = {}


def _capture_stream(priority: int = 0) -> torch.cuda.Stream:
    """The one stream (per priority) every warm-up and capture of this module runs on. PyTorch keeps a cuBLAS
    workspace for each stream cuBLAS ever ran on, so a fresh stream per capture (cycling through
    PyTorch's pool of 32) would leave up to 32 of them allocated."""
    key = (torch.cuda.current_device(), priority)
    if key not in _capture_streams:
        _capture_streams[key] = torch.cuda.Stream(key[0], priority=priority)
    return _capture_streams[key]


def graph_time_ms(call: Callable[[], object], reps: int = 10, replays: int = 5) -> float:
    """Milliseconds per call of ``call`` repeated ``reps`` times in one CUDA graph (median of
    ``replays`` replays): a kernel's time without the host's launch overhead. Each call's output is let go once the
    next one has returned, so the graph's pool holds at most two (keeping all ``reps`` would hold 0.4 GB for one of
    SD-v1.5's 64x64 feed-forward layers)."""

    def repeated():
        for _ in range(reps):
            out = call()
        return out

    graphed = GraphedCall(repeated, warmup=1)
    return statistics.median(cuda_time_ms(graphed, replays, 1)) / reps


class GraphedCall:
    """``fn(*inputs)`` as a CUDA graph. Inputs are copied into the capture's static tensors;
    the returned tensor is the graph's static output, overwritten by the next call.

    ``priority``: the CUDA priority of the stream the graph is captured on (lower is higher; PyTorch instantiates
    graphs with each kernel keeping the priority it was captured at). A step captured above the priority of a side
    stream it forks (a decode ahead at 0) has its own blocks scheduled first wherever the two contend for the GPU."""

    def __init__(self, fn: Callable[..., torch.Tensor], warmup: int = 2, priority: int = 0):
        self.fn, self.warmup, self.priority = fn, warmup, priority
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.pool = None  # one memory pool shared by every shape's graph

    def _capture(self, inputs: tuple[torch.Tensor, ...]):
        static = [t.clone() for t in inputs]
        side = _capture_stream(self.priority)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # cuDNN/cuBLAS pick and cache their kernels outside the capture
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            out = self.fn(*static)
        self.pool = graph.pool()
        return graph, static, out

    def release(self) -> None:
        """Drop every captured graph and their memory pool; the next call captures again."""
        self.graphs.clear()
        self.pool = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        graph, static, out = self.graphs[key]
        for s, t in zip(static, inputs, strict=True):
            s.copy_(t)
        graph.replay()
        return out
