"""Time one training step of the shipped model's text encoder + UNet (GPU), per variant.

Variants: attention heads (head dims not a multiple of 8 miss the fused SDPA kernels),
batch size, channels-last, torch.compile. Prints it/s and samples/s per variant and writes
results/shapes_train_step.json.

    python benchmarks/shapes_train_step.py [--out results/shapes_train_step.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from bf.models.architectures import SHAPES_TEXT_ENCODER, SHAPES_UNET

REPO = Path(__file__).resolve().parents[1]
# (UNet heads: diffusers' attention_head_dim, text encoder heads, batch, torch.compile, channels-last)
VARIANTS = [
    (4, 4, 512, False, False),
    (3, 3, 512, False, False),
    (3, 3, 2048, False, False),
    (3, 3, 512, False, True),
    (3, 3, 512, True, False),
    (3, 3, 2048, True, False),
]


def bench(heads: int, te_heads: int, batch: int, compile_: bool, channels_last: bool, n: int = 15) -> dict:
    dev = torch.device("cuda")
    unet = UNet2DConditionModel(**{**SHAPES_UNET, "attention_head_dim": heads}).to(dev).train()
    te = CLIPTextModel(CLIPTextConfig(**{**SHAPES_TEXT_ENCODER, "num_attention_heads": te_heads})).to(dev).train()
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        z = torch.randn(batch, 4, 16, 16, device=dev)
        ids = torch.randint(0, 49408, (batch, 77), device=dev)
        t = torch.randint(0, 1000, (batch,), device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            enc = te(ids).last_hidden_state
            pred = unet(z, t, enc).sample
        loss = F.mse_loss(pred.float(), z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if compile_:
        unet.forward = torch.compile(unet.forward)
    t0 = time.time()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    warm = time.time() - t0
    t0 = time.time()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    its = n / (time.time() - t0)
    print(
        f"heads {heads} te_heads {te_heads} batch {batch:5d} compile {compile_!s:5} cl {channels_last!s:5} "
        f"{its:6.2f} it/s {its * batch:8.0f} samples/s (warm-up {warm:.0f}s)",
        flush=True,
    )
    return {
        "unet_heads": heads,
        "text_encoder_heads": te_heads,
        "batch": batch,
        "compile": compile_,
        "channels_last": channels_last,
        "steps": n,
        "warmup_seconds": warm,
        "it_per_s": its,
        "samples_per_s": its * batch,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "results" / "shapes_train_step.json")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    result = {
        "command": "python benchmarks/shapes_train_step.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "settings": "bf16 autocast, AdamW lr 1e-4, TF32 on, 16x16 latents, 77 tokens",
        "variants": [bench(*v) for v in VARIANTS],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
