"""A concept the shipped model cannot draw, taught by a LoRA trained on the FP model and applied, unchanged, to the
1.99-bit model: does LoRA work on a 1.99-bit UNet?

The concept is a new shape, a diamond: the shipped model was trained on circles, squares and triangles, the renderer
draws diamonds, and the detector tells them from triangles when asked to (``diamonds=True``). "diamond" is one token of
the CLIP vocabulary the shipped tokenizer has, which the text encoder never saw in training. Not a new color: the
shipped VAE decodes every color it was not trained on as one it was (pink comes back purple), so no UNet LoRA can
draw one; shapes come through it (``--vae-check`` measures both).

1. Train a LoRA (peft, rank --rank, on the transformer blocks' projections: attention, proj_in/out, feed-forward) on
   the FP model: the noise-prediction loss on rendered scenes, two thirds with a diamond (single objects, and two
   objects one of which is a diamond) and a third the shipped model's own training scenes, so that what it could draw is
   kept; empty prompt 10% of the time
   (classifier-free guidance). Saved in diffusers' format (``save_lora_weights``).
2. Apply that file with ``pipe.load_lora_weights`` to the FP model and to the 1.99-bit model loaded through the
   bitsfusion backend (``bf to-diffusers``; its low-bit layers stay packed codes, the LoRA runs beside them).
3. Score the new concept, 30 single diamonds (every color and position, both sizes) and 30 two-object scenes with a
   diamond, for the base models and both with the LoRA; and the four shapes-test splits with the LoRA loaded and
   without. Accuracy by bf's detector (telling diamonds for the new splits; as always for the old ones), with 95%
   intervals and paired differences (bf.evaluate.intervals).

    python tools/lora_new_concept.py --out results/lora_new_concept.json [--device cuda] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NEW_SHAPE = "diamond"
PINK = (236, 112, 180)  # a color the shipped model never saw (the VAE check's first candidate)


def new_pair(rng: np.random.Generator, sized: bool):
    """A two-object scene: a diamond in a training color and a training pair, either side of a relation; sizes drawn
    (``sized``: as training scenes have them) or "any" (what a two-object caption names)."""
    from bf.shapes.scenes import COLORS, RELATIONS, SIZES, TRAIN_PAIRS, Obj, Scene

    other = TRAIN_PAIRS[int(rng.integers(len(TRAIN_PAIRS)))]
    new = (NEW_SHAPE, COLORS[int(rng.integers(len(COLORS)))])
    pair = [new, other] if rng.random() < 0.5 else [other, new]
    rel = tuple(RELATIONS)[int(rng.integers(len(RELATIONS)))]
    size = (lambda: SIZES[int(rng.integers(len(SIZES)))]) if sized else (lambda: "any")
    return Scene(tuple(Obj(*p, size(), q) for p, q in zip(pair, RELATIONS[rel], strict=True)), relation=rel)


def new_scenes(split: str) -> list:
    """The new concept's test scenes: ``diamond`` (30 single diamonds: every color and position, sizes alternating)
    or ``diamond-two`` (30 two-object scenes, a diamond and a training pair, in a relation; fixed seed)."""
    from bf.shapes.scenes import COLORS, POSITIONS, SIZES, Obj, Scene, caption

    if split == NEW_SHAPE:
        cells = [(c, p) for c in COLORS for p in POSITIONS]
        return [Scene((Obj(NEW_SHAPE, c, SIZES[i % len(SIZES)], p),)) for i, (c, p) in enumerate(cells)]
    rng = np.random.default_rng(20261130)
    scenes, seen = [], set()
    while len(scenes) < 30:
        sc = new_pair(rng, sized=False)
        if caption(sc) not in seen:
            seen.add(caption(sc))
            scenes.append(sc)
    return scenes


def training_set(n: int, resolution: int, seed: int = 0):
    """``n`` rendered images and captions: two thirds with a diamond, a third the shipped model's training scenes."""
    from bf.shapes.render import render
    from bf.shapes.scenes import COLORS, POSITIONS, SIZES, Obj, Scene, caption, sample_scene

    images, captions = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        if i % 3 == 2:
            scene = sample_scene(rng)
        elif rng.random() < 0.6:
            obj = Obj(NEW_SHAPE, COLORS[int(rng.integers(len(COLORS)))], SIZES[int(rng.integers(2))], POSITIONS[int(rng.integers(5))])
            scene = Scene((obj,))
        else:
            scene = new_pair(rng, sized=True)
        images.append(render(scene, rng, resolution=resolution))
        captions.append(caption(scene, rng))
    return np.stack(images), captions


