"""Low-bit weights decoded inside a ``torch.compile``'d UNet (the torch backend's ``compile`` mode).

The decode kernels of plugins_trt are registered as PyTorch custom ops (``torch.library``, with fake
implementations that give the outputs' shapes), and the quantized Conv2d / Linear layers of a UNet
block (a ResNet, a transformer block, a resampler) are wrapped, block by block, in a
``CompiledLowBitGroup``: on every call it decodes the block's weights by one launch into one flat
buffer and runs the block with views of it as those weights (``torch.func.functional_call``). A
layer outside such a block, or beside one (an attention's projections around its transformer
blocks), is a group of one. Dynamo traces the whole UNet through these groups without a graph
break; inductor fuses the elementwise work around the convolutions and matrix products (where an
FP16 step spends about half its time). The step is then replayed from a CUDA graph, which also
captures the decode launches. About 80 launches a step on SD-v1.5 instead of 258.

Where the decode runs:
  in the step's stream   (``bf::lowbit_decode_group``) each group's buffer is a short-lived buffer of
                         inductor's plan, decoded just before the block: the decode's time adds to the step
  ahead                  (``decode_ahead``, ``bf::lowbit_decode_ahead``) each group's weights are decoded on
                         a side stream into one of a few persistent slots while the blocks before compute;
                         the block waits for its slot. Events order the two streams, so a CUDA graph
                         captures the fork and join. The order of the blocks comes from one forward.

Decoding ahead, a block's op takes a view of the block's input, which is computed from the previous
block's output: the compiler then issues it after every read of the previous block's weights, whose
slot the decode it starts overwrites. The op says it writes the block's slot, a tensor of the model's:
the compiler orders the block's reads of its weights after it, and its own buffers (which it reuses
freely) never take over a slot. A step that decodes ahead is compiled with ``AHEAD_COMPILE_OPTIONS``
(inductor's buffer reuse off: on SD-v1.5 its peak is 0.50 GB instead of 0.63 GB at the same speed) and
captured at ``STEP_PRIORITY``, above the decode stream's: where a block and a decode contend for the GPU,
the block's kernels are scheduled first.

Layers whose weight outweighs their compute (SD-v1.5's 8x8 convolutions) can instead read their codes in a fused
Triton kernel and never hold an FP16 weight (bf.runtime.compiled_fused: install those before compile_weights groups
the rest).

The weights are the decode kernels' output bit for bit (the ops run the same kernel as the other
modes), so the compiled step differs from an eager step with the same decoded weights only where
inductor changes the order of floating-point work around them.

LoRAs on the decoded layers are added to their weights in the step: ``weight + up @ down``, one batched
product (``baddbmm``) for each run of a group's layers of one shape and rank, which the group lays out side by
side in its buffer. A rank-16 LoRA on SD-v1.5's 128 attention projections is then 32 products a step instead
of 256 matrix products and their additions on the activations.
"""

from __future__ import annotations

import itertools
import math
import re
import weakref
from collections.abc import Callable

import torch
from torch import nn

from bf.errors import BfError
from bf.format.dequant_op import DequantSpec
from bf.module_paths import parent_and_attribute
from bf.runtime.streamed_weights import smallest_within

_DECODER: list = [None]  # the decode library the ops run (None: bf.decode_kernels.load(), found as bf.native says)

ALIGN = 128  # elements: every weight in a group's buffer starts 256-byte aligned, as cuDNN and cuBLAS like it

# The groups the ops decode, by id: (specs, offsets into the buffer, buffer length). The ops' schemas take plain
# ints, and the id keeps grids, packings and shapes out of the traced graph; one id per distinct list of specs,
# so building a model again adds nothing.
_GROUPS: list[tuple[tuple[DequantSpec, ...], tuple[int, ...], int]] = []
_GROUP_IDS: dict[tuple[DequantSpec, ...], int] = {}


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def group_id(specs: tuple[DequantSpec, ...]) -> int:
    if specs not in _GROUP_IDS:
        offsets, total = [], 0
        for spec in specs:
            offsets.append(total)
            total += _aligned(math.prod(spec.shape))
        _GROUP_IDS[specs] = len(_GROUPS)
        _GROUPS.append((specs, tuple(offsets), total))
    return _GROUP_IDS[specs]


def _library():
    lib = _DECODER[0]
    if lib is None:
        from bf.decode_kernels import load

        lib = _DECODER[0] = load()
    return lib


