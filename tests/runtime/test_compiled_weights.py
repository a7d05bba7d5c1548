"""Low-bit weights decoded inside a compiled model by the bf::lowbit_decode_* custom ops (bf.runtime.compiled_weights)."""

import copy
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bf.format import Grid, QuantizedLayer  # noqa: E402
from tests.conftest import conv_linear_stack, forced_fused  # noqa: E402


def _net_and_layers(channels_last: bool, device: str):
    """A small conv/linear stack, its quantized layers packed for ``device``, and the same stack with the decoded weights."""
    from bf.runtime.streamed_weights import packed_weight

    decoded, layers = conv_linear_stack((4, 16, 8, 6), (Grid(2), Grid(1), Grid(3, "plain")), 0.2)
    packed = {name: packed_weight(layer, device, channels_last) for name, layer in layers.items()}
    return decoded, packed


def test_the_op_traces_without_a_graph_break_and_decodes_exactly(native_build, monkeypatch):
    """On the CPU: the compiled layers equal the decoded weights, and dynamo traces the whole model
    through the custom op (fullgraph) with its fake implementation."""
    from bf.decode_kernels import load
    from bf.runtime.compiled_weights import CompiledLowBitGroup, compile_weights, decode_launches, packed_bytes

    monkeypatch.setenv("BF_DECODE_LIB", str(native_build / "libbf_decode.so"))
    decoded, packed = _net_and_layers(channels_last=False, device="cpu")
    model = copy.deepcopy(decoded)
    assert compile_weights(model, packed, torch.float32, decoder=load(native_build / "libbf_decode.so")) == 3
    assert all(isinstance(getattr(model, n), CompiledLowBitGroup) and getattr(model, n).names == [""] for n in packed)
    assert decode_launches(model) == 3
    assert packed_bytes(model) == sum(p.codes.nbytes + p.scale.nbytes for p in packed.values())
    x = torch.randn(2, 4, 6, 6)
    with torch.inference_mode():
        ref = decoded(x)
        assert torch.equal(model(x), ref)  # the library's float32 decode is the format's exact rule
        traced = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert torch.equal(traced(x), ref)


def _tiny_unet(tiny_model, device: str, channels_last: bool, with_layers: bool = False):
    """The tiny UNet (every SD-v1.5 block type) with its layers quantized to 1-3 bits: the decoded-weight UNet
    and the layers packed for ``device`` (``with_layers``: and the QuantizedLayers by name)."""
    from diffusers import UNet2DConditionModel

    from bf.format import quantizable_layers
    from bf.runtime.streamed_weights import packed_weight

    torch.manual_seed(0)
    decoded = UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval()
    shapes = {k: tuple(v.shape) for k, v in decoded.state_dict().items()}
    names = [n for n in quantizable_layers(shapes) if not n.startswith("time_embedding")]
    rng = np.random.default_rng(1)
    packed, layers = {}, {}
    for i, name in enumerate(names):
        shape, grid = shapes[f"{name}.weight"], (Grid(1), Grid(2), Grid(3))[i % 3]
        layer = layers[name] = QuantizedLayer.from_levels(name, rng.integers(grid.qmin, grid.qmax + 1, shape), rng.random(shape[0]) * 0.1,
                                                          grid)  # fmt: skip
        decoded.get_submodule(name).weight.data = torch.from_numpy(layer.dequantize())
        packed[name] = packed_weight(layer, device, channels_last)
    return (decoded, packed, layers) if with_layers else (decoded, packed)


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_unet_decodes_one_launch_per_block_and_traces_whole(tiny_model, native_build, channels_last):
    """Grouped by block, every weight decoded is the format's exact value, the UNet's output equals the
    decoded-weight UNet's, and dynamo traces it through the group ops and functional_call without a graph break."""
    from bf.decode_kernels import load
    from bf.runtime.compiled_weights import CompiledLowBitGroup, compile_weights, packed_bytes

    decoded, packed = _tiny_unet(tiny_model, "cpu", channels_last)
    model = copy.deepcopy(decoded)
    assert compile_weights(model, packed, torch.float32, decoder=load(native_build / "libbf_decode.so")) == len(packed)
    groups = [m for m in model.modules() if isinstance(m, CompiledLowBitGroup)]
    assert sum(len(g.names) for g in groups) == len(packed) and len(groups) < len(packed) / 2
    assert not any(isinstance(m, CompiledLowBitGroup) for g in groups for m in g.block.modules())  # groups never nest
    assert {n for g in groups for n in g.names if "proj_" in n} == set()  # an attention's projections decode alone
    assert packed_bytes(model) == sum(p.codes.nbytes + p.scale.nbytes for p in packed.values())
    sample, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor(10), torch.randn(2, 77, decoded.config.cross_attention_dim)
    if channels_last:  # as the runtime runs them: the decoded weights in the layout the channels-last codes decode to
        decoded, model = decoded.to(memory_format=torch.channels_last), model.to(memory_format=torch.channels_last)
        sample = sample.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = decoded(sample, t, ctx).sample
        assert torch.equal(model(sample, t, ctx).sample, ref)
        traced = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert torch.equal(traced(sample, t, ctx).sample, ref)


