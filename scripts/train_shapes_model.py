"""Train the shipped text-to-image model from scratch on the `shapes` data set.

One run on one GPU, under ten minutes: render the training set, train the autoencoder,
encode every image, train text encoder and UNet together (10% empty captions, so
classifier-free guidance works), then evaluate with `bf eval`'s code (PNDM, 50 steps)
and write the weights. The model directory is then assembled with
`scripts/assemble_shapes_model.py`.

    python scripts/train_shapes_model.py --out OUT              # the recorded run (GPU)
    python scripts/train_shapes_model.py --out /tmp/q --quick   # seconds, on a CPU: a smoke test

Outputs in OUT: unet.0/unet.1/text_encoder/vae .safetensors (fp32, EMA weights),
configs.json, train_log.json, samples.png.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from bf.evaluate.grid import save_grid
from bf.evaluate.run import EvalConfig, evaluate
from bf.models.architectures import SD15_SCHEDULER, SHAPES_TEXT_ENCODER, SHAPES_UNET, SHAPES_VAE
from bf.models.pipeline import LoadedModel, assemble_pipeline, make_scheduler
from bf.models.tokenizer_files import write_tokenizer_dir
from bf.shapes.render import training_example

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def _render_chunk(args):
    seed, start, stop, p_two = args
    imgs, caps = [], []
    for i in range(start, stop):
        img, cap, _ = training_example(seed, i, p_two)
        imgs.append(img)
        caps.append(cap)
    return np.stack(imgs), caps


def render_dataset(n: int, seed: int, workers: int, p_two: float):
    chunks = [(seed, s, min(s + 500, n), p_two) for s in range(0, n, 500)]
    with mp.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_render_chunk, chunks)
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


class LossWindow:
    """Mean loss over windows of ``every`` steps, summed on the device so no step waits for the GPU."""

    def __init__(self, every: int, device):
        self.every, self.sum, self.n, self.means = every, torch.zeros((), device=device), 0, []

    def add(self, loss, last: bool) -> bool:
        self.sum += loss.detach()
        self.n += 1
        if self.n == self.every or last:
            self.means.append(float(self.sum) / self.n)
            self.sum.zero_()
            self.n = 0
            return True
        return False


def train_vae(images_u8, steps, batch, lr, minutes, device):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**SHAPES_VAE).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    n = len(images_u8)
    data = torch.from_numpy(images_u8).to(device)
    losses, step = LossWindow(500, device), 0
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (batch,), device=device)
        x = data[idx].permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        rec = rec.float()
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if losses.add(loss, step == steps):
            log(f"vae step {step} loss {losses.means[-1]:.5f}")
        if time.time() - T0 > minutes * 60:
            break
    vae.eval()
    with torch.no_grad():
        x = data[: min(256, n)].permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        psnr = 10 * math.log10(4 / float(F.mse_loss(rec, x)))
    return vae, {"steps": step, "loss_per_500_steps": losses.means, "recon_psnr_db": psnr}


@torch.no_grad()
def encode_all(vae, images_u8, device, batch=512):
    out = []
    for i in range(0, len(images_u8), batch):
        x = torch.from_numpy(images_u8[i : i + batch]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(vae.encode(x).latent_dist.mode())
    lat = torch.cat(out)
    return lat, float(lat.std())


def train_diffusion(latents, ids, empty_ids, steps, batch, lr, warmup, ema_decay, minutes, device, init=None, p_uncond=0.1):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**SHAPES_UNET)
    te = CLIPTextModel(CLIPTextConfig(**SHAPES_TEXT_ENCODER))
    if init is not None:
        unet.load_state_dict(init["unet"])
        te.load_state_dict(init["text_encoder"])
    unet, te = unet.to(device).train(), te.to(device).train()
    params = list(unet.parameters()) + list(te.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = DDPMScheduler(
        **{k: v for k, v in SD15_SCHEDULER.items() if not k.startswith("_") and k not in ("skip_prk_steps", "set_alpha_to_one")}
    )
    acp = sched.alphas_cumprod.to(device)
    n = len(latents)
    t_start = time.time()
    losses, step = LossWindow(1000, device), 0
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / warmup)
        idx = torch.randint(0, n, (batch,), device=device)
        z0 = latents[idx].float()
        tok = ids[idx]
        drop = torch.rand(batch, device=device) < p_uncond
        tok = torch.where(drop[:, None], empty_ids[None, :], tok)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=device)
        noise = torch.randn_like(z0)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            enc = te(tok).last_hidden_state
            pred = unet(zt, t, enc).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - ema_decay)
        if losses.add(loss, step == steps):
            log(f"diffusion step {step} loss {losses.means[-1]:.4f}, {step / (time.time() - t_start):.1f} it/s")
        if time.time() - T0 > minutes * 60:
            break
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    return unet.eval(), te.eval(), {"steps": step, "loss_per_1000_steps": losses.means, "seconds": round(time.time() - t_start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=80_000)
    ap.add_argument("--p-two", type=float, default=0.5, help="share of two-object scenes in the training set")
    ap.add_argument("--vae-steps", type=int, default=4000)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--vae-lr", type=float, default=5e-4)
    ap.add_argument("--vae-minutes", type=float, default=1.3, help="stop the autoencoder at this wall time")
    ap.add_argument("--steps", type=int, default=30_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--minutes", type=float, default=8.6, help="stop the diffusion training at this wall time")
    ap.add_argument("--eval-seeds", type=int, default=2)
    ap.add_argument("--init-from", type=Path, help="continue from an earlier run's outputs (its VAE is kept)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke test on a CPU")
    args = ap.parse_args()
    if args.quick:
        args.images, args.vae_steps, args.steps, args.warmup, args.eval_seeds = 64, 3, 3, 1, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    log(f"device {gpu}, torch {torch.__version__}")

    images, captions = render_dataset(args.images, args.seed, os.cpu_count() or 1, args.p_two)
    log(f"rendered {len(images)} images, {len(set(captions))} distinct captions")

    init = None
    if args.init_from is not None:  # continue an earlier run: its autoencoder, EMA weights
        from diffusers import AutoencoderKL
        from safetensors.torch import load_file

        d = args.init_from
        prev = json.loads((d / "train_log.json").read_text())
        init = {
            "unet": {**load_file(str(d / "unet.0.safetensors")), **load_file(str(d / "unet.1.safetensors"))},
            "text_encoder": load_file(str(d / "text_encoder.safetensors")),
        }
        vae = AutoencoderKL(**{**SHAPES_VAE, "scaling_factor": prev["scaling_factor"]})
        vae.load_state_dict(load_file(str(d / "vae.safetensors")))
        vae = vae.to(device).eval()
        vae_log = {"from": str(d), "previous": prev.get("vae")}
        scaling = prev["scaling_factor"]
        latents, _ = encode_all(vae, images, device)
    else:
        vae, vae_log = train_vae(images, args.vae_steps, args.vae_batch, args.vae_lr, args.vae_minutes, device)
        latents, std = encode_all(vae, images, device)
        scaling = 1.0 / std
        vae.register_to_config(scaling_factor=scaling)
    log(f"vae: {vae_log}")
    latents = (latents * scaling).to(torch.float16)
    log(f"latents {tuple(latents.shape)}, scaling factor {scaling:.4f}")

    from transformers import CLIPTokenizer

    tok_dir = Path(tempfile.mkdtemp()) / "tokenizer"
    write_tokenizer_dir(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    unique = sorted(set(captions))
    table = tokenizer(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    row = {c: i for i, c in enumerate(unique)}
    ids = table[[row[c] for c in captions]].to(device)
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0].to(device)

    unet, te, diff_log = train_diffusion(
        latents, ids, empty, args.steps, args.batch, args.lr, args.warmup, args.ema, args.minutes, device, init
    )
    log(f"diffusion: {diff_log}")

    # Evaluate with bf eval's own code, PNDM 50 steps, CFG 7.5.
    pipe = assemble_pipeline(vae, te, tokenizer, unet, make_scheduler("pndm", SD15_SCHEDULER))
    model = LoadedModel(pipe=pipe, label="shapes-sd", source=args.out)
    ecfg = EvalConfig(cfgs=(7.5,), seeds=args.eval_seeds, steps=3 if args.quick else 50, batch_size=64, limit=2 if args.quick else None)
    results, generated = evaluate([model], None, ecfg)
    for r in results:
        log(f"eval cfg {r['cfg']} {r['split']:8s} overall {r['accuracy'].get('overall', float('nan')):.3f} {r['accuracy']}")
    rows, cells = [], []
    for (_, _, split), g in generated.items():
        for i in range(0, len(g.images), max(1, len(g.images) // 6))[:6]:
            rows.append(split)
            cells.append([g.images[i]])
    save_grid(args.out / "samples.png", rows, ["cfg 7.5"], cells)

    from safetensors.torch import save_file

    sd = {k: v.float().contiguous().cpu() for k, v in unet.state_dict().items()}
    keys = list(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, str(args.out / "unet.0.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(args.out / "unet.1.safetensors"))
    save_file({k: v.float().contiguous().cpu() for k, v in te.state_dict().items()}, str(args.out / "text_encoder.safetensors"))
    save_file({k: v.float().contiguous().cpu() for k, v in vae.state_dict().items()}, str(args.out / "vae.safetensors"))
    configs = {"unet": dict(unet.config), "text_encoder": te.config.to_dict(), "vae": dict(vae.config)}
    (args.out / "configs.json").write_text(json.dumps(configs, indent=1, default=str))
    train_log = {
        "command": "python " + " ".join(sys.argv),
        "device": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "wall_seconds": round(time.time() - T0, 1),
        "args": {k: str(v) for k, v in vars(args).items()},
        "vae": vae_log,
        "scaling_factor": scaling,
        "diffusion": diff_log,
        "eval": results,
    }
    (args.out / "train_log.json").write_text(json.dumps(train_log, indent=1))
    log(f"done in {time.time() - T0:.0f}s")


if __name__ == "__main__":
    main()
