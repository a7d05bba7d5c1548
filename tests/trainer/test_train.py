"""QAT training loop: loss goes down, resume gives the uninterrupted result bit for bit, NaN stops cleanly, data loading."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from bf.errors import BfError  # noqa: E402
from bf.format import Grid, candidate_layers  # noqa: E402
from bf.models.architectures import TINY_UNET  # noqa: E402
from bf.trainer.data import LatentSet, read_image_captions  # noqa: E402
from bf.trainer.qat import LossConfig  # noqa: E402
from bf.trainer.recipe import uniform_recipe  # noqa: E402
from bf.trainer.train import STATE_FILE, Frozen, TrainConfig, train_student  # noqa: E402


def _frozen(n=8, nan=False, arch="sd15"):
    """A tiny teacher, random latents and caption encodings; ``arch="sdxl"``: an SDXL UNet fed packed conditioning."""
    from bf.models.added_condition import pack, unpack_on_forward
    from bf.models.architectures import TINY_SDXL_UNET

    config = TINY_SDXL_UNET if arch == "sdxl" else TINY_UNET
    torch.manual_seed(0)
    teacher = diffusers.UNet2DConditionModel(**config)
    g = torch.Generator().manual_seed(1)
    size = config["sample_size"]
    latents = torch.randn(n, 4, size, size, generator=g)
    if nan:
        latents[:] = float("nan")
    table = {f"c{i}": torch.randn(77, config["cross_attention_dim"], generator=g) for i in range(n)}
    table[""] = torch.zeros(77, config["cross_attention_dim"])
    if arch == "sdxl":
        unpack_on_forward(teacher)
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
        table = {c: pack(h[None], torch.randn(1, 32, generator=g) * (c != ""), time_ids)[0] for c, h in table.items()}

    def encode(caps):
        return torch.stack([table[c] for c in caps])

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return Frozen(teacher, encode, LatentSet(latents, [f"c{i}" for i in range(n)]), torch.cumprod(1 - betas, 0))


def _plan(frozen, bits=2):
    shapes = {k: tuple(v.shape) for k, v in frozen.teacher.state_dict().items()}
    return {m: Grid(bits) for m in candidate_layers(shapes)}


def test_stage1_loss_goes_down(tmp_path):
    frozen = _frozen()
    cfg = TrainConfig(stage1_steps=24, stage2_steps=0, batch_size=4, lr=2e-3, checkpoint_every=100)
    losses = []
    train_student(frozen, _plan(frozen, 1), cfg, tmp_path, progress=lambda st, step, info: losses.append(info["loss"]))
    assert len(losses) == 24
    assert np.mean(losses[-6:]) < 0.7 * np.mean(losses[:6])
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].startswith("stage,step,loss") and len(rows) == 25
    from bf.trainer.event_log import read_records
    from tests.trainer.test_event_log import scalars_of

    (events,) = tmp_path.glob("events.out.tfevents.*")
    logged = [scalars_of(r) for r in read_records(events)[1:]]
    assert [step for step, _ in logged] == list(range(1, 25))
    assert [v["stage1/loss"] for _, v in logged] == pytest.approx(losses, rel=1e-6)  # float32 in the event file


def test_cuda_graph_on_the_cpu_is_refused_before_anything_is_written(tmp_path):
    frozen = _frozen()
    cfg = TrainConfig(stage1_steps=2, stage2_steps=0, batch_size=2, checkpoint_every=100, cuda_graph=True)
    with pytest.raises(BfError, match="--cuda-graph needs one CUDA GPU"):
        train_student(frozen, _plan(frozen), cfg, tmp_path / "work", log_dir=tmp_path / "logs")
    assert not (tmp_path / "work").exists() and not (tmp_path / "logs").exists()


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    cfg = TrainConfig(stage1_steps=2, stage2_steps=0, batch_size=2, lr=1e-3, checkpoint_every=100)
    frozen = _frozen()
    plan = _plan(frozen)
    plain, _ = train_student(frozen, plan, cfg, tmp_path / "a")
    ckpt, _ = train_student(_frozen(), plan, TrainConfig(**{**cfg.__dict__, "grad_checkpoint": True}), tmp_path / "b")
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    a, b = plain.state_dict(), ckpt.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    start = _frozen().teacher.state_dict()
    assert any(not torch.equal(a[k], start.get(k, a[k])) for k in a)  # it did train


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfg = TrainConfig(stage1_steps=3, stage2_steps=2, batch_size=2, lr=1e-3, checkpoint_every=2, loss=LossConfig(timesteps="beta"))
    frozen = _frozen()
    plan = _plan(frozen)
    full, _ = train_student(frozen, plan, cfg, tmp_path / "a")

    def interrupt(stage, step, info):
        if (stage, step) == (2, 2):  # Stage II step 1 logged, not saved: the state is Stage I step 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_student(_frozen(), plan, cfg, tmp_path / "b", progress=interrupt)
    with pytest.raises(BfError, match="pass --resume"):
        train_student(_frozen(), plan, cfg, tmp_path / "b")
    with pytest.raises(BfError, match=r"was made with other settings: lr 0\.001 \(now 0\.002\); use them again"):
        train_student(_frozen(), plan, TrainConfig(**{**cfg.__dict__, "lr": 2e-3}), tmp_path / "b", resume=True)
    with pytest.raises(BfError, match=r"was made with another recipe \(other layers or bit widths\)"):
        train_student(_frozen(), _plan(frozen, 3), cfg, tmp_path / "b", resume=True)
    resumed, _ = train_student(_frozen(), plan, cfg, tmp_path / "b", resume=True)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # log.csv continues: every step once, in order, as in the uninterrupted run, and its clock does not restart
    rows = [r.split(",") for r in (tmp_path / "b" / "log.csv").read_text().splitlines()]
    full_rows = [r.split(",") for r in (tmp_path / "a" / "log.csv").read_text().splitlines()]
    assert (
        [r[:2] for r in rows]
        == [r[:2] for r in full_rows]
        == [["stage", "step"], *[[str(s), str(i)] for s, n in ((1, 3), (2, 2)) for i in range(1, n + 1)]]
    )
    assert [r[2] for r in rows] == [r[2] for r in full_rows]  # the same losses
    seconds = [float(r[-1]) for r in rows[1:]]
    assert seconds == sorted(seconds)
    # and so does the TensorBoard file: one file, every step once (the interrupted step 4 dropped, then trained again)
    from bf.trainer.event_log import read_records, record_step

    (events,) = (tmp_path / "b").glob("events.out.tfevents.*")
    assert [record_step(r) for r in read_records(events)] == [0, 1, 2, 3, 4, 5]


def test_a_bad_learned_scale_stops_at_the_next_checkpoint_with_the_last_good_state(tmp_path, monkeypatch):
    from bf.trainer import train as train_module

    real_step, calls = train_module.optimizer_step, []

    def step_then_break_scales(loss, opt):  # the second step makes every parameter, scales too, infinite
        real_step(loss, opt)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                for group in opt.param_groups:
                    for p in group["params"]:
                        p.fill_(float("inf"))

    monkeypatch.setattr(train_module, "optimizer_step", step_then_break_scales)
    frozen = _frozen()
    cfg = TrainConfig(stage1_steps=4, stage2_steps=0, batch_size=2, checkpoint_every=1)
    with pytest.raises(BfError, match=rf"at Stage 1 step 2, \d+ learned scale\(s\) are not finite; stopped, "
                                      rf"the last good state is {tmp_path / STATE_FILE} \(try a lower --lr"):  # fmt: skip
        train_student(frozen, _plan(frozen), cfg, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / STATE_FILE), "np") as f:
        assert json.loads(f.metadata()["bf"])["meta"]["step"] == 1  # the state before the bad step, not after it


def test_nan_loss_stops_with_the_last_good_state_named(tmp_path):
    frozen = _frozen(nan=True)
    cfg = TrainConfig(stage1_steps=2, stage2_steps=0, batch_size=2, checkpoint_every=1)
    with pytest.raises(BfError, match=r"loss is nan at Stage 1 step 1.*--resume"):
        train_student(frozen, _plan(frozen), cfg, tmp_path)
    assert not (tmp_path / STATE_FILE).exists()  # nothing half-written


def test_image_caption_directory(tmp_path):
    from PIL import Image

    Image.new("RGB", (100, 60), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red thing\n")
    (tmp_path / "b.png").write_bytes(b"not a png")
    (tmp_path / "b.txt").write_text("broken")
    (tmp_path / "c.png").write_bytes(b"")  # no caption: ignored
    images, caps, skipped = read_image_captions(tmp_path, 32)
    assert images.shape == (1, 32, 32, 3) and caps == ["a red thing"] and skipped == 1
    assert (images[0] == [255, 0, 0]).all()
    (tmp_path / "data.jsonl").write_text('{"image": "a.png", "caption": "from jsonl"}\n')
    _, caps, _ = read_image_captions(tmp_path, 16)
    assert caps == ["from jsonl"]
    (tmp_path / "data.jsonl").write_text('{"img": "a.png"}\n')
    with pytest.raises(BfError, match=r"data.jsonl:1: expected"):
        read_image_captions(tmp_path, 16)
    with pytest.raises(BfError, match="not a directory"):
        read_image_captions(tmp_path / "nope", 16)


def test_bf_train_cli_on_an_fp16_model(tmp_path):
    from conftest import run_bf

    from bf.format import Checkpoint

    assert run_bf("random-model", "--arch", "sd15-tiny", "--dtype", "fp16", "--out", tmp_path / "m").returncode == 0
    args = ["train", "--model", tmp_path / "m", "--images", "8", "--stage1-steps", "2", "--stage2-steps", "1", "--batch-size", "2"]
    r = run_bf(*args, "--uniform-bits", "2", "--out", tmp_path / "q.bfq")
    assert r.returncode == 0, r.stderr
    ckpt = Checkpoint.load(tmp_path / "q.bfq")
    assert {ly.grid.bits for ly in ckpt.layers.values()} == {2, 8}
    assert ckpt.recipe["training"]["stage1_steps"] == 2
    assert (tmp_path / "q.bfq.work" / "log.csv").read_text().count("\n") == 4
    r = run_bf(*args, "--uniform-bits", "2", "--resume", "--work", tmp_path / "fresh", "--out", tmp_path / "y.bfq")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].endswith("holds no training state (state.safetensors) to continue; "
                                                                              "run without --resume to start"), r.stderr  # fmt: skip
    assert "encoding" not in r.stderr and not (tmp_path / "fresh").exists()  # refused before any work
    r = run_bf(*args, "--uniform-bits", "2", "--recipe", tmp_path / "r.json", "--out", tmp_path / "x.bfq")
    assert r.returncode == 1 and "at most one of --recipe and --uniform-bits" in r.stderr and not (tmp_path / "x.bfq").exists()
    (tmp_path / "r.json").write_text(json.dumps(uniform_recipe({"conv_in": (4, 4, 3, 3)}, 2, "balanced")))
    r = run_bf(*args, "--recipe", tmp_path / "r.json", "--grid", "plain", "--out", tmp_path / "x.bfq")
    assert r.returncode == 1 and "--grid plain contradicts the grid of" in r.stderr and "('balanced'); drop --grid" in r.stderr
    assert not (tmp_path / "x.bfq").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_ddp_two_cpu_processes_train_identical_students(tmp_path, arch):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path), arch]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    l0, l1 = (json.loads((tmp_path / f"losses{i}.json").read_text()) for i in (0, 1))
    assert l0 != l1  # each rank saw its own batches
    assert np.mean(l0[-4:] + l1[-4:]) < 0.8 * np.mean(l0[:4] + l1[:4])
    assert (tmp_path / "work" / "log.csv").read_text().count("\n") == 17  # rank 0 alone logs


def test_training_noise_schedule_is_the_models():
    """SD-v1.5's scaled_linear betas, not DDPM's default linear ones."""
    from bf.models.architectures import SD15_SCHEDULER
    from bf.trainer.frozen import training_alphas_cumprod

    acp = training_alphas_cumprod(SD15_SCHEDULER)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    assert acp.shape == (1000,)
    assert torch.allclose(acp, torch.cumprod(1 - betas, 0), rtol=1e-5)


def test_text_encoder_cache_overflow_keeps_every_caption_of_the_batch():
    """A batch that overflows the cache once lost its already-cached captions (KeyError on the GPU run)."""
    from bf.trainer.frozen import TextEncoder

    class Tok:
        model_max_length = 4

        def __call__(self, texts, **kw):
            return type("T", (), {"input_ids": torch.tensor([[len(t), 0, 0, 0] for t in texts])})()

    class Enc(torch.nn.Module):
        def forward(self, ids):
            return type("O", (), {"last_hidden_state": ids.float()[:, :, None]})()

    enc = TextEncoder(Tok(), Enc(), "cpu", max_cached=3)
    enc(["a", "bb"])
    out = enc(["a", "ccc", "dddd"])  # 2 cached + 2 new > 3: cleared, and "a" must be recomputed
    assert out[:, 0, 0].tolist() == [1.0, 3.0, 4.0]
    assert set(enc.cache) == {"a", "ccc", "dddd"}


@pytest.mark.gpu
def test_cuda_graph_steps_train_like_eager_steps(tmp_path):
    """--cuda-graph: the captured step (warm-up undone) trains the same student as eager steps, both stages."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.backends.cudnn.deterministic = True

    def cuda_frozen():
        f = _frozen()
        encode = f.encode_text
        return Frozen(f.teacher.cuda(), lambda caps: encode(caps).cuda(), f.data, f.alphas_cumprod.cuda())

    cfg = TrainConfig(stage1_steps=4, stage2_steps=3, batch_size=2, lr=1e-3, checkpoint_every=100)
    frozen = cuda_frozen()
    plan = _plan(frozen)
    runs = []
    for graph in (False, False, True):  # two eager runs measure the GPU's own run-to-run noise
        losses = []
        student, _ = train_student(
            cuda_frozen(), plan, TrainConfig(**{**cfg.__dict__, "cuda_graph": graph}), tmp_path / str(len(runs)),
            progress=lambda st, step, info, losses=losses: losses.append(info["loss"]),
        )  # fmt: skip
        runs.append((np.array(losses), student.state_dict()))
    (e1, s1), (e2, s2), (gl, gs) = runs
    assert len(gl) == 7 and abs(gl[0] - e1[0]) <= 1e-6 * abs(e1[0])  # the first step sees the same weights
    # Adam turns tiny gradient differences (atomics in attention backward) into lr-sized steps, so
    # eager runs may differ; the graph run must differ from eager by no more than that noise.
    noise_loss = np.abs(e1 - e2).max()
    noise_w = max((s1[k] - s2[k]).abs().max().item() for k in s1)
    assert np.abs(gl - e1).max() <= 5 * noise_loss + 1e-6 * np.abs(e1).max(), (gl, e1, e2)
    assert max((s1[k] - gs[k]).abs().max().item() for k in s1) <= 5 * noise_w + 1e-6
    with pytest.raises(BfError, match="--cuda-graph needs one CUDA GPU"):
        train_student(_frozen(), plan, TrainConfig(**{**cfg.__dict__, "cuda_graph": True}), tmp_path / "cpu")


