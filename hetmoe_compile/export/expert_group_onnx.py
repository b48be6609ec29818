"""The ONNX body of an expert group, built from standard ops (numpy weights in, no torch).

Interface ``(hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) -> partial output [T, H]``, the same as
``hetmoe::expert_group``. Compute scales with routed tokens: per expert, ``NonZero`` finds the (token, slot) pairs
routed to it, ``Gather`` picks those tokens and two ``Gemm`` run the expert; one ``ScatterND`` places every
weighted expert output at its (token, slot) row, and a sum over the K slots gives the result. Each expert's
matrices are separate initializers named ``L<layer>.E<expert>.<matrix>`` in canonical ``[out, in]`` layout, ready
for a toolchain to program.

With a :class:`ProgrammedExpert` per expert the body instead simulates one AIMC hardware instance exactly as
``hetmoe::analog_expert_group`` does: noise management (abs-max per token and tile, or constant with calibrated
input ranges) and DAC rounding and clipping, the MVM on the programmed (noisy, drifted) normalised weights, output
noise, ADC rounding and clipping per tile, then the tiles' digital sum scaled back to weight units.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
from onnx import TensorProto, helper

from ..base.errors import HetMoEError
from .graph_builder import Deferred, GraphBuilder, materialize
from .matmul_nbits import check_block, pack_matmul_nbits


class LazyArray(Protocol):
    """An array read only when needed (e.g. :class:`~.tensor_store.LazyTensor`)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def nbytes(self) -> int: ...

    def load(self) -> np.ndarray: ...


@dataclass(frozen=True)
class ExpertArrays:
    """One expert's canonical weights: ``gate_up [2I, H]`` (gate rows first), ``down [H, I]``, optional biases.
    Arrays may be lazy tensors (``shape``, ``dtype``, ``load()``): they are read when the partition is written."""

    expert_id: int
    gate_up: np.ndarray | LazyArray
    down: np.ndarray | LazyArray
    gate_up_bias: np.ndarray | LazyArray | None = None
    down_bias: np.ndarray | LazyArray | None = None


@dataclass(frozen=True)
class ProgrammedExpert:
    """One expert as programmed on tiles: normalised weights ``[out, C, T]`` and scales ``[out, C]`` per matrix
    (numpy arrays, or lazy objects with ``shape`` and ``load()``); with constant noise management, each matrix's
    input range per input tile."""

    gate_up_weight: np.ndarray | LazyArray
    gate_up_scale: np.ndarray | LazyArray
    down_weight: np.ndarray | LazyArray
    down_scale: np.ndarray | LazyArray
    gate_up_range: np.ndarray | None = None  # [C] calibrated input ranges (constant noise management)
    down_range: np.ndarray | None = None


@dataclass(frozen=True)
class Activation:
    """The experts' gated activation (see ``hetmoe_compile.ir.expert_group.activate``)."""

    kind: str = "glu"  # "glu" or "gpt_oss_glu"
    act_name: str = "silu"
    alpha: float = 0.0
    limit: float = 0.0


@dataclass(frozen=True)
class TilePeriphery:
    """DAC/ADC settings of the simulated tiles (``Periphery`` of the analog package, as plain floats)."""

    inp_res: float
    out_res: float
    out_noise: float
    out_bound: float
    noise_seed: int = 0
    w_noise: float = 0.0
    w_noise_pcm: bool = True
    ir_drop: float = 0.0
    ir_drop_g_ratio: float = 1.0 / 0.35 / 5e-6
    bound_management: bool = False
    max_bm_factor: float = 1000.0
    max_bm_res: float = 0.25


SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
MOE_DOMAIN = "com.microsoft"
"""ONNX Runtime's contrib-op domain (``MoE``, ``MatMulNBits``)."""