def train_lora(pipe, args, log) -> dict:
    """Train the LoRA on ``pipe``'s UNet (left without it); its state dict in peft's naming, and the training record."""
    import torch
    from diffusers import DDPMScheduler
    from peft import LoraConfig, get_peft_model_state_dict

    from bf.trainer.data import encode_images

    dev = args.device
    unet, vae, text, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    t0 = time.perf_counter()
    images, captions = training_set(args.images, vae.config.sample_size)
    latents = encode_images(vae, images)
    log(f"rendered and encoded {len(images)} training images in {time.perf_counter() - t0:.0f} s")
    with torch.no_grad():
        prompts = [*sorted(set(captions)), ""]
        index = {p: i for i, p in enumerate(prompts)}
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        embeddings = torch.cat([text(ids[i : i + 256].to(dev))[0] for i in range(0, len(ids), 256)])
    caption_index = torch.tensor([index[c] for c in captions])
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    targets = list(args.targets.split(","))
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets, init_lora_weights="gaussian"), "concept")
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    log_every, losses, t0 = max(args.steps // 20, 1), [], time.perf_counter()
    unet.train()
    for step in range(1, args.steps + 1):
        pick = torch.randint(0, len(latents), (args.batch,), generator=g)
        x0 = latents[pick].to(dev)
        cond = caption_index[pick].clone()
        cond[torch.rand(args.batch, generator=g) < 0.1] = index[""]
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch,), generator=g).to(dev)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, embeddings[cond.to(dev)]).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # (3e-3 without it diverged after 1000 steps)
        opt.step()
        losses.append(float(loss.detach()))
        if step % log_every == 0 or step == args.steps:
            log(f"LoRA step {step}/{args.steps}: loss {np.mean(losses[-log_every:]):.5f}, {time.perf_counter() - t0:.0f} s")
    unet.eval()
    state = get_peft_model_state_dict(unet, adapter_name="concept")
    unet.delete_adapters("concept")
    for p in unet.parameters():
        p.requires_grad_(False)
    record = {"rank": args.rank, "alpha": args.rank, "targets": targets, "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "images": args.images, "p_uncond": 0.1, "grad_clip": 1.0, "seconds": time.perf_counter() - t0,
              "final_loss": float(np.mean(losses[-log_every:])), "adapters": len(state) // 2}  # fmt: skip
    return state, record


VAE_COLORS = {"pink": PINK, "magenta": (220, 40, 200), "cyan": (30, 190, 200), "teal": (0, 128, 128), "navy": (20, 30, 120),
              "brown": (140, 80, 30), "lime": (150, 220, 40), "gray": (128, 128, 128), "black": (20, 20, 20)}  # fmt: skip


def vae_round_trip(pipe) -> dict:
    """What the model's VAE keeps of a candidate concept: each color as a large centered square (the mean RGB of its
    middle after encode and decode), and new shapes in a training color (the shape's pixels that come back in that
    color, as intersection over union with the drawn shape; the training square for reference)."""
    import torch

    from bf.shapes.render import PALETTE, render
    from bf.shapes.scenes import Obj, Scene

    def round_trip(img: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
        return ((y[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).numpy()

    size = pipe.vae.config.sample_size
    colors = {}
    for name, rgb in {**PALETTE, **VAE_COLORS}.items():
        img = render(
            Scene((Obj("square", name, "large", "center"),)), np.random.default_rng(0), resolution=size, palette={**PALETTE, name: rgb}
        )
        mid = round_trip(img)[size * 27 // 64 : size * 37 // 64, size * 27 // 64 : size * 37 // 64].reshape(-1, 3).mean(0)
        nearest = min(PALETTE, key=lambda c: float(np.abs(np.array(PALETTE[c]) - mid).sum()))
        colors[name] = {"rgb": list(rgb), "after_vae": [round(float(v)) for v in mid], "trained": name in PALETTE,
                        "max_error": float(np.abs(mid - np.array(rgb)).max()), "nearest_training_color": nearest}  # fmt: skip
    yy, xx = np.mgrid[0:size, 0:size] * (128 / size)
    masks = {"square": (np.abs(yy - 64) <= 25) & (np.abs(xx - 64) <= 25), "diamond": (np.abs(yy - 64) + np.abs(xx - 64)) <= 30,
             "cross": ((np.abs(yy - 64) <= 8) & (np.abs(xx - 64) <= 30)) | ((np.abs(xx - 64) <= 8) & (np.abs(yy - 64) <= 30)),
             "ring": ((yy - 64) ** 2 + (xx - 64) ** 2 <= 900) & ((yy - 64) ** 2 + (xx - 64) ** 2 >= 324)}  # fmt: skip
    shapes = {}
    for name, mask in masks.items():
        img = np.full((size, size, 3), 255, np.uint8)
        img[mask] = PALETTE["red"]
        kept = np.abs(round_trip(img) - np.array(PALETTE["red"])).sum(-1) < 120
        shapes[name] = {"iou": float((kept & mask).sum() / (kept | mask).sum()), "trained": name == "square"}
    return {"colors": colors, "shapes": shapes, "shape_color": "red"}


def probe(pipe, lora: Path, args, log) -> dict:
    """The FP model with the LoRA on the first 12 single-diamond scenes, one seed: the detector's accuracy and how
    many of the objects it finds are diamonds (a look before the full evaluation)."""
    from bf.evaluate.generate import generate
    from bf.evaluate.metrics import accuracy_of, verdicts
    from bf.shapes.detect import detect
    from bf.shapes.scenes import caption

    pipe.load_lora_weights(lora, adapter_name="probe")
    scenes = new_scenes(NEW_SHAPE)[:12]
    images, _ = generate(pipe, [(caption(sc), 1024) for sc in scenes], args.cfg, args.sample_steps, args.eval_batch)
    pipe.delete_adapters("probe")
    acc = accuracy_of(verdicts(images, scenes, diamonds=True))
    found = [d.shape for img in images for d in detect(img, diamonds=True)]
    share = found.count(NEW_SHAPE) / max(len(found), 1)
    log(f"probe (FP + LoRA, 12 diamond scenes): accuracy {acc['overall']:.3f}; {len(found)} objects found, "
        f"{share:.0%} of them diamonds ({', '.join(sorted(set(found)))})")  # fmt: skip
    return {"accuracy": acc["overall"], "objects": len(found), "diamond_share": share}


def evaluate_models(models: dict, args, log) -> list[dict]:
    """Every model on the new concept's splits (the detector telling diamonds) and on shapes-test's four (as always)."""
    from bf.evaluate.evaluation import prompt_sets, whole_split
    from bf.evaluate.generate import generate
    from bf.evaluate.intervals import mean_ci
    from bf.evaluate.metrics import accuracy_of, verdicts
    from bf.shapes.scenes import caption

    sets = [(s, new_scenes(s), True) for s in (NEW_SHAPE, f"{NEW_SHAPE}-two")]
    sets += [(ps.split, ps.scenes, False) for ps in prompt_sets("shapes-test")]
    seeds = [1024 + k for k in range(args.seeds)]
    results = []
    for label, pipe in models.items():
        for split, scenes, diamonds in sets:
            t0 = time.perf_counter()
            jobs = [(caption(sc), s) for sc in scenes for s in seeds]
            images, _ = generate(pipe, jobs, args.cfg, args.sample_steps, args.eval_batch)
            judged = verdicts(images, [sc for sc in scenes for _ in seeds], diamonds=diamonds)
            overall = np.array([float(v["overall"]) for v in judged]).reshape(len(scenes), len(seeds))
            whole = split == NEW_SHAPE or whole_split(split, scenes)
            results.append({"model": label, "split": split, "images": len(images), "seeds": len(seeds),
                            "accuracy": accuracy_of(judged), "accuracy_ci95": mean_ci(overall, whole), "whole_split": whole,
                            "overall_per_image": overall.ravel().tolist()})  # fmt: skip
            acc, (lo, hi) = results[-1]["accuracy"]["overall"], results[-1]["accuracy_ci95"]
            log(f"{label:>18s} {split:>11s}: {acc:.3f} [{lo:.3f}, {hi:.3f}] ({time.perf_counter() - t0:.0f} s)")
            if split == NEW_SHAPE and args.grid:
                results[-1]["_images"] = images[:: len(seeds)][:12]
    return results


def differences(results: list[dict]) -> list[dict]:
    """With the LoRA minus without, and 1.99-bit minus FP (both with the LoRA), per split, paired on the same images."""
    from bf.evaluate.intervals import paired_difference

    by = {(r["model"], r["split"]): r for r in results}
    pairs = [("FP", "FP + LoRA"), ("1.99-bit", "1.99-bit + LoRA"), ("FP + LoRA", "1.99-bit + LoRA")]
    out = []
    for split in dict.fromkeys(r["split"] for r in results):
        for a, b in pairs:
            ra, rb = by[(a, split)], by[(b, split)]
            va, vb = (np.array(r["overall_per_image"]).reshape(-1, r["seeds"]) for r in (ra, rb))
            out.append({"split": split, "a": a, "b": b, **paired_difference(va, vb, ra["whole_split"])})
    return out


def save_grid(results: list[dict], path: Path) -> None:
    from bf.evaluate.image_grid import save_grid as grid
    from bf.shapes.scenes import caption

    rows = [r for r in results if "_images" in r]
    scenes = new_scenes(NEW_SHAPE)[:12]
    cells = [[r["_images"][i] for r in rows] for i in range(len(scenes))]
    grid(path, [caption(sc) for sc in scenes], [r["model"] for r in rows], cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/lora_new_concept.json"))
    ap.add_argument("--lora-out", type=Path, help="Keep the trained LoRA file here (diffusers' format).")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2",
                    help="The UNet modules the LoRA adapts (peft target_modules).")  # fmt: skip
    ap.add_argument("--steps", type=int, default=1200, help="LoRA training steps.")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--images", type=int, default=4000, help="Rendered training images (half with the new color).")
    ap.add_argument("--seeds", type=int, default=2, help="Eval images per prompt.")
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--sample-steps", type=int, default=50, help="PNDM steps of each eval image.")
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--grid", type=Path, help="Write the new concept's images, one column per model, here.")
    ap.add_argument("--train-only", action="store_true", help="Train, probe (12 diamond scenes) and stop: no evaluation.")
    ap.add_argument("--vae-check", type=Path, metavar="JSON",
                    help="Only measure what the shipped VAE keeps of candidate colors and shapes (encode, decode), into JSON.")  # fmt: skip
    args = ap.parse_args()

    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    import bf.diffusers  # noqa: F401  (registers the bitsfusion backend)
    from bf.diffusers.directory import write_diffusers_model
    from bf.format import Checkpoint
    from bf.models.diffusers_pipeline import load_model
    from bf.models.shipped import model_source, shipped_bfq

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    torch.manual_seed(0)
    t_start = time.perf_counter()
    fp = load_model(model_source("shipped"), device=args.device).pipe
    if args.vae_check:
        found = vae_round_trip(fp)
        args.vae_check.write_text(
            json.dumps({"command": " ".join(["python", "tools/lora_new_concept.py", *sys.argv[1:]]), **found}, indent=1) + "\n"
        )
        for name, c in found["colors"].items():
            log(f"{name:>8s} {tuple(c['rgb'])} -> {tuple(c['after_vae'])} (nearest training color: {c['nearest_training_color']})")
        for name, sh in found["shapes"].items():
            log(f"{name:>8s}: IoU {sh['iou']:.3f} after the VAE")
        return
    fp.set_progress_bar_config(disable=True)
    state, record = train_lora(fp, args, log)
    with tempfile.TemporaryDirectory() as tmp:
        lora = Path(tmp) / f"{NEW_SHAPE}.safetensors"
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state, weight_name=lora.name)
        if args.lora_out:
            args.lora_out.write_bytes(lora.read_bytes())
        record["probe"] = probe(fp, lora, args, log)
        if args.train_only:
            return
        # what bf to-diffusers writes; on the CPU each weight decoded once and kept (the format's rule is slow per call)
        ckpt = Checkpoint.load(shipped_bfq())
        write_diffusers_model(ckpt, model_source("shipped"), Path(tmp) / "q", keep_decoded=args.device == "cpu")
        models = {}
        quantized = Path(tmp) / "q"
        makers = {"FP": lambda: load_model(model_source("shipped"), device=args.device).pipe,
                  "1.99-bit": lambda: DiffusionPipeline.from_pretrained(quantized, dtype=torch.float32).to(args.device)}  # fmt: skip
        for label, make in makers.items():
            base, with_lora = make(), make()
            with_lora.load_lora_weights(lora, adapter_name="concept")
            for p in (base, with_lora):
                p.set_progress_bar_config(disable=True)
            models[label], models[f"{label} + LoRA"] = base, with_lora
        results = evaluate_models(models, args, log)
    if args.grid:
        save_grid(results, args.grid)
    for r in results:
        r.pop("_images", None)
    payload = {
        "command": " ".join(["python", "tools/lora_new_concept.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"{args.device} ({torch.get_num_threads()} threads)",
        "concept": {
            "shape": NEW_SHAPE,
            "splits": {
                NEW_SHAPE: "30 single diamonds (every color and position, sizes alternating)",
                f"{NEW_SHAPE}-two": "30 two-object scenes, one object a diamond, the other a training pair",
            },
        },
        "lora": record,
        "low_bit_layers": "packed codes, decoded on every call"
        if args.device != "cpu"
        else "packed codes, each decoded once at its first call (keep_decoded)",
        "eval": {
            "cfg": args.cfg,
            "seeds": args.seeds,
            "sampler": f"PNDM, {args.sample_steps} steps",
            "detector": "bf.shapes.detect, telling diamonds (diamonds=True) for the new splits, as always for shapes-test",
        },
        "results": results,
        "differences": differences(results),
        "seconds": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    for d in payload["differences"]:
        lo, hi = d["ci95"]
        log(f"{d['split']:>11s} {d['b']:>16s} - {d['a']:<16s}: {d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    log(f"wrote {args.out} in {payload['seconds']:.0f} s")


if __name__ == "__main__":
    main()