def _decode(codes: list[torch.Tensor], scales: list[torch.Tensor], group: int, flat: torch.Tensor, max_blocks: int = 0) -> None:
    """Group ``group``'s weights decoded into ``flat`` at their offsets, on the current stream (CPU: at once)."""
    specs, offsets, _ = _GROUPS[group]
    outs = [flat[o : o + math.prod(spec.shape)].view(spec.shape) for spec, o in zip(specs, offsets, strict=True)]
    lib = _library()
    if flat.is_cuda:
        lib.decode_cuda_batch(list(zip(codes, scales, specs, strict=True)), outs, max_blocks)
    else:  # tests, tracing checks: the library's CPU path, in float32
        for c, sc, spec, out in zip(codes, scales, specs, outs, strict=True):
            out.copy_(torch.from_numpy(lib.decode_cpu(c.numpy(), sc.numpy(), spec)))


@torch.library.custom_op("bf::lowbit_decode_group", mutates_args=())
def lowbit_decode_group(codes: list[torch.Tensor], scales: list[torch.Tensor], group: int, dtype: torch.dtype) -> torch.Tensor:
    """The weights of group ``group`` (see ``group_id``) decoded into one new flat buffer, each at its offset."""
    flat = torch.empty(_GROUPS[group][2], dtype=dtype, device=codes[0].device)
    _decode(codes, scales, group, flat)
    return flat


@lowbit_decode_group.register_fake
def _(codes: list[torch.Tensor], scales: list[torch.Tensor], group: int, dtype: torch.dtype) -> torch.Tensor:
    return codes[0].new_empty(_GROUPS[group][2], dtype=dtype)


# Inductor's options for a step that decodes ahead. Its plan reusing buffers (by default) raised SD-v1.5's peak by
# 0.06-0.13 GB with the slots held beside it, at the same step time (BENCHMARKS.md).
AHEAD_COMPILE_OPTIONS = {"allow_buffer_reuse": False, "inplace_buffers": False}

# The CUDA priority a step that decodes ahead is captured at (PyTorch clamps it to the highest priority it creates
# streams at, -3 in PyTorch 2.11); the decode stream stays at 0, the lowest. PyTorch's graphs keep each kernel's
# captured priority.
STEP_PRIORITY = -5


class _Schedule:
    """Decoding ahead: a model's groups in the order its forward calls them, the slots they decode into (group i
    into slot i % slots), the side stream, and the event of each group's pending decode."""

    def __init__(self, order: list, slots: list[torch.Tensor], priority: int, max_blocks: int):
        self.order, self.slots, self.max_blocks = order, slots, max_blocks
        self.side = torch.cuda.Stream(slots[0].device, priority=priority) if slots[0].is_cuda else None
        self.ready: dict[int, torch.cuda.Event] = {}
        self.next = 0

    def slot(self, i: int) -> torch.Tensor:
        """Group i's slot."""
        return self.slots[i % len(self.slots)]

    def start(self, i: int) -> None:
        """Decode group i into its slot on the side stream, after the work issued so far on the current stream."""
        g, slot = self.order[i], self.slot(i)
        if self.side is None:
            _decode(g.codes, g.scales, g.group, slot)
            return
        free = torch.cuda.Event()
        free.record(torch.cuda.current_stream(slot.device))
        self.side.wait_event(free)
        with torch.cuda.stream(self.side):
            _decode(g.codes, g.scales, g.group, slot, self.max_blocks)
        self.ready[i] = torch.cuda.Event()
        self.ready[i].record(self.side)

    def wait(self, i: int) -> None:
        ready = self.ready.pop(i, None)
        if ready is not None:
            torch.cuda.current_stream(self.slots[0].device).wait_event(ready)


# Schedules by id (the op's schema takes an int); held by their groups, so a model's slots go with it.
_SCHEDULES: weakref.WeakValueDictionary[int, _Schedule] = weakref.WeakValueDictionary()
_SCHEDULE_IDS = itertools.count()