@pytest.mark.parametrize("slots", [2, 3])
def test_decoding_ahead_follows_the_forward_order_and_changes_no_weight(tiny_model, native_build, slots):
    """Decoding ahead: the schedule is the forward's order of blocks, each slot holds its largest group, and the
    output equals the decoded-weight UNet's, eager (twice: every slot is decoded into anew) and traced whole by
    dynamo; a forward in another order is refused."""
    from bf.decode_kernels import load
    from bf.errors import BfError
    from bf.runtime.compiled_weights import _SCHEDULES, CompiledLowBitGroup, compile_weights, decode_ahead

    decoded, packed = _tiny_unet(tiny_model, "cpu", channels_last=False)
    model = copy.deepcopy(decoded)
    compile_weights(model, packed, torch.float32, decoder=load(native_build / "libbf_decode.so"))
    sample, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor(10), torch.randn(2, 77, decoded.config.cross_attention_dim)
    order = []
    groups = [m for m in model.modules() if isinstance(m, CompiledLowBitGroup)]
    hooks = [g.register_forward_pre_hook(lambda m, a: order.append(m)) for g in groups]
    with torch.inference_mode():
        model(sample, t, ctx)
    for h in hooks:
        h.remove()
    small = (torch.randn(1, 4, 4, 4), t, torch.randn(1, 1, decoded.config.cross_attention_dim))  # any shape gives the order
    slot_bytes = decode_ahead(model, lambda: model(*small), slots=slots)
    schedule = _SCHEDULES[order[0].ahead[0]]
    assert schedule.order == order and [g.ahead[1] for g in order] == list(range(len(order)))
    assert len(schedule.slots) == slots
    assert slot_bytes == sum(max(g.size for g in order[s::slots]) for s in range(slots)) * 4
    with torch.inference_mode():
        ref = decoded(sample, t, ctx).sample
        assert torch.equal(model(sample, t, ctx).sample, ref)
        assert torch.equal(model(sample, t, ctx).sample, ref)
        if slots == 2:
            traced = torch.compile(model, backend="aot_eager", fullgraph=True)
            assert torch.equal(traced(sample, t, ctx).sample, ref)
        order[0](sample)  # conv_in, then the third block instead of the second
        with pytest.raises(BfError, match="ran block 2 where its schedule expected block 1: the model's forward changed"):
            order[2](torch.zeros(1))
        assert torch.equal(model(sample, t, ctx).sample, ref)  # the first block starts a step anew
    with pytest.raises(BfError, match="2 or more slots"):
        decode_ahead(model, lambda: None, slots=1)
    with pytest.raises(BfError, match=r"runs each of its blocks once per forward; conv_in ran twice"):
        decode_ahead(model, lambda: (model(*small), model(*small)))


def test_sub_blocks_decode_a_transformer_blocks_attentions_and_feed_forward_ahead_on_their_own(tiny_model, native_build):
    """sub_blocks: each transformer block's attn1, attn2 and ff is a group; all of them lie on the chain a decode ahead
    follows (none is left to the step's stream), the slots hold the largest of these smaller groups, and the output
    equals the decoded-weight UNet's, eager and traced whole."""
    from bf.decode_kernels import load
    from bf.errors import BfError
    from bf.runtime.compiled_weights import _SCHEDULES, CompiledLowBitGroup, compile_weights, decode_ahead

    decoded, packed = _tiny_unet(tiny_model, "cpu", channels_last=False)
    lib = load(native_build / "libbf_decode.so")
    whole, split = copy.deepcopy(decoded), copy.deepcopy(decoded)
    compile_weights(whole, packed, torch.float32, decoder=lib)
    compile_weights(split, packed, torch.float32, decoder=lib, sub_blocks=True)
    named = {n: m for n, m in split.named_modules() if isinstance(m, CompiledLowBitGroup)}
    blocks = {n for n, m in whole.named_modules() if isinstance(m, CompiledLowBitGroup) and "transformer_blocks" in n}
    assert blocks and {n.rsplit(".", 1)[1] for n in named if "transformer_blocks" in n} == {"attn1", "attn2", "ff"}
    assert {n.rsplit(".", 1)[0] for n in named if "transformer_blocks" in n} == blocks  # every block split, nothing else
    assert sum(len(g.names) for g in named.values()) == len(packed)
    t, ctx = torch.tensor(10), torch.randn(2, 77, decoded.config.cross_attention_dim)
    small = (torch.randn(1, 4, 4, 4), t, torch.randn(1, 1, decoded.config.cross_attention_dim))
    said: list[str] = []
    slot_bytes = decode_ahead(split, lambda: split(*small), slots=2, log=said.append)
    assert said == [] and all(g.ahead is not None for g in named.values())
    assert slot_bytes == decode_ahead(whole, lambda: whole(*small), slots=2)  # the tiny UNet's largest groups are ResNets
    assert len(_SCHEDULES[next(iter(named.values())).ahead[0]].order) == len(named) == sum(
        isinstance(m, CompiledLowBitGroup) for m in whole.modules()) + 2 * len(blocks)  # fmt: skip
    with pytest.raises(BfError, match="with by_block=False every layer is a group already"):
        compile_weights(copy.deepcopy(decoded), packed, torch.float32, decoder=lib, by_block=False, sub_blocks=True)
    sample = torch.randn(2, 4, 16, 16)
    with torch.inference_mode():
        ref = decoded(sample, t, ctx).sample
        assert torch.equal(split(sample, t, ctx).sample, ref)
        traced = torch.compile(split, backend="aot_eager", fullgraph=True)
        assert torch.equal(traced(sample, t, ctx).sample, ref)