def test_a_rate_larger_than_the_scales_holds_them_at_their_floor_and_packs(tmp_path):
    """AdamW steps a scale by about --lr: with a rate above the scales they would cross zero; they are held instead."""
    from bf.trainer.qat import SCALE_FLOOR, scale_health
    from bf.trainer.train import pack_student

    frozen = _frozen()
    cfg = TrainConfig(stage1_steps=2, stage2_steps=0, batch_size=2, lr=0.1, checkpoint_every=2)
    messages = []
    student, quants = train_student(frozen, _plan(frozen), cfg, tmp_path, log=messages.append)
    bad, held = scale_health(quants)
    assert bad == 0 and held > 0
    assert any(f"learned scale(s) held at their floor ({SCALE_FLOOR:g} of the initial scale" in m for m in messages)
    assert min(float(fq.scale.min()) for fq in quants.values()) > 0
    ckpt = pack_student(student, quants, dict(TINY_UNET), {"path": "tiny", "hash": "0"}, {})
    assert all((layer.scale > 0).all() for layer in ckpt.layers.values())


def test_a_state_is_also_saved_when_checkpoint_minutes_have_passed(tmp_path, monkeypatch):
    from bf.trainer import train as train_module

    saved = []
    real_save = train_module.save_state
    monkeypatch.setattr(train_module, "save_state", lambda path, *a: (saved.append(a[-1]["step"]), real_save(path, *a)))
    frozen = _frozen()
    cfg = TrainConfig(stage1_steps=3, stage2_steps=0, batch_size=2, checkpoint_every=100, checkpoint_minutes=1e-9)
    train_student(frozen, _plan(frozen), cfg, tmp_path)
    assert saved == [1, 2, 3]  # every step: the interval has always passed (by steps alone: only the last)


