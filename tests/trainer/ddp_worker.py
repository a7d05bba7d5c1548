"""Run by test_train.py under torchrun (2 CPU processes, gloo): a short Stage I of an sd15 or sdxl (argv[2]) tiny
UNet; each rank saves its student and its losses so the test can compare them."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_train import _frozen, _plan

from bf.trainer.train import TrainConfig, train_student

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
frozen = _frozen(arch=sys.argv[2] if len(sys.argv) > 2 else "sd15")
losses = []
cfg = TrainConfig(stage1_steps=16, stage2_steps=0, batch_size=4, lr=2e-3, checkpoint_every=100)
student, _ = train_student(frozen, _plan(frozen, 1), cfg, out / "work", progress=lambda st, step, info: losses.append(info["loss"]))
save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
(out / f"losses{rank}.json").write_text(json.dumps(losses))
dist.destroy_process_group()
