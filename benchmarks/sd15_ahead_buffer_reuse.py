"""SD-v1.5's compiled 1.99-bit step decoding ahead into 2 slots, compiled twice in one run: with inductor's buffer
reuse (its default) and without (bf.runtime.compiled_weights.AHEAD_COMPILE_OPTIONS, what the runtime uses). Each
step captured in the backend's CUDA graph at STEP_PRIORITY, as the runtime does; median of 30 steps and peak memory
(the codes counted in), 512x512, batch 2, fp16, channels-last, random weights at the 1.99-bit mix, cuDNN's
autotuner off (PyTorch's default; benchmarks/sd15_compiled_step.py turns it on).

    python benchmarks/sd15_ahead_buffer_reuse.py --lib libbf_decode.so --out results/sd15_ahead_buffer_reuse.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))
from sd15_compiled_step import timed, warm_up  # noqa: E402
from sd15_unet_step import clean, random_packed, sd15_mixed_unet  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", type=Path, default=None, help="the decode library (default: found as bf.native says)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "sd15_ahead_buffer_reuse.json")
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    from bf.cli.output import write_json
    from bf.decode_kernels import load
    from bf.runtime.backend_torch import TorchUNet, _smallest_inputs
    from bf.runtime.compiled_weights import AHEAD_COMPILE_OPTIONS, STEP_PRIORITY, compile_weights, decode_ahead, packed_bytes
    from bf.runtime.torch_graph import GraphedCall

    lib = load(args.lib)
    master, shapes, bits = sd15_mixed_unet()
    packed = random_packed(shapes, bits, True, seed=1)
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = (torch.randn(2, 4, 64, 64, device="cuda", generator=g).half(), torch.zeros(1, dtype=torch.long, device="cuda"),
              torch.randn(2, 77, 768, device="cuda", generator=g).half())  # fmt: skip
    res = {
        "command": " ".join(["python", "benchmarks/sd15_ahead_buffer_reuse.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()},
        "settings": {
            "batch": 2,
            "height": 512,
            "width": 512,
            "dtype": "float16",
            "iters": args.iters,
            "slots": 2,
            "step_stream_priority": STEP_PRIORITY,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        },
        "configs": {},
    }
    for label, options in (("buffer_reuse", None), ("no_buffer_reuse", AHEAD_COMPILE_OPTIONS)):
        base = clean()
        model = TorchUNet(copy.deepcopy(master), torch.arange(980, -1, -20), weights="fp", device="cuda", cuda_graph=False)
        compile_weights(model.unet, packed, torch.float16, decoder=lib)
        small = _smallest_inputs(model.unet, "cuda", torch.float16)
        slots = decode_ahead(model.unet, lambda model=model, small=small: model.eager_step(*small), 2)
        clean()  # the FP16 weights the compiled layers replaced are gone
        step = GraphedCall(torch.compile(model.eager_step, fullgraph=True, options=options), priority=STEP_PRIORITY)
        with torch.inference_mode():
            warmup_s = warm_up(step, inputs)
            row = timed(lambda step=step: step(*inputs), args.iters)
        row |= {"peak_mem_bytes": torch.cuda.max_memory_allocated() - base + packed_bytes(model.unet), "slot_bytes": slots,
                "warmup_s": warmup_s, "inductor_options": options or {}}  # fmt: skip
        res["configs"][label] = row
        print(f"{label}: {row['median_ms']:.3f} ms/step, peak {row['peak_mem_bytes'] / 1e9:.3f} GB", flush=True)
        del model, step
        torch._dynamo.reset()
    write_json(args.out, res)


if __name__ == "__main__":
    main()