def expert_group_body(
    b: GraphBuilder,
    hidden: str,
    top_k_index: str,
    top_k_weights: str,
    output: str,
    experts: list[ExpertArrays],
    act: Activation,
    dtype: np.dtype,
    programmed: list[ProgrammedExpert] | None = None,
    periphery: TilePeriphery | None = None,
    layer: int = 0,
    lowbit: tuple[int, int] | None = None,
) -> None:
    """Append the nodes computing ``output`` from the three routing inputs to ``b``. ``lowbit = (bits,
    group_size)``: the experts' matrices as ``com.microsoft::MatMulNBits`` weights (low-bit digital experts)."""
    if programmed is not None and (periphery is None or len(programmed) != len(experts)):
        raise ValueError("a programmed instance needs one ProgrammedExpert per expert and a TilePeriphery")
    dtype = np.dtype(dtype)
    routing = b.op("Shape", [top_k_index], "routing_shape")  # [T, K]
    k = b.op("Gather", [routing, b.scalar(1, np.int64)], "k")
    ys, slots = [], []
    for i, ex in enumerate(experts):
        p = f"L{layer}.E{ex.expert_id}."
        hit = b.op("Equal", [top_k_index, b.scalar(ex.expert_id, np.int64)], "hit")
        pairs = b.op("NonZero", [hit], "pairs")  # [2, n]: (token, slot)
        tok = b.op("Gather", [pairs, b.scalar(0, np.int64)], "tok", axis=0)  # [n]
        slot = b.op("Gather", [pairs, b.scalar(1, np.int64)], "slot", axis=0)
        w = b.op("GatherND", [top_k_weights, b.op("Transpose", [pairs], perm=[1, 0])], "w")  # [n]
        x = b.op("Gather", [hidden, tok], "x", axis=0)  # [n, H]
        if lowbit is not None:
            h = _linear_nbits(
                b, x, ex.gate_up, _bias(b, p + "gate_up_bias", ex.gate_up_bias), p + "gate_up", lowbit, dtype
            )
            h = _activate(b, h, act, dtype, ex.gate_up.shape[0] // 2)
            y = _linear_nbits(b, h, ex.down, _bias(b, p + "down_bias", ex.down_bias), p + "down", lowbit, dtype)
        elif programmed is None:
            h = _linear(
                b, x, b.const(p + "gate_up", ex.gate_up, public=True), _bias(b, p + "gate_up_bias", ex.gate_up_bias)
            )
            h = _activate(b, h, act, dtype, ex.gate_up.shape[0] // 2)
            y = _linear(b, h, b.const(p + "down", ex.down, public=True), _bias(b, p + "down_bias", ex.down_bias))
        else:
            assert periphery is not None  # checked on entry: a programmed instance comes with its periphery
            prog = programmed[i]
            h = _tiled(
                b,
                x,
                ex.gate_up.shape[1],
                prog.gate_up_weight,
                prog.gate_up_scale,
                periphery,
                p + "gate_up",
                dtype,
                prog.gate_up_range,
            )
            if ex.gate_up_bias is not None:
                h = b.op("Add", [h, b.const(p + "gate_up_bias", ex.gate_up_bias, public=True)])
            h = _activate(b, h, act, dtype, ex.gate_up.shape[0] // 2)
            y = _tiled(
                b, h, ex.down.shape[1], prog.down_weight, prog.down_scale, periphery, p + "down", dtype, prog.down_range
            )
            if ex.down_bias is not None:
                y = b.op("Add", [y, b.const(p + "down_bias", ex.down_bias, public=True)])
        ys.append(b.op("Mul", [y, b.op("Unsqueeze", [w, b.vector([1])])], "y"))
        slots.append(b.op("Add", [b.op("Mul", [tok, k]), slot], "flat_slot"))  # token * K + slot
    width = b.op("Slice", [b.op("Shape", [hidden]), b.vector([1]), b.vector([2])], "width")  # [H]
    if not experts:
        zeros = b.op("ConstantOfShape", [b.op("Shape", [hidden])], "zeros", value=_zero(dtype))
        b.op("Identity", [zeros], outputs=[output])
        return
    # Every (token, slot) pair belongs to exactly one expert, so the scatter indices are unique (a scatter-add
    # with repeated indices is not deterministic in ONNX Runtime's multi-threaded kernel); the K slots of each
    # token are then summed.
    pairs_shape = b.op("Concat", [b.op("ReduceProd", [routing], keepdims=1), width], "pairs_shape", axis=0)
    zeros = b.op("ConstantOfShape", [pairs_shape], "zeros", value=_zero(dtype))  # [T*K, H]
    y = ys[0] if len(ys) == 1 else b.op("Concat", ys, "ys", axis=0)
    flat = slots[0] if len(slots) == 1 else b.op("Concat", slots, "slots", axis=0)
    per_slot = b.op("ScatterND", [zeros, b.op("Unsqueeze", [flat, b.vector([1])], "index"), y], "per_slot")
    per_slot = b.op("Reshape", [per_slot, b.op("Concat", [routing, width], "tkh", axis=0)])  # [T, K, H]
    b.op("ReduceSum", [per_slot, b.vector([1])], outputs=[output], keepdims=0)


def _zero(dtype: np.dtype):
    return helper.make_tensor("v", helper.np_dtype_to_tensor_dtype(dtype), [1], [0])


def _bias(b: GraphBuilder, name: str, bias: np.ndarray | LazyArray | None) -> str | None:
    return None if bias is None else b.const(name, bias, public=True)


def _linear(b: GraphBuilder, x: str, weight: str, bias: str | None) -> str:
    """``x @ W.T (+ bias)`` with ``W`` kept in ``[out, in]`` layout."""
    return b.op("Gemm", [x, weight] + ([bias] if bias else []), "lin", transB=1)


def _linear_nbits(
    b: GraphBuilder, x: str, weight, bias: str | None, name: str, lowbit: tuple[int, int], dtype: np.dtype
) -> str:
    """``x @ W.T (+ bias)`` with ``W`` as ``bits``-bit group-wise integers (``com.microsoft::MatMulNBits``)."""
    bits, block = lowbit
    n, k = weight.shape
    check_block(k, block)
    packed_shape = (n, k // block, block * bits // 8)

    @lru_cache(maxsize=1)
    def pack() -> tuple[np.ndarray, np.ndarray]:
        return pack_matmul_nbits(materialize(weight), bits, block)

    q = b.const(name + f".int{bits}", Deferred(packed_shape, np.uint8, lambda: pack()[0]), public=True)
    s = b.const(name + ".scales", Deferred((n * k // block,), dtype, lambda: pack()[1].astype(dtype)), public=True)
    y = b.op("MatMulNBits", [x, q, s], "lin", domain=MOE_DOMAIN, K=k, N=n, bits=bits, block_size=block)
    return b.op("Add", [y, bias]) if bias else y


def _activate(b: GraphBuilder, h: str, act: Activation, dtype: np.dtype, inter: int) -> str:
    gate, up = b.multi_op("Split", [h, b.vector([inter, inter])], 2, axis=-1)
    if act.kind == "glu":
        return b.op("Mul", [_act(b, gate, act.act_name), up], "act")
    if act.kind == "gpt_oss_glu":
        lim = b.scalar(act.limit, dtype)
        gate = b.op("Min", [gate, lim])
        up = b.op("Clip", [up, b.scalar(-act.limit, dtype), lim])
        glu = b.op("Mul", [gate, b.op("Sigmoid", [b.op("Mul", [gate, b.scalar(act.alpha, dtype)])])])
        return b.op("Mul", [b.op("Add", [up, b.scalar(1, dtype)]), glu], "act")
    raise HetMoEError(f"expert activation '{act.kind}' has no ONNX body; supported: glu, gpt_oss_glu")


def _act(b: GraphBuilder, x: str, name: str) -> str:
    if name == "silu":
        return b.op("Mul", [x, b.op("Sigmoid", [x])], "silu")
    if name == "gelu":
        return b.op("Gelu", [x])
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return b.op("Gelu", [x], approximate="tanh")
    if name == "relu":
        return b.op("Relu", [x])
    raise HetMoEError(
        f"expert activation function '{name}' has no ONNX body; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
    )


def _tiled(
    b: GraphBuilder,
    x: str,
    n_in: int,
    weight: np.ndarray | LazyArray,
    scale: np.ndarray | LazyArray,
    io: TilePeriphery,
    name: str,
    dtype: np.dtype,
    ranges: np.ndarray | None = None,
) -> str:
    """``x [n, in] -> [n, out]`` through the tiles of one programmed matrix (mirrors ``analog.tiles``); ``ranges
    [C]``: constant noise management with these input ranges (abs-max without)."""
    out, c, t = weight.shape
    xf = b.op("Cast", [x], to=TensorProto.FLOAT) if dtype != np.float32 else x
    pad = c * t - n_in
    if pad:
        xf = b.op("Pad", [xf, b.vector([0, 0, 0, pad])])
    xt = b.op("Transpose", [b.op("Reshape", [xf, b.vector([-1, c, t])])], "xt", perm=[1, 0, 2])  # [C, n, T]
    if ranges is None:
        nm = b.op("ReduceMax", [b.op("Abs", [xt]), b.vector([-1])], "nm", keepdims=1)
        nm = b.op("Max", [nm, b.scalar(1e-30, np.float32)])
    else:  # one input range per tile, broadcast over the tokens
        nm = b.const(name + ".input_range", np.asarray(ranges, dtype=np.float32).reshape(c, 1, 1), public=True)
    in_step = io.inp_res * 2.0 if io.inp_res > 0 else 1.0
    bound = 1.0 / in_step  # the DAC's largest level
    levels = b.op("Div", [xt, b.op("Mul", [nm, b.scalar(in_step, np.float32)])], "levels")
    w = b.const(
        name + ".programmed",
        Deferred(
            (c, t, out),
            np.float32,
            lambda: np.ascontiguousarray(materialize(weight).transpose(1, 2, 0), dtype=np.float32),
        ),
        public=True,
    )

    def one_round(lv: str, seed: int) -> tuple[str, float, str | None]:
        """The tiles on DAC levels ``lv``: ``(outputs, their unit, which (tile, token) saturated)``."""
        if io.inp_res > 0:
            lv = b.op("Round", [lv])
        if ranges is not None:  # inputs beyond the range saturate the DAC (abs-max levels never exceed it)
            lv = b.op("Clip", [lv, b.scalar(-bound, np.float32), b.scalar(bound, np.float32)])
        y = b.op("MatMul", [lv, w], "tile")  # [C, n, out] in DAC steps
        unit = in_step
        if io.ir_drop > 0 or io.w_noise > 0:
            y = _nonidealities(b, y, lv, w, n_in, c, t, unit, replace(io, noise_seed=seed))
        fail = None
        if io.out_res > 0 or io.out_noise > 0:
            out_step = io.out_res * 2.0 * io.out_bound if io.out_res > 0 else 1.0
            y = b.op("Mul", [y, b.scalar(unit / out_step, np.float32)])
            if io.out_noise > 0:
                noise = _normal_like(b, y, "noise", io.out_noise / out_step, seed)
                y = b.op("Add", [y, noise])
            if io.out_res > 0:
                y = b.op("Round", [y])
            limit = io.out_bound / out_step
            if io.bound_management:
                peak = b.op("ReduceMax", [b.op("Abs", [y]), b.vector([-1])], "peak", keepdims=1)  # [C, n, 1]
                fail = b.op("Greater", [peak, b.scalar(limit, np.float32)], "saturated")
            y = b.op("Clip", [y, b.scalar(-limit, np.float32), b.scalar(limit, np.float32)])
            unit = out_step
        return y, unit, fail

    y, unit, fail = one_round(levels, io.noise_seed)
    if fail is not None:  # iterative bound management, every round on every token, masked (mirrors _managed)
        limit_r = min(io.max_bm_factor, io.max_bm_res / in_step) if io.inp_res > 0 else io.max_bm_factor
        reduction = b.scalar(1.0, np.float32)  # broadcast to [C, n, 1] by the first Where
        r, k = 1.0, 0
        while r <= limit_r:
            r, k = 2 * r, k + 1
            again, _, fail_again = one_round(b.op("Div", [levels, b.scalar(r, np.float32)]), io.noise_seed + 2 * k)
            assert fail_again is not None
            y = b.op("Where", [fail, again, y], "bm_y")
            reduction = b.op("Where", [fail, b.scalar(r, np.float32), reduction], "bm_reduction")
            fail = b.op("And", [fail, fail_again], "bm_fail")
        nm = b.op("Mul", [nm, reduction], "nm_bm")
    s = b.const(
        name + ".scale",
        Deferred(
            (c, 1, out),
            np.float32,
            lambda u=unit: np.ascontiguousarray(materialize(scale).T[:, None, :] * u, dtype=np.float32),
        ),
        public=True,
    )
    y = b.op("Mul", [b.op("Mul", [y, nm]), s], "scaled")
    y = b.op("ReduceSum", [y, b.vector([0])], "sum", keepdims=0)
    return b.op("Cast", [y], to=helper.np_dtype_to_tensor_dtype(dtype)) if dtype != np.float32 else y


def _normal_like(b: GraphBuilder, like: str, hint: str, scale: float, seed: int) -> str:
    """Standard normals of ``like``'s shape times ``scale``, drawn by ONNX Runtime at every run from ``seed``."""
    return b.op(
        "RandomNormalLike",
        [like],
        hint,
        dtype=TensorProto.FLOAT,
        mean=0.0,
        scale=float(scale),
        seed=float(seed % (1 << 24)),
    )


def _nonidealities(
    b: GraphBuilder, y: str, levels: str, w: str, n_in: int, c: int, t: int, unit: float, io: TilePeriphery
) -> str:
    """IR drop, then short-term weight noise, on the tiles' outputs ``y [C, n, out]`` (in DAC steps) of ``levels``
    (mirrors ``analog.tiles._nonidealities``; the weight noise is drawn by ONNX Runtime, as the output noise)."""
    needs_abs = io.ir_drop > 0 or (io.w_noise > 0 and io.w_noise_pcm)
    abs_w = b.op("Abs", [w], "abs_w") if needs_abs else ""  # [C, T, out]: folded into a constant at session load
    if io.ir_drop > 0:
        n = np.full((c, 1, 1), float(t), dtype=np.float32)
        n[-1] = n_in - (c - 1) * t
        p = 1.0 - np.arange(t, dtype=np.float32)[None, None, :] / n
        profile = b.array((1.0 - p * p).astype(np.float32))  # [C, 1, T]
        current = b.op("MatMul", [b.op("Abs", [levels]), abs_w], "current")
        current = b.op("Mul", [current, b.array((unit * n / io.ir_drop_g_ratio).astype(np.float32))])
        coef = b.op("Mul", [current, b.scalar(0.05, np.float32)])
        coef = b.op("Mul", [b.op("Sub", [coef, b.scalar(0.2, np.float32)]), current])
        coef = b.op("Mul", [b.op("Add", [coef, b.scalar(0.5, np.float32)]), current], "ir_coef")
        drop = b.op("MatMul", [b.op("Mul", [levels, profile]), w], "ir_product")
        drop = b.op("Mul", [b.op("Mul", [drop, coef]), b.scalar(io.ir_drop, np.float32)], "ir_drop")
        y = b.op("Sub", [y, drop])
    if io.w_noise > 0:
        if io.w_noise_pcm:
            std = b.op("MatMul", [b.op("Mul", [levels, levels]), abs_w], "w_var")
            std = b.op("Sqrt", [b.op("Max", [std, b.scalar(0.0, np.float32)])], "w_std")
        else:
            std = b.op("ReduceL2", [levels, b.vector([-1])], "w_std", keepdims=1)
        noise = _normal_like(b, y, "w_noise", io.w_noise, io.noise_seed + 1)
        y = b.op("Add", [y, b.op("Mul", [noise, std])])
    return y


def ort_moe_body(
    b: GraphBuilder,
    hidden: str,
    top_k_index: str,
    top_k_weights: str,
    output: str,
    experts: list[ExpertArrays],
    act: Activation,
    dtype: np.dtype,
    num_experts: int,
    top_k: int,
    layer: int = 0,
) -> None:
    """The group as one ONNX Runtime ``com.microsoft::MoE`` node (fused CPU/CUDA kernel), same result.

    ``MoE`` routes by itself (softmax over router logits, then top-k), so the routing given by the model is encoded
    as logits: ``log w`` for the slots routed to this group's experts, a zero-weight *null* expert with logit 0,
    and -1e4 elsewhere. Softmax then yields ``w / (S + 1)`` (``S``: the token's summed weight on this group) and
    the null expert adds nothing, so multiplying by ``S + 1`` gives the exact weighted sum. Top-k takes
    ``K + 1`` so that the null expert never displaces a routed one."""
    if act.kind == "glu" and act.act_name != "silu":
        raise HetMoEError(f"com.microsoft::MoE has no gated '{act.act_name}' activation; export without --ort-moe")
    dtype = np.dtype(dtype)
    n = len(experts)
    lut = np.full(num_experts, n + 1, dtype=np.int64)  # experts of other groups -> a trash column
    lut[[e.expert_id for e in experts]] = np.arange(n)
    local = b.op("Gather", [b.const("lut", lut), top_k_index], "local", axis=0)  # [T, K]
    in_group = b.op("Less", [local, b.scalar(n, np.int64)], "in_group")
    zero = b.scalar(0, dtype)
    routed_w = b.op("Where", [in_group, top_k_weights, zero], "routed_w")
    scale = b.op("Add", [b.op("ReduceSum", [routed_w, b.vector([1])], keepdims=1), b.scalar(1, dtype)], "scale")
    tokens = b.op("Gather", [b.op("Shape", [hidden]), b.scalar(0, np.int64)], "tokens")
    base_shape = b.op("Concat", [b.op("Unsqueeze", [tokens, b.vector([0])]), b.vector([n + 2])], "base_shape", axis=0)
    row = np.full((1, n + 2), -1e4, dtype=dtype)
    row[0, n] = 0.0  # the null expert
    base = b.op("Expand", [b.const("logit_row", row), base_shape], "base")  # [T, n + 2]
    logits = b.op("ScatterElements", [base, local, b.op("Log", [top_k_weights])], "logits", axis=1)
    logits = b.op("Slice", [logits, b.vector([0]), b.vector([n + 1]), b.vector([1])], "router_logits")
    fc1 = Deferred((n + 1, *experts[0].gate_up.shape), dtype, lambda: _stack(experts, "gate_up", True))
    fc2 = Deferred((n + 1, *experts[0].down.shape), dtype, lambda: _stack(experts, "down", False))
    inputs = [hidden, logits, b.const(f"L{layer}.experts.fc1", fc1, public=True)]
    if experts[0].gate_up_bias is not None:
        inputs.append(
            b.const(
                f"L{layer}.experts.fc1_bias",
                Deferred(
                    (n + 1, experts[0].gate_up_bias.shape[0]), dtype, lambda: _stack(experts, "gate_up_bias", True)
                ),
                public=True,
            )
        )
    else:
        inputs.append("")
    inputs.append(b.const(f"L{layer}.experts.fc2", fc2, public=True))
    if experts[0].down_bias is not None:
        inputs.append(
            b.const(
                f"L{layer}.experts.fc2_bias",
                Deferred((n + 1, experts[0].down_bias.shape[0]), dtype, lambda: _stack(experts, "down_bias", False)),
                public=True,
            )
        )
    gpt_oss = act.kind == "gpt_oss_glu"
    attrs: dict[str, Any] = dict(
        k=min(top_k + 1, n + 1),
        activation_type="swiglu",
        swiglu_fusion=1,
        normalize_routing_weights=0,
        activation_alpha=float(act.alpha) if gpt_oss else 1.0,
        activation_beta=1.0 if gpt_oss else 0.0,
    )
    if gpt_oss and act.limit:
        attrs["swiglu_limit"] = float(act.limit)
    moe = b.op("MoE", inputs, "moe", domain=MOE_DOMAIN, **attrs)
    b.op("Mul", [moe, scale], outputs=[output])


def _stack(experts: list[ExpertArrays], name: str, interleave: bool) -> np.ndarray:
    """``[n + 1, ...]`` stack of one matrix (or bias) of every expert plus a zero null expert; gate/up rows
    interleaved (gate0, up0, gate1, ...) as ``MoE``'s ``swiglu_fusion=1`` expects."""
    arrays = [materialize(getattr(e, name)) for e in experts]
    out = np.zeros((len(arrays) + 1, *arrays[0].shape), dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        if interleave:
            half = a.shape[0] // 2
            out[i, 0::2], out[i, 1::2] = a[:half], a[half:]
        else:
            out[i] = a
    return out