@torch.library.custom_op("bf::lowbit_decode_ahead", mutates_args=("slot",))
def lowbit_decode_ahead(slot: torch.Tensor, after: torch.Tensor, schedule: int, index: int) -> None:
    """Group ``index`` of schedule ``schedule``: start the decode due now (the first group starts one per slot,
    each later group the one ``slots - 1`` ahead, into the slot the previous group has just used), then wait for
    this group's decode into ``slot``, its slot.

    The op says it writes ``slot``: the compiler then orders every read of the group's weights (views of the slot)
    after it, and the slots stay tensors of the model's, never buffers of the compiler's plan that it could reuse.
    ``after`` is the group's input, computed from the previous group's output: taking it makes the compiler issue
    this op after every read of the previous group's weights, whose slot the decode started here overwrites."""
    s = _SCHEDULES[schedule]
    if index not in (s.next, 0):  # the first block starts a step anew, also after one that stopped half-way
        raise BfError(f"the compiled low-bit step ran block {index} where its schedule expected block {s.next}: "
                      "the model's forward changed its order of blocks; build it again")  # fmt: skip
    s.next = (index + 1) % len(s.order)
    n = len(s.slots)
    for j in range(n) if index == 0 else range(index + n - 1, min(index + n, len(s.order))):
        s.start(j)
    s.wait(index)
    mine = s.slot(index)
    if slot.data_ptr() != mine.data_ptr():  # a functional trace handed a copy of the slot (inductor hands the slot)
        slot.copy_(mine)


@lowbit_decode_ahead.register_fake
def _(slot: torch.Tensor, after: torch.Tensor, schedule: int, index: int) -> None:
    return None


class CompiledLowBitGroup(nn.Module):
    """A block (or a single layer) whose quantized layers' weights are decoded together, by one launch, on every call.

    The layers keep their place in the block with an empty placeholder weight; each call decodes the
    group's buffer (or, decoding ahead, waits for its slot and starts the decodes it is due to start)
    and runs the block with views of it as those weights (``torch.func.functional_call``)."""

    def __init__(self, block: nn.Module, members: dict[str, object], dtype: torch.dtype, deltas: dict | None = None):
        super().__init__()
        self.block = block
        deltas = deltas or {}
        # the layers whose weight takes a LoRA's change first, same shapes and ranks side by side: each run of them
        # then lies in the buffer at one stride, and one batched product adds all their changes
        order = sorted(members, key=lambda n: (0, tuple(members[n].spec.shape), deltas[n][0].shape[1]) if n in deltas else (1,))
        members = {n: members[n] for n in order}
        self.names = list(members)  # "" for a group of one layer: the block is the layer
        packed = list(members.values())
        # plain attributes, not buffers: moving the model to float16 must not round the float32 scales
        self.codes, self.scales = [w.codes for w in packed], [w.scale for w in packed]
        self.layouts = [(math.prod(w.spec.shape), tuple(w.spec.shape), w.channels_last) for w in packed]
        self.group, self.dtype = group_id(tuple(w.spec for w in packed)), dtype
        self.offsets = _GROUPS[self.group][1]
        self.size = _GROUPS[self.group][2]
        self.ahead: tuple[int, int] | None = None  # decoding ahead: (schedule id, index in it)
        self.schedule: _Schedule | None = None  # decoding ahead: holds the schedule (and its slots) while the model lives
        for name, w in zip(self.names, packed, strict=True):  # where the layer runs: a group made on a moved model stays there
            block.get_submodule(name).weight = nn.Parameter(torch.empty(0, device=w.codes.device, dtype=dtype), requires_grad=False)
        self.lora_runs = _delta_runs(self.names, self.layouts, deltas)

    def forward(self, *args, **kwargs):
        if self.ahead is None:
            flat = torch.ops.bf.lowbit_decode_group(self.codes, self.scales, self.group, self.dtype)
        else:
            x = _input(args, kwargs)  # its first element: a dependency on the input that costs no copy of it
            slot = self.schedule.slot(self.ahead[1])
            torch.ops.bf.lowbit_decode_ahead(slot, x[(0,) * x.dim()], *self.ahead)
            flat = slot[: self.size]
        stored = [flat[o : o + n].view(shape) for o, (n, shape, _) in zip(self.offsets, self.layouts, strict=True)]
        for first, count, stride, up, down in self.lora_runs:  # LoRAs: weight + up @ down, one product per run
            n, shape, _ = self.layouts[first]
            o = self.offsets[first]
            base = flat[o : o + count * stride].view(count, stride)[:, :n].view(count, shape[0], n // shape[0])
            changed = torch.baddbmm(base, up, down)
            for j in range(count):
                stored[first + j] = changed[j].view(shape)
        weights = {}
        for name, w, (_, _, channels_last) in zip(self.names, stored, self.layouts, strict=True):
            weights[f"{name}.weight" if name else "weight"] = w.permute(0, 3, 1, 2) if channels_last else w
        return torch.func.functional_call(self.block, weights, args, kwargs)


def _delta_runs(names: list[str], layouts: list, deltas: dict) -> list[tuple]:
    """The group's LoRA changes as runs of consecutive layers of one shape and rank: (first layer, count, stride
    in the buffer, ups stacked (count, out, rank), downs stacked (count, rank, k))."""
    runs: list[tuple] = []
    i = 0
    while i < len(names) and names[i] in deltas:
        j = i
        while j + 1 < len(names) and names[j + 1] in deltas and layouts[j + 1][1] == layouts[i][1] \
                and deltas[names[j + 1]][0].shape == deltas[names[i]][0].shape:  # fmt: skip
            j += 1
        n, shape, _ = layouts[i]
        for name in names[i : j + 1]:
            up, down = deltas[name]
            if up.shape[0] != shape[0] or up.shape[0] * down.shape[1] != n:
                raise BfError(f"a LoRA's change of {name or 'the layer'} is {up.shape[0]}x{down.shape[1]}, its weight {shape}")
        stride = _aligned(n)  # where each next layer of the run starts (group_id lays them out so)
        ups = torch.stack([deltas[name][0] for name in names[i : j + 1]])
        downs = torch.stack([deltas[name][1] for name in names[i : j + 1]])
        runs.append((i, j - i + 1, stride, ups, downs))
        i = j + 1
    return runs


def _input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A block's input (its hidden states): the first tensor it is called with."""
    return next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))


