"""Train the shipped text-to-image model from scratch on the `shapes` data set.

One run on one GPU, under ten minutes: render the training set, train the autoencoder,
encode every image, train text encoder and UNet together (10% empty captions, so
classifier-free guidance works), then evaluate with `bf eval`'s code (PNDM, 50 steps)
and write the weights. The model directory is then assembled with
`tools/assemble_shapes_model.py`.

    python tools/train_shapes_model.py --out OUT              # the recorded run (GPU)
    python tools/train_shapes_model.py --out /tmp/q --quick   # seconds, on a CPU: a smoke test

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

from bf.evaluate.evaluation import EvalConfig, evaluate
from bf.evaluate.image_grid import save_grid
from bf.models.architectures import SD15_SCHEDULER, SHAPES_TEXT_ENCODER, SHAPES_UNET, SHAPES_VAE
from bf.models.diffusers_pipeline import LoadedModel, assemble_pipeline, make_scheduler
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


def _chunks(seed: int, start: int, stop: int, p_two: float):
    return [(seed, s, min(s + 500, stop), p_two) for s in range(start, stop, 500)]


def _join(parts):
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
    losses, step, t_start = LossWindow(500, device), 0, time.time()
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
        if time.time() - t_start > minutes * 60:
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


def sample_timesteps(batch: int, n_train: int, mode: str, device) -> torch.Tensor:
    """Uniform, or (``mix``) half uniform and half Beta(3, 1): the high-noise steps, where the
    layout (which object goes where) is decided, get twice their uniform share."""
    t = torch.randint(0, n_train, (batch,), device=device)
    if mode == "mix":
        beta31 = (torch.rand(batch, device=device) ** (1 / 3) * n_train).long().clamp_(max=n_train - 1)
        t = torch.where(torch.rand(batch, device=device) < 0.5, t, beta31)
    return t


def train_diffusion(
    latents,
    ids,
    empty_ids,
    steps,
    batch,
    lr,
    warmup,
    ema_decay,
    minutes,
    device,
    te_config,
    timesteps="uniform",
    init=None,
    p_uncond=0.1,
    decay=0.0,
    cuda_graph=False,
):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**SHAPES_UNET)
    te = CLIPTextModel(CLIPTextConfig(**te_config))
    if init is not None:
        unet.load_state_dict(init["unet"])
        te.load_state_dict(init["text_encoder"])
    unet, te = unet.to(device).train(), te.to(device).train()
    params = list(unet.parameters()) + list(te.parameters())
    ema = [p.detach().clone() for p in params]
    graph = cuda_graph and device.type == "cuda"
    # A captured step reads its learning rate from a device tensor.
    opt = torch.optim.AdamW(
        params, lr=torch.tensor(lr, device=device) if graph else lr, weight_decay=0.01, betas=(0.9, 0.99), capturable=graph
    )
    sched = DDPMScheduler(
        **{k: v for k, v in SD15_SCHEDULER.items() if not k.startswith("_") and k not in ("skip_prk_steps", "set_alpha_to_one")}
    )
    acp = sched.alphas_cumprod.to(device)
    n = len(latents)

    def one_step():
        """Sample a batch, one optimizer step, EMA update; nothing here waits for the GPU, so it can be captured."""
        idx = torch.randint(0, n, (batch,), device=device)
        z0 = latents[idx].float()
        tok = ids[idx]
        drop = torch.rand(batch, device=device) < p_uncond
        tok = torch.where(drop[:, None], empty_ids[None, :], tok)
        t = sample_timesteps(batch, sched.config.num_train_timesteps, timesteps, device)
        noise = torch.randn_like(z0)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=not graph):
            enc = te(tok).last_hidden_state
            pred = unet(zt, t, enc).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - ema_decay)
        return loss.detach()

    def set_lr(step):
        # Warm-up, then constant; with ``decay`` the last share of the wall-time budget decays linearly to 0.
        left = max(0.0, 1 - (time.time() - T0) / (minutes * 60))
        value = lr * min(1.0, step / warmup, left / decay if decay else 1.0)
        for g in opt.param_groups:
            if graph:
                g["lr"].fill_(value)
            else:
                g["lr"] = value

    # CUDA graph: the eager step of this small model is bound by kernel launches (about 5.5 it/s at any
    # batch up to 1024 on an H100); replaying the captured step removes that overhead.
    replay, captured, static_loss = None, "off", None
    t_start = time.time()
    losses, step = LossWindow(1000, device), 0
    for step in range(1, steps + 1):
        set_lr(step)
        if replay is not None:
            replay.replay()
            loss = static_loss
        elif graph and step > 3:
            try:
                g = torch.cuda.CUDAGraph()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # capture needs the warm-up steps run on a side stream
                    one_step()
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(g):
                    static_loss = one_step()
                replay, captured = g, "on"
                g.replay()
                loss = static_loss
                log(f"captured the training step as a CUDA graph at step {step}")
            except Exception as e:  # a capture failure means: go on eagerly
                graph, captured = False, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                log(f"CUDA graph capture {captured}; continuing eagerly")
                torch.cuda.synchronize()
                loss = one_step()
        else:
            loss = one_step()
        if losses.add(loss, step == steps):
            log(f"diffusion step {step} loss {losses.means[-1]:.4f}, {step / (time.time() - t_start):.1f} it/s")
        if time.time() - T0 > minutes * 60:
            break
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    return (
        unet.eval(),
        te.eval(),
        {"steps": step, "loss_per_1000_steps": losses.means, "seconds": round(time.time() - t_start, 1), "cuda_graph": captured},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=120_000, help="training set size")
    ap.add_argument("--p-two", type=float, default=0.6, help="share of two-object scenes in the training set")
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--vae-lr", type=float, default=5e-4)
    ap.add_argument("--vae-minutes", type=float, default=1.5, help="stop the autoencoder after this long at most")
    ap.add_argument("--steps", type=int, default=30_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--timesteps", choices=("uniform", "mix"), default="uniform", help="training timestep distribution")
    ap.add_argument(
        "--cuda-graph", action=argparse.BooleanOptionalAction, default=True, help="capture the training step as a CUDA graph (GPU)"
    )
    ap.add_argument("--te-layers", type=int, default=SHAPES_TEXT_ENCODER["num_hidden_layers"], help="text encoder depth")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--decay", type=float, default=0.3, help="decay the learning rate to 0 over this last share of the time budget")
    ap.add_argument("--minutes", type=float, default=8.9, help="stop the diffusion training at this wall time")
    ap.add_argument("--eval-seeds", type=int, default=2)
    ap.add_argument("--init-from", type=Path, help="continue from an earlier run's outputs (its VAE is kept)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke test on a CPU")
    args = ap.parse_args()
    if args.quick:
        args.images, args.batch, args.vae_steps, args.steps, args.warmup, args.eval_seeds = 64, 8, 3, 3, 1, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    log(f"device {gpu}, torch {torch.__version__}")

    with mp.get_context("fork").Pool(max(1, (os.cpu_count() or 1) - 2)) as pool:
        images, captions = _join(pool.map(_render_chunk, _chunks(args.seed, 0, args.images, args.p_two)))
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
        scaling = 1.0 / std  # from the autoencoder's own images
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

    te_config = {**SHAPES_TEXT_ENCODER, "num_hidden_layers": args.te_layers}
    unet, te, diff_log = train_diffusion(
        latents,
        ids,
        empty,
        args.steps,
        args.batch,
        args.lr,
        args.warmup,
        args.ema,
        args.minutes,
        device,
        te_config,
        args.timesteps,
        init,
        decay=args.decay,
        cuda_graph=args.cuda_graph,
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
