"""A training step replayed from a CUDA graph (``bf train --cuda-graph``).

Eager, a QAT step of the full-size SD-v1.5 UNet is bound by the host: hundreds of
fake-quantized layers each cost Python and launch work forward and backward, and the GPU
waits (results/qat_sd15_throughput.json: 364 ms eager, 184 ms replayed). Here the whole step
(loss, backward, gradient clipping, AdamW) is captured once per loss function and replayed;
each batch is copied into the graph's static input tensors.

Capturing needs a few warm-up steps, which would train the model: the parameters and the
optimizer state are saved before them and put back (in place: the graph holds their addresses).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_STEPS = 3  # cuDNN plans, allocator pools and AdamW state exist before the capture


class GraphedStep:
    """``step(*inputs) -> loss terms`` (device tensors), replaying one captured training step."""

    def __init__(self, loss_fn: Callable[..., tuple[torch.Tensor, ...]], opt: torch.optim.Optimizer, update: Callable, example: tuple):
        for group in opt.param_groups:
            group["capturable"] = True  # AdamW keeps its step count on the GPU
        self.inputs = tuple(x.detach().clone() for x in example)
        params = [p for group in opt.param_groups for p in group["params"]]
        saved_params = [p.detach().clone() for p in params]
        saved_state = {p: {k: v.detach().clone() for k, v in opt.state[p].items()} for p in params if p in opt.state}

        def step():
            terms = loss_fn(*self.inputs)
            update(terms[0], opt)
            return terms

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step()
        with torch.no_grad():  # undo the warm-up steps
            for p, v in zip(params, saved_params, strict=True):
                p.copy_(v)
            for p in params:
                for k, v in opt.state[p].items():
                    v.copy_(saved_state[p][k]) if p in saved_state else v.zero_()

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for dst, src in zip(self.inputs, inputs, strict=True):
            dst.copy_(src)
        self.graph.replay()
        return self.outputs