def test_decoding_ahead_leaves_a_side_branch_to_decode_on_its_own(native_build):
    """A block beside the main line (as SDXL's added-time embedding runs beside conv_in): its output feeds the
    line, but the next block's input is not computed from it, so the data would not order a decode into its slot
    after its reads. The schedule is the chain that ends with the last block; the side block decodes on its own,
    and the output is unchanged, twice over (every slot decoded anew)."""
    from torch import nn

    from bf.decode_kernels import load
    from bf.runtime.compiled_weights import _SCHEDULES, compile_weights, decode_ahead
    from bf.runtime.streamed_weights import packed_weight

    class SideBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv_in, self.block, self.out = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x, t):
            e = self.emb(t)
            h = self.block(self.conv_in(x) + e)
            return self.out(h)

    rng = np.random.default_rng(0)
    net = SideBranch()
    packed = {n: packed_weight(QuantizedLayer.from_levels(n, rng.integers(-1, 2, (8, 8)), rng.random(8), Grid(2)), "cpu", False)
              for n in ("emb", "conv_in", "block", "out")}  # fmt: skip
    compile_weights(net, packed, torch.float32, decoder=load(native_build / "libbf_decode.so"))
    x, t = torch.randn(2, 8), torch.randn(2, 8)
    with torch.inference_mode():
        ref = net(x, t)
    said = []
    assert decode_ahead(net, lambda: net(x[:1], t[:1]), log=said.append) == 2 * net.conv_in.size * 4  # two slots of one group each
    assert said == ["decoding ahead: 3 of 4 blocks; emb decode in the step's stream (off the chain of blocks)"]
    assert net.emb.ahead is None
    schedule = _SCHEDULES[net.conv_in.ahead[0]]
    assert schedule.order == [net.conv_in, net.block, net.out]
    assert [net.conv_in.ahead[1], net.block.ahead[1], net.out.ahead[1]] == [0, 1, 2]
    with torch.inference_mode():
        assert torch.equal(net(x, t), ref)
        assert torch.equal(net(x, t), ref)