# The blocks whose layers decode together: the innermost ResNet, transformer block, attention, or resampler a
# layer sits in, by its module name in a diffusers UNet.
_BLOCK = re.compile(r"^(.*\b(?:resnets|transformer_blocks|attentions|downsamplers|upsamplers)\.\d+)\.(.+)$")
# With sub_blocks: a transformer block's attentions and feed-forward (attn1, attn2, ff) are blocks of their own. Each
# is called on a normalization of the previous one's output, so they stay on the chain a decode ahead follows.
_SUB_BLOCK = re.compile(r"^(.*\btransformer_blocks\.\d+\.(?:attn\d+|ff))\.(.+)$")


def compile_weights(owner: nn.Module, packed: dict, dtype: torch.dtype, decoder=None, by_block: bool = True,
                    deltas: dict | None = None, sub_blocks: bool = False) -> int:  # fmt: skip
    """Make every layer of ``owner`` named in ``packed`` (name -> bf.runtime.streamed_weights.PackedWeight, already on
    the device the model runs on) decode its weight from the codes on every call, in place; returns how many.

    ``by_block``: the layers of one block decode together (a CompiledLowBitGroup around the block); a layer
    outside every block, or in a block that holds another group (an attention's projections around its
    transformer blocks), decodes alone, so groups never nest. Otherwise every layer alone. ``sub_blocks`` (with
    ``by_block``): a transformer block's self-attention, cross-attention and feed-forward decode as groups of their
    own, so that a step decoding ahead waits for a third of such a block's weights before it starts it, and its slots
    need only hold the largest third. (A transformer block with other quantized layers, such as an adaptive norm's
    linear layer, keeps those as groups of one, as around any other group.)

    ``deltas``: LoRAs as changes of the weights (name -> (up, down), bf.lora_adapters.LoRAHooks.take_weight_deltas),
    added to the decoded weights in the step: the base stays packed codes, and nothing dense is kept."""
    deltas = deltas or {}
    if sub_blocks and not by_block:
        raise BfError("compiled weights: sub_blocks splits blocks into smaller groups; with by_block=False every layer is a group already")
    if decoder is not None:
        _DECODER[0] = decoder
    for name, pw in packed.items():
        module = owner.get_submodule(name)
        stored = tuple(pw.spec.shape)
        if _model_shape(stored, pw.channels_last) != tuple(module.weight.shape):
            raise BfError(f"compiled weights: {name} holds a {stored} weight, the model's is {tuple(module.weight.shape)}")
    groups = {block: {member: packed[name] for member, name in members.items()}
              for block, members in decode_groups(list(packed), by_block, sub_blocks).items()}  # fmt: skip
    for block, members in groups.items():
        parent, child = parent_and_attribute(owner, block)
        mine = {m: deltas[full] for m in members if (full := f"{block}.{m}" if m else block) in deltas}
        setattr(parent, child, CompiledLowBitGroup(getattr(parent, child), members, dtype, mine))
    return len(packed)


