"""Turn the output of train_shapes_model.py into the shipped diffusers directory.

    python tools/assemble_shapes_model.py TRAIN_OUT [--out bf/assets/shapes-sd]

Weights are stored in fp16 (the whole directory must stay under 25 MB); tokenizer,
scheduler and model_index.json are written exactly as `bf random-model` writes them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.numpy import load_file, save_file

from bf.models.architectures import SD15_SCHEDULER
from bf.models.random_model import MODEL_INDEX
from bf.models.tokenizer_files import write_tokenizer_dir

REPO = Path(__file__).resolve().parents[1]
BUDGET = 25_000_000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("train_out", type=Path)
    ap.add_argument("--out", type=Path, default=REPO / "bf" / "assets" / "shapes-sd")
    args = ap.parse_args()
    src, out = args.train_out, args.out
    configs = json.loads((src / "configs.json").read_text())
    train_log = json.loads((src / "train_log.json").read_text())
    import diffusers

    version = {"_diffusers_version": diffusers.__version__}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet = {**load_file(str(src / "unet.0.safetensors")), **load_file(str(src / "unet.1.safetensors"))}
    parts = {
        "unet": ("diffusion_pytorch_model.safetensors", unet, {"_class_name": "UNet2DConditionModel", **version, **configs["unet"]}),
        "vae": (
            "diffusion_pytorch_model.safetensors",
            load_file(str(src / "vae.safetensors")),
            {"_class_name": "AutoencoderKL", **version, **configs["vae"]},
        ),
        "text_encoder": ("model.safetensors", load_file(str(src / "text_encoder.safetensors")), configs["text_encoder"]),
    }
    for comp, (fname, tensors, config) in parts.items():
        (tmp / comp).mkdir(parents=True)
        save_file({k: v.astype("float16") for k, v in tensors.items()}, str(tmp / comp / fname), metadata={"format": "pt"})
        config = {k: v for k, v in config.items() if not k.startswith("_use_default")}
        (tmp / comp / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer_dir(tmp / "tokenizer")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SD15_SCHEDULER, **version}, indent=2))
    (tmp / "model_index.json").write_text(json.dumps({**MODEL_INDEX, **version}, indent=2))
    card = {k: train_log[k] for k in ("command", "device", "torch", "wall_seconds", "scaling_factor")}
    card["eval_at_training_end"] = train_log["eval"]
    (tmp / "training.json").write_text(json.dumps(card, indent=1))
    total = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    if total > BUDGET:
        shutil.rmtree(tmp)
        raise SystemExit(f"model directory is {total / 1e6:.1f} MB, over the {BUDGET / 1e6:.0f} MB budget")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