def test_an_fp_students_stage1_is_the_identity(tmp_path):
    """What --fp-control relies on to skip Stage I: distilling an unquantized student from its own teacher leaves
    every weight exactly as it was (zero loss, zero gradient), feature term and all."""
    frozen = _frozen()
    cfg = TrainConfig(stage1_steps=3, stage2_steps=0, batch_size=2, lr=1e-2, checkpoint_every=100)
    losses = []
    student, quants = train_student(frozen, {}, cfg, tmp_path, progress=lambda st, step, info: losses.append(info["loss"]))
    assert quants == {} and losses == [0.0, 0.0, 0.0]
    teacher = frozen.teacher.state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in student.state_dict().items())


def test_bf_train_fp_control_writes_the_fp_model_after_stage2(tmp_path):
    """--fp-control: a model directory bf eval can open, whose UNet moved by Stage II alone (same data, batch, lr),
    every other component byte for byte the base model's, and the settings in bf_training.json."""
    from conftest import run_bf
    from safetensors.torch import load_file

    from bf.models.directory import ModelDir

    assert run_bf("random-model", "--arch", "sd15-tiny", "--out", tmp_path / "m").returncode == 0
    args = ["train", "--model", tmp_path / "m", "--images", "8", "--stage1-steps", "5", "--stage2-steps", "2", "--batch-size", "2"]
    r = run_bf(*args, "--fp-control", "--out", tmp_path / "ctl")
    assert r.returncode == 0, r.stderr
    assert "Stage I (5 steps) would leave the FP model as it is and is skipped; Stage II 2 steps from a fresh optimizer" in r.stderr
    ctl, base = ModelDir.open(tmp_path / "ctl"), ModelDir.open(tmp_path / "m")
    for comp in ("text_encoder", "tokenizer", "vae", "scheduler"):
        assert [f.read_bytes() for f in ctl.component_files(comp)] == [f.read_bytes() for f in base.component_files(comp)]
    assert ctl.config("unet") == base.config("unet")
    trained, original = load_file(str(ctl.weight_files("unet")[0])), base.read_weights("unet", "pt")
    assert trained.keys() == original.keys()
    moved = [k for k in trained if not torch.equal(trained[k], original[k])]
    assert len(moved) > len(trained) / 2  # Stage II trains every weight
    note = json.loads((tmp_path / "ctl" / "bf_training.json").read_text())
    assert note["fp_control"] and note["training"]["stage2_steps"] == 2
    assert (note["training"]["stage1_steps"], note["training"]["stage1_steps_skipped"]) == (0, 5)
    assert (tmp_path / "ctl.work" / "log.csv").read_text().count("\n") == 3  # header and two Stage II steps