def decode_groups(names: list[str], by_block: bool = True, sub_blocks: bool = False) -> dict[str, dict[str, str]]:
    """How compile_weights groups the layers ``names``: block -> {member: layer name} (member "" for a layer alone)."""
    groups: dict[str, dict] = {}
    for name in names:
        m = ((sub_blocks and _SUB_BLOCK.match(name)) or _BLOCK.match(name)) if by_block else None
        block, member = (m[1], m[2]) if m else (name, "")
        groups.setdefault(block, {})[member] = name
    for block in [b for b in groups if any(other.startswith(b + ".") for other in groups)]:
        for member, name in groups.pop(block).items():  # around another group: its layers alone
            groups[f"{block}.{member}"] = {"": name}
    return groups


def decode_kernels(packed: dict, by_block: bool = True, sub_blocks: bool = False) -> int:
    """Kernels the step's decode launches for the layers of ``packed`` (name -> PackedWeight) grouped as
    compile_weights groups them (``by_block``, ``sub_blocks``): one per packing in each group (the decode kernel is
    compiled per packing; a packing whose rows are no multiple of 8 values takes a second, scalar kernel, and a
    group of more than 384 weights a second launch, neither counted here: none of SD-v1.5's groups has either)."""
    groups = decode_groups(list(packed), by_block, sub_blocks)
    return sum(len({packed[n].spec.grid for n in members.values()}) for members in groups.values())


def fewest_launches_within(packed: dict, budget: int, fixed: dict | None = None, by_block: bool = True,
                           sub_blocks: bool = False) -> set:  # fmt: skip
    """Names of the layers of ``packed`` (name -> PackedWeight) to keep decoded within ``budget`` elements so that the
    step's decode runs the fewest kernels: whole decode kernels (a group's layers of one packing, as compile_weights
    groups them with ``by_block`` and ``sub_blocks``), the smallest first, then the smallest single layers in what is
    left. ``fixed``: layers the step decodes that cannot be kept (name -> PackedWeight; a layer with a LoRA): a
    kernel that holds one is never whole. A kernel costs the step's decode about 2.7 us besides its bytes (SD-v1.5 on
    an H200, benchmarks/sd15_step_decode_launches.py: whole kernels took its decode from 0.400 to 0.352 ms at 150 MB
    kept), so the same bytes kept as whole kernels save more than the smallest layers scattered over many."""
    fixed = fixed or {}
    both = packed | fixed
    units: dict[tuple, list[str]] = {}
    for block, members in decode_groups(list(both), by_block, sub_blocks).items():
        for name in members.values():
            units.setdefault((block, both[name].spec.grid), []).append(name)
    keep, used = set(), 0
    whole = [names for names in units.values() if not any(n in fixed for n in names)]
    for names in sorted(whole, key=lambda ns: sum(packed[n].numel for n in ns)):
        size = sum(packed[n].numel for n in names)
        if used + size <= budget:
            keep.update(names)
            used += size
    return keep | smallest_within({n: w.numel for n, w in packed.items() if n not in keep}, budget - used)


def _model_shape(stored: tuple, channels_last: bool) -> tuple:
    """The module's weight shape for codes stored in ``stored`` shape ((O, kh, kw, I) when channels-last)."""
    return (stored[0], stored[3], stored[1], stored[2]) if channels_last else stored


def grouped_paths(owner: nn.Module) -> dict[str, str]:
    """Where each grouped layer is now: its name in the model before ``compile_weights`` -> its module path inside its
    group (a group holds its block as ``block``)."""
    paths = {}
    for name, group in owner.named_modules():
        if isinstance(group, CompiledLowBitGroup):
            paths |= {f"{name}.{m}" if m else name: f"{name}.block.{m}" if m else f"{name}.block" for m in group.names}
    return paths


def ungroup(owner: nn.Module) -> int:
    """Undo ``compile_weights``: every group gives its block back, each of the group's layers with a weight on the meta
    device of the shape the model had (no memory; ``compile_weights`` checks it against the codes), so the layers can
    be grouped again, some of them first swapped for others (bf.runtime.compiled_fused.install_fused). Returns how
    many groups there were. A group decoding ahead goes with its slots."""
    groups = [(name, m) for name, m in owner.named_modules() if isinstance(m, CompiledLowBitGroup)]
    for name, group in groups:
        for member, (_, stored, channels_last) in zip(group.names, group.layouts, strict=True):
            layer = group.block.get_submodule(member)  # "" is the block itself: a group of one layer
            shape = _model_shape(stored, channels_last)
            layer.weight = nn.Parameter(torch.empty(shape, device="meta", dtype=group.dtype), requires_grad=False)
        parent, child = parent_and_attribute(owner, name)
        setattr(parent, child, group.block)
    return len(groups)