def test_a_layer_of_another_shape_is_refused(native_build, monkeypatch):
    from bf.errors import BfError
    from bf.runtime.compiled_weights import compile_weights

    decoded, packed = _net_and_layers(channels_last=False, device="cpu")
    packed["a"], packed["b"] = packed["b"], packed["a"]
    with pytest.raises(BfError, match=r"compiled weights: a holds a \(8, 16, 1, 1\) weight, the model's is \(16, 4, 3, 3\)"):
        compile_weights(copy.deepcopy(decoded), packed, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("ahead", [0, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_step_equals_the_decoded_weights_compiled_and_eager(native_build, monkeypatch, channels_last, ahead):
    """On the GPU, fp16, inductor with CUDA graphs (torch's, and the backend's own around the default mode), decoding
    in the step's stream or ahead on a side stream: the low-bit model compiled equals the decoded-weight model
    compiled the same way bit for bit (the ops hand inductor the very weights), and the eager decoded model within
    fp16 rounding of the fused elementwise work."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bf.decode_kernels import load
    from bf.runtime.compiled_weights import AHEAD_COMPILE_OPTIONS, STEP_PRIORITY, compile_weights, decode_ahead
    from bf.runtime.torch_graph import GraphedCall

    lib = load(native_build / "libbf_decode.so")
    decoded, packed = _net_and_layers(channels_last, "cuda")
    decoded = decoded.cuda().half()
    model = copy.deepcopy(decoded)
    compile_weights(model, packed, torch.float16, decoder=lib)
    if channels_last:
        decoded, model = decoded.to(memory_format=torch.channels_last), model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 8, 8, device="cuda").half()
    if ahead:
        assert decode_ahead(model, lambda: model(x[:1]), slots=ahead) > 0
    with torch.inference_mode():
        eager = decoded(x)
        torch._dynamo.reset()
        # decoding ahead: the runtime's options (no buffer reuse), torch's CUDA graphs as reduce-overhead has them
        ours = torch.compile(model, fullgraph=True, options={"triton.cudagraphs": True, **AHEAD_COMPILE_OPTIONS}) if ahead else \
            torch.compile(model, mode="reduce-overhead", fullgraph=True)  # fmt: skip
        theirs = torch.compile(copy.deepcopy(decoded), mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # compile, record, replay
            torch.compiler.cudagraph_mark_step_begin()
            a = ours(x).clone()
            torch.compiler.cudagraph_mark_step_begin()
            b = theirs(x).clone()
        assert torch.equal(a, b)
        assert (a.float() - eager.float()).abs().max().item() <= 2e-3 * eager.float().abs().max().item()
        torch._dynamo.reset()
        options = AHEAD_COMPILE_OPTIONS if ahead else None
        graphed = GraphedCall(torch.compile(model, fullgraph=True, options=options), priority=STEP_PRIORITY if ahead else 0)
        reference = torch.compile(copy.deepcopy(decoded), fullgraph=True)(x)
        for _ in range(3):
            assert torch.equal(graphed(x), reference)


@pytest.mark.parametrize("runtime_options", [True, False])
def test_a_compiled_step_decoding_ahead_writes_the_slots_in_place_and_equals_the_decoded_weights(native_build, runtime_options):
    """On the CPU: dynamo traces the decode-ahead op (which writes its block's slot) without a graph break, inductor
    calls it on the slot itself (no copy of a slot in the compiled code), and the compiled model equals the decoded
    weights' within float32 rounding, step after step: with the runtime's options and with inductor's own (its
    buffers reused as it plans them)."""
    from torch._inductor.utils import run_and_get_code

    from bf.decode_kernels import load
    from bf.runtime.compiled_weights import _SCHEDULES, AHEAD_COMPILE_OPTIONS, compile_weights, decode_ahead

    decoded, packed = _net_and_layers(channels_last=False, device="cpu")
    model = copy.deepcopy(decoded)
    compile_weights(model, packed, torch.float32, decoder=load(native_build / "libbf_decode.so"))
    x = torch.randn(2, 4, 6, 6)
    assert decode_ahead(model, lambda: model(x[:1]), slots=2) == 4 * (640 + 128)  # slot 0: a, then fc; slot 1: b
    slots = _SCHEDULES[model.a.ahead[0]].slots
    with torch.inference_mode():
        ref = decoded(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, options=AHEAD_COMPILE_OPTIONS if runtime_options else None)
        out, (code,) = run_and_get_code(compiled, x)
        # called on the graph's inputs, the slots themselves, and nothing copies a tensor
        called_on = re.findall(r"torch\.ops\.bf\.lowbit_decode_ahead\.default\((\w+),", code)
        assert len(called_on) == 3 and all(re.fullmatch(r"arg\d+_1", a) for a in called_on)  # inputs, not buffers
        assert called_on[0] == called_on[2] != called_on[1]  # a, then fc, in slot 0; b in slot 1
        assert not re.search(r"\bclone\(|copy_\(", code)
        for _ in range(2):
            assert torch.allclose(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
            out = compiled(x)
    assert [s.numel() for s in slots] == [640, 128]
    torch._dynamo.reset()


def test_the_torch_backends_compiled_unet_decodes_ahead_when_asked(tiny_model, native_build, monkeypatch):
    """TorchUNet(compile=True, ahead_slots=2) finds its blocks' order from a forward of the smallest input and
    steps equal to the decoded weights' (CPU, float32, eager: the schedule and slots, not the compiler)."""
    from bf.runtime.backend_torch import TorchUNet

    monkeypatch.setenv("BF_DECODE_LIB", str(native_build / "libbf_decode.so"))
    decoded, packed = _tiny_unet(tiny_model, "cpu", channels_last=False)
    timesteps = torch.arange(900, -1, -100)
    opts = {"device": "cpu", "dtype": "float32", "channels_last": False, "cuda_graph": False}
    ref = TorchUNet(copy.deepcopy(decoded), timesteps, weights="fp", **opts)
    ours = TorchUNet(copy.deepcopy(decoded), timesteps, packed, weights="streamed", compile=True, ahead_slots=2, **opts)
    in_stream = TorchUNet(copy.deepcopy(decoded), timesteps, packed, weights="streamed", compile=True, **opts)
    assert ours.slot_bytes > 0 and in_stream.slot_bytes == 0
    sample, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, decoded.config.cross_attention_dim)
    with torch.inference_mode():
        for i in (0, 3):
            step = torch.tensor([i])
            assert torch.equal(ours.eager_step(sample, step, ctx), ref.eager_step(sample, step, ctx))


def test_ungrouped_layers_group_again_around_layers_swapped_in_between(tiny_model, native_build):
    """ungroup gives every block back with meta placeholders of the model's weight shapes; grouping a subset again
    around fused layers installed in between gives the decoded model's output, with fewer decode launches."""
    from bf.decode_kernels import load
    from bf.runtime.compiled_fused import FusedLowBitLayer, install_fused
    from bf.runtime.compiled_weights import CompiledLowBitGroup, compile_weights, decode_launches, ungroup

    lib = load(native_build / "libbf_decode.so")
    decoded, packed, layers = _tiny_unet(tiny_model, "cpu", channels_last=True, with_layers=True)
    model = copy.deepcopy(decoded).to(memory_format=torch.channels_last)
    compile_weights(model, packed, torch.float32, decoder=lib)
    launches = decode_launches(model)
    groups = sum(isinstance(m, CompiledLowBitGroup) for m in model.modules())
    assert ungroup(model) == groups > 1
    assert not any(isinstance(m, CompiledLowBitGroup) for m in model.modules())
    for name in packed:  # the model's own shapes (the channels-last codes' permuted back), holding no memory
        w = model.get_submodule(name).weight
        assert w.is_meta and w.shape == decoded.get_submodule(name).weight.shape, name
    # a resnet's 3x3 convolution, a transformer block's query and an attention's 1x1 input projection leave their groups
    names = ["down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.0.attentions.0.proj_in"]  # fmt: skip
    assert install_fused(model, forced_fused(decoded, layers, names)) == 3
    compile_weights(model, {n: p for n, p in packed.items() if n not in names}, torch.float32, decoder=lib)
    assert decode_launches(model) == launches - 1  # proj_in was a group of its own; the others' blocks still decode
    assert sum(isinstance(m, FusedLowBitLayer) for m in model.modules()) == 3
    sample = torch.randn(2, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    t, ctx = torch.tensor(10), torch.randn(2, 77, decoded.config.cross_attention_dim)
    with torch.inference_mode():
        ref = decoded.to(memory_format=torch.channels_last)(sample, t, ctx).sample
        torch.testing.assert_close(model(sample, t, ctx).sample, ref, rtol=1e-5, atol=1e-5)


def test_a_compiled_torch_unet_chooses_its_fused_layers_at_the_first_steps_shape(tiny_model, native_build, monkeypatch, tmp_path):
    """TorchUNet(compile=True, fused="auto"): the first step, before it compiles, asks choose_fused (here answering
    with three layers, as a GPU's timings might) at that step's input, regroups the rest, and steps equal to the decoded
    weights'; later steps do not choose again. A choice that fails changes nothing and says so; layers with a LoRA are
    not offered. (CPU, float32, torch.compile left out: the flow, not the kernels or the trace.)"""
    from torch import nn

    from bf.errors import BfError
    from bf.runtime import backend_torch, compiled_fused
    from bf.runtime.backend_torch import TorchUNet
    from bf.runtime.compiled_fused import fused_bytes
    from bf.runtime.compiled_weights import decode_launches, fewest_launches_within, packed_bytes

    monkeypatch.setenv("BF_DECODE_LIB", str(native_build / "libbf_decode.so"))
    decoded, packed, layers = _tiny_unet(tiny_model, "cpu", channels_last=True, with_layers=True)
    # three layers by their names, and where they sit inside their decode groups when the first step chooses
    names = {"up_blocks.1.resnets.0.conv2": "up_blocks.1.resnets.0.block.conv2",
             "mid_block.attentions.0.transformer_blocks.0.ff.net.2": "mid_block.attentions.0.transformer_blocks.0.block.ff.net.2",
             "down_blocks.1.attentions.0.proj_out": "down_blocks.1.attentions.0.proj_out.block"}  # fmt: skip
    asked = []

    def choose(owner, candidates, run_once, decoder, against, margin, log):
        shapes = compiled_fused._layer_inputs(owner, list(candidates), run_once)  # the forward the real one runs
        asked.append((len(candidates), shapes[names["up_blocks.1.resnets.0.conv2"]], against, margin))
        log("fused layers: (timings)")
        forced = forced_fused(decoded, layers, list(names))
        return {path: forced[name] for name, path in names.items()}

    monkeypatch.setattr(compiled_fused, "choose_fused", choose)
    monkeypatch.setattr(backend_torch, "_fused_mode", lambda fused, channels_last, dtype: fused)  # Triton and float16 aside
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # (the regrouped modules' trace: the GPU tests and the stack's)
    logged = []
    timesteps = torch.arange(900, -1, -100)
    opts = {"device": "cpu", "dtype": "float32", "channels_last": True, "cuda_graph": False}
    ref = TorchUNet(copy.deepcopy(decoded), timesteps, weights="fp", **opts)
    ours = TorchUNet(copy.deepcopy(decoded), timesteps, packed, weights="streamed", compile=True, fused="auto", log=logged.append,
                     **opts)  # fmt: skip
    launches = decode_launches(ours.unet)
    assert ours.fused_layers == 0 and not asked  # nothing chosen before the first step
    sample, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, decoded.config.cross_attention_dim)
    with torch.inference_mode():
        for i in (0, 3):
            step = torch.tensor([i])
            torch.testing.assert_close(ours.step(sample, step, ctx), ref.eager_step(sample, step, ctx), rtol=1e-5, atol=1e-5)
    assert len(asked) == 1 and asked[0] == (len(packed), (2, 64, 4, 4), "stream", 1.0)  # up_blocks.1 runs at 4x4, 64 channels
    assert ours.fused_layers == 3 and decode_launches(ours.unet) == launches - 1  # proj_out decoded alone; the others in blocks
    assert ours.weight_bytes == packed_bytes(ours.unet) + fused_bytes(ours.unet) and fused_bytes(ours.unet) > 0
    assert any(m.startswith("timing the fused low-bit kernels") and "[2, 4, 16, 16]" in m for m in logged)
    assert any(m.startswith("fused layers: 3 of the ") for m in logged), logged
    # with weights kept decoded: the smallest decode kernels of the layers not fused, whole, chosen with them, hold their
    # decoded weights
    budget = 3 * 2**10 * 4  # float32 bytes: a few of the tiny UNet's smallest weights
    asked.clear()
    kept = TorchUNet(copy.deepcopy(decoded), timesteps, packed, weights="streamed", compile=True, fused="auto", keep_decoded_bytes=budget,
                     **opts)  # fmt: skip
    assert kept.kept_decoded_bytes == 0  # nothing chosen yet: the budget waits for the first step
    with torch.inference_mode():
        torch.testing.assert_close(kept.step(sample, step, ctx), ref.eager_step(sample, step, ctx), rtol=1e-5, atol=1e-5)
    held = {}  # the layers holding a weight, by their names outside the decode groups (a group holds its block as "block")
    for path, m in kept.unet.named_modules():
        name = ".".join(part for part in path.split(".") if part != "block")
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name in packed and m.weight.numel():
            held[name] = m.weight
    assert held and set(held).isdisjoint(names) and 0 < kept.kept_decoded_bytes == 4 * sum(w.numel() for w in held.values()) <= budget
    assert set(held) == fewest_launches_within({n: packed[n] for n in packed if n not in names}, budget // 4)  # (here not
    # the three smallest layers, two of which share decode kernels with larger ones)
    for n, w in held.items():  # the codes' values, in the model's layout
        assert torch.equal(w, decoded.get_submodule(n).weight), n
    assert kept.fused_layers == 3 and decode_launches(kept.unet) < launches - 1
    with pytest.raises(BfError, match="with a compiled step decoding ahead"):
        TorchUNet(copy.deepcopy(decoded), timesteps, packed, weights="streamed", compile=True, fused="on", ahead_slots=2, **opts)

    # a choice that fails (Triton, the GPU) is one line; the model is as it was, and the next step chooses again
    failing = [RuntimeError("no kernel image is available")]

    def choose_once_failing(*args, **kwargs):
        if failing:
            raise failing.pop()
        return choose(*args, **kwargs)

    monkeypatch.setattr(compiled_fused, "choose_fused", choose_once_failing)
    again = TorchUNet(copy.deepcopy(decoded), timesteps, packed, weights="streamed", compile=True, fused="auto", **opts)
    with torch.inference_mode():
        with pytest.raises(BfError, match=r"timing the fused low-bit kernels failed \(RuntimeError: no kernel image is available\); run"):
            again.step(sample, step, ctx)
        assert again.fused_layers == 0 and decode_launches(again.unet) == launches
        torch.testing.assert_close(again.step(sample, step, ctx), ref.eager_step(sample, step, ctx), rtol=1e-5, atol=1e-5)
    assert again.fused_layers == 3

    # a LoRA: its layers are not offered (their change is added where the step builds their weight, or hooked on them)
    from tests.conftest import random_lora_file

    loras = [(random_lora_file(tmp_path / "l.safetensors", decoded, targets=("to_q", "to_v", "conv1")), 1.0)]
    with_lora = [n for n in packed if n.endswith(("to_q", "to_v", "conv1"))]
    asked.clear()
    fp_lora = TorchUNet(copy.deepcopy(decoded), timesteps, weights="fp", loras=loras, **opts)
    ours_lora = TorchUNet(copy.deepcopy(decoded), timesteps, packed, weights="streamed", compile=True, fused="auto", loras=loras, **opts)
    with torch.inference_mode():
        torch.testing.assert_close(ours_lora.step(sample, step, ctx), fp_lora.eager_step(sample, step, ctx), rtol=1e-5, atol=1e-5)
    assert len(with_lora) > 10 and asked[0][0] == len(packed) - len(with_lora) and ours_lora.fused_layers == 3


def test_an_sdxl_unet_decodes_ahead_beside_its_added_time_embedding(tiny_sdxl_model, native_build, monkeypatch):
    """SDXL's added-time embedding runs beside conv_in, on the prompt's pooled embedding and micro-conditioning: its
    blocks decode in the step's stream, every other block ahead, and the steps equal those of the same model decoding
    every block in the step's stream, and the decoded weights' within float32 rounding (CPU)."""
    from bf.models.added_condition import pack, pooled_dim
    from bf.runtime.backend_torch import TorchUNet
    from bf.runtime.compiled_weights import CompiledLowBitGroup

    monkeypatch.setenv("BF_DECODE_LIB", str(native_build / "libbf_decode.so"))
    decoded, packed = _tiny_unet(tiny_sdxl_model, "cpu", channels_last=False)
    assert any(n.startswith("add_embedding.") for n in packed)
    timesteps = torch.arange(900, -1, -100)
    opts = {"device": "cpu", "dtype": "float32", "channels_last": False, "cuda_graph": False}
    ref = TorchUNet(copy.deepcopy(decoded), timesteps, weights="fp", **opts)
    ours = TorchUNet(copy.deepcopy(decoded), timesteps, packed, weights="streamed", compile=True, ahead_slots=2, **opts)
    in_stream = TorchUNet(copy.deepcopy(decoded), timesteps, packed, weights="streamed", compile=True, **opts)
    assert ours.slot_bytes > 0
    groups = {n: m for n, m in ours.unet.named_modules() if isinstance(m, CompiledLowBitGroup)}
    assert {n for n, g in groups.items() if g.ahead is None} == {n for n in groups if n.startswith("add_embedding.")}
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 77, decoded.config.cross_attention_dim, generator=g)
    text_embeds = torch.randn(2, pooled_dim(decoded.config), generator=g)
    context = pack(hidden, text_embeds, torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    sample = torch.randn(2, 4, 8, 8, generator=g)
    with torch.inference_mode():
        for i in (0, 3):
            step = torch.tensor([i])
            out, want = ours.eager_step(sample, step, context), ref.eager_step(sample, step, context)
            assert torch.equal(out, in_stream.eager_step(sample, step, context))
            assert (out - want).abs().max().item() <= 1e-6 * want.abs().max().item()


@pytest.mark.parametrize("channels_last", [False, True])
def test_lora_changes_are_added_where_the_step_builds_the_weights(native_build, channels_last):
    """LoRA branches given to compile_weights as changes of the weights (up @ down, a convolution's in its stored
    layout) equal the same branches hooked beside the decoded-weight layers; a block's layers of one shape and rank
    take one batched product; a change that does not fit its layer is refused."""
    from torch import nn

    from bf.decode_kernels import load
    from bf.errors import BfError
    from bf.lora_adapters import LoRAHook
    from bf.runtime.compiled_weights import CompiledLowBitGroup, compile_weights
    from bf.runtime.streamed_weights import packed_weight

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(4, 8, 3, padding=1)
            self.q, self.k, self.v = (nn.Linear(8, 8, bias=False) for _ in range(3))
            self.o = nn.Linear(8, 6)

        def forward(self, x):
            h = torch.nn.functional.silu(self.c(x)).mean((2, 3))
            return self.o(self.q(h) + self.k(h) * self.v(h))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = nn.ModuleList([Block()])

        def forward(self, x):
            return self.transformer_blocks[0](x)

    torch.manual_seed(0)
    decoded, rng = Net(), np.random.default_rng(3)
    packed = {}
    for name in ("c", "q", "k", "v", "o"):
        full = f"transformer_blocks.0.{name}"
        shape = tuple(decoded.get_submodule(full).weight.shape)
        layer = QuantizedLayer.from_levels(full, rng.integers(-1, 2, shape), rng.random(shape[0]) * 0.2 + 0.05, Grid(2))
        decoded.get_submodule(full).weight.data = torch.from_numpy(layer.dequantize())
        packed[full] = packed_weight(layer, "cpu", channels_last)
    conv = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1)}
    hooks = {}
    for name, rank in (("c", 2), ("q", 2), ("k", 2), ("v", 2), ("o", 3)):
        full = f"transformer_blocks.0.{name}"
        w = decoded.get_submodule(full).weight
        down, up = torch.randn(rank, *w.shape[1:]) * 0.3, torch.randn(w.shape[0], rank, *((1, 1) if w.dim() == 4 else ())) * 0.3
        hooks[full] = LoRAHook(full, down, up, 0.7, conv if w.dim() == 4 else None)
    reference = copy.deepcopy(decoded)
    for full, hook in hooks.items():
        reference.get_submodule(full).register_forward_hook(hook)
    model = copy.deepcopy(decoded)
    deltas = {full: hook.weight_delta(channels_last) for full, hook in hooks.items()}
    compile_weights(model, packed, torch.float32, decoder=load(native_build / "libbf_decode.so"), deltas=deltas)
    group = model.transformer_blocks[0]
    assert isinstance(group, CompiledLowBitGroup)
    assert sorted(run[1] for run in group.lora_runs) == [1, 1, 3]  # q, k, v together; o and c alone
    x = torch.randn(2, 4, 5, 5)
    with torch.inference_mode():
        want = reference(x)
        assert (want - decoded(x)).abs().max() > 0.01  # the branches change the output (outputs up to 0.3)
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5 * want.abs().max().item())
        assert torch.equal(torch.compile(model, backend="aot_eager", fullgraph=True)(x), model(x))
    # an up projection wider than 1x1 is no change of the weight: that branch stays a hook
    assert LoRAHook("c", torch.randn(2, 4, 3, 3), torch.randn(8, 2, 3, 3), 1.0, conv).weight_delta(channels_last) is None
    wrong = {"transformer_blocks.0.o": (torch.randn(6, 2), torch.randn(2, 9))}
    with pytest.raises(BfError, match="LoRA's change of o is 6x9"):
        compile_weights(copy.deepcopy(decoded), packed, torch.float32, decoder=load(native_build / "libbf_decode.so"), deltas=wrong)


def test_keeping_whole_decode_kernels_removes_more_launches_than_the_smallest_layers():
    """fewest_launches_within keeps a group's layers of one packing whole, the smallest such kernels first, then the
    smallest single layers in what budget is left; decode_groups and decode_kernels count what the step then launches
    (an attention's projections around its transformer block decode alone until that block's group is gone)."""
    from bf.format.dequant_op import DequantSpec
    from bf.runtime.compiled_weights import decode_groups, decode_kernels, fewest_launches_within
    from bf.runtime.streamed_weights import PackedWeight, smallest_within

    empty = torch.empty(0)
    layout = {  # name: (elements, bits)
        "down.resnets.0.conv1": (2, 1), "down.resnets.0.conv2": (40, 1), "down.resnets.0.shortcut": (6, 2),
        "down.attentions.0.proj_in": (10, 1), "down.attentions.0.proj_out": (10, 1),
        "down.attentions.0.transformer_blocks.0.attn1.to_q": (5, 3),
        "mid.resnets.0.conv1": (3, 1), "mid.resnets.0.conv2": (30, 1), "conv_out": (9, 8),
    }  # fmt: skip
    packed = {n: PackedWeight(empty, empty, DequantSpec((e, 1), Grid(b))) for n, (e, b) in layout.items()}
    groups = decode_groups(list(packed))
    assert groups["down.attentions.0.proj_in"] == {"": "down.attentions.0.proj_in"}  # around the transformer block: alone
    assert (len(groups), decode_kernels(packed)) == (6, 7)  # resnets.0 runs two packings
    kept = fewest_launches_within(packed, 15)  # whole kernels to_q (5) and shortcut (6), then the smallest layer (2)
    assert kept == {"down.attentions.0.transformer_blocks.0.attn1.to_q", "down.resnets.0.shortcut", "down.resnets.0.conv1"}
    smallest = smallest_within({n: w.numel for n, w in packed.items()}, 15)  # 2 + 3 + 5: two of three leave a kernel
    assert smallest == {"down.resnets.0.conv1", "mid.resnets.0.conv1", "down.attentions.0.transformer_blocks.0.attn1.to_q"}
    rest = {n: w for n, w in packed.items() if n not in kept}
    attention = decode_groups(list(rest))["down.attentions.0"]  # its transformer block's group gone: its projections one
    assert attention == {"proj_in": "down.attentions.0.proj_in", "proj_out": "down.attentions.0.proj_out"}
    assert decode_kernels(rest) == 4 < decode_kernels({n: w for n, w in packed.items() if n not in smallest}) == 5
    # a layer the step decodes that cannot be kept (a LoRA's): the kernel it shares with conv1 is never whole
    lora = {"down.resnets.0.conv2": packed["down.resnets.0.conv2"]}
    keepable = {n: w for n, w in packed.items() if n not in lora}
    blind = fewest_launches_within(keepable, 11)  # conv1 (2) looks like a whole kernel of its own
    assert blind == {"down.resnets.0.conv1", "down.attentions.0.transformer_blocks.0.attn1.to_q", "mid.resnets.0.conv1"}
    seeing = fewest_launches_within(keepable, 11, fixed=lora)
    assert seeing == {"down.attentions.0.transformer_blocks.0.attn1.to_q", "down.resnets.0.shortcut"}
    left = {n: w for n, w in packed.items() if n not in seeing}  # (the LoRA layer among them)
    assert decode_kernels(left) == 4 < decode_kernels({n: w for n, w in packed.items() if n not in blind}) == 5