def decode_ahead(owner: nn.Module, run_once: Callable[[], object], slots: int = 2, priority: int = 0, max_blocks: int = 0,
                 log: Callable[[str], None] = lambda msg: None) -> int:  # fmt: skip
    """Decode ``owner``'s compiled groups ahead, on a side stream, into ``slots`` persistent buffers (2 or more):
    while a block computes, the next ``slots - 1`` blocks' weights are decoded. ``run_once`` runs one forward
    (any input shape; autograd records it), whose order of blocks is the
    schedule. A group that runs twice is refused (a BfError names it). The schedule is the chain of groups that
    ends with the last one to run, each group in it run on an input computed from the previous one's output, so
    that the data orders their decodes whatever the compiler reorders; groups off that chain (a side branch such
    as SDXL's added-time embedding, which runs beside ``conv_in``, or a group that did not run) decode on their
    own, in the step's stream, and ``log`` names them. ``priority``: the side stream's CUDA priority (-1: high);
    ``max_blocks`` caps each decode launch's grid (0: no cap). Returns the slots' bytes."""
    if slots < 2:
        raise BfError(f"decoding ahead needs 2 or more slots, got {slots}")
    groups = {m: name for name, m in owner.named_modules() if isinstance(m, CompiledLowBitGroup)}
    for g in groups:
        g.ahead, g.schedule = None, None
    calls: list[tuple[CompiledLowBitGroup, torch.Tensor, torch.Tensor]] = []  # (group, its input, its output)

    def record(m, args, kwargs, out):
        if not isinstance(out, torch.Tensor):
            raise BfError(f"decoding ahead needs blocks that return a tensor; {groups[m]} returns {type(out).__name__}")
        # the output as a fresh leaf seen through a view: what is computed from it has that view in its autograd record
        marker = out.detach().requires_grad_().view_as(out)
        calls.append((m, _input(args, kwargs), marker))
        return marker

    hooks = [g.register_forward_hook(record, with_kwargs=True) for g in groups]
    try:
        with torch.inference_mode(False), torch.enable_grad():  # autograd records what each activation was computed from
            run_once()
    finally:
        for h in hooks:
            h.remove()
    ran = [g for g, _, _ in calls]
    twice = next((g for i, g in enumerate(ran) if g in ran[:i]), None)
    if twice is not None:
        raise BfError(f"decoding ahead needs a model that runs each of its blocks once per forward; {groups[twice]} ran twice")
    if not calls:
        return 0
    chain = [calls[-1]]  # from the last group back: one reachability walk per group
    for call in reversed(calls[:-1]):
        if _computed_from(chain[-1][1], call[2]):
            chain.append(call)
    order = [g for g, _, _ in reversed(chain)]
    off = [groups[g] for g in groups if g not in order]
    if off:
        shown = ", ".join(off[:6]) + (f" and {len(off) - 6} more" if len(off) > 6 else "")
        log(f"decoding ahead: {len(order)} of {len(groups)} blocks; {shown} decode in the step's stream (off the chain of blocks)")
    sizes = [max(g.size for g in order[s::slots]) for s in range(min(slots, len(order)))]
    device = order[0].codes[0].device
    buffers = [torch.empty(n, dtype=order[0].dtype, device=device) for n in sizes]
    schedule, key = _Schedule(order, buffers, priority, max_blocks), next(_SCHEDULE_IDS)
    _SCHEDULES[key] = schedule
    for i, g in enumerate(order):
        g.ahead, g.schedule = (key, i), schedule
    return sum(b.nbytes for b in buffers)


def _computed_from(t: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether autograd's record says ``t`` was computed from ``source``."""
    if t is source:
        return True
    target = source.grad_fn
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is target:
            return True
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return False


def packed_bytes(owner: nn.Module) -> int:
    """Resident bytes of the compiled groups' codes and scales."""
    return sum(sum(c.nbytes for c in m.codes) + sum(c.nbytes for c in m.scales) for m in owner.modules()
               if isinstance(m, CompiledLowBitGroup))  # fmt: skip


def decode_launches(owner: nn.Module) -> int:
    """Decode launches of one forward: one per group."""
    return sum(isinstance(m, CompiledLowBitGroup) for m in owner.modules())
