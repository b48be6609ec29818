"""Estimated energy per token, throughput and digital memory of a placement (decode, batch-normalised).

Per token, at batch ``B`` and context ``L`` (:class:`~.params.CostParams`):

- digital dense projections: ``in*out`` MACs; their weights are read once per batch (``/B``). Embeddings read one
  row per token; norms and other parameters are read once per batch; attention adds ``heads*(qk+v)*L`` score MACs
  and reads the KV cache, ``kv_heads*(qk+v)*L`` elements (sliding layers: the window).
- routed expert ``e`` (``3*H*I`` MACs per use) is used with probability ``p_e`` (``K/E`` under uniform routing, or
  the measured activation frequency). Digital: ``p_e*3HI`` MACs, and its weights are fetched when any token of the
  batch uses it, ``(1-(1-p_e)^B)/B`` per token. Analog: ``p_e`` MVMs, charged over its full mapped tile area.
- analog projections (experts; dense ``nn.Linear`` layers with ``dense="analog"``; HPD ``u_sigma`` halves) store
  nothing digitally (a dense layer's bias stays digital) and charge ``ceil(out/T)*ceil(in/T)*T*T`` cell-MACs per
  MVM; their inputs and outputs cross the link (an MoE layer: ``2*H`` values when any analog expert is hit).
- time = digital roofline ``max(MACs/peak, bytes/bandwidth)`` + analog latency (per MoE layer with an analog expert
  hit: 2 sequential MVMs, gate_up then down; per module with analog projections: up to 2, inputs then output)
  + link transfer. Throughput = 1/time. Energy has no static (leakage) part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from torch import nn

from ..base.errors import HetMoEError
from ..models.recognize import ModelInfo, recognize
from ..transforms.lowbit.groupwise import check_quant_args
from .params import CostParams
from .profile import ModelProfile, MoEShape, profile_model
from .units import format_bytes, format_si

DEFAULT_TILE_SIZE = 512
"""The simulator's tile size (``AnalogConfig.tile_size``), used when ``CostParams.analog_tile_size`` is unset."""

BREAKDOWN = {
    "digital_compute": "digital compute",
    "digital_memory": "digital memory reads",
    "analog_mvm": "analog MVMs",
    "link": "link transfers",
}


@dataclass
class Terms:
    """Additive per-token quantities (one part of the model, or all of it)."""

    digital_macs: float = 0.0
    digital_bytes: float = 0.0
    analog_cells: float = 0.0
    link_bits: float = 0.0
    analog_latency_s: float = 0.0
    footprint: float = 0.0
    analog_tiles: int = 0
    analog_weights: int = 0

    def __add__(self, other: Terms) -> Terms:
        return Terms(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def energy(self, params: CostParams) -> dict[str, float]:
        return {
            "digital_compute": self.digital_macs * params.digital_mac_energy_j,
            "digital_memory": self.digital_bytes * params.digital_byte_energy_j,
            "analog_mvm": self.analog_cells * params.analog_mac_energy_j,
            "link": self.link_bits * params.link_bit_energy_j,
        }


@dataclass
class CostReport:
    """A placement's estimated cost per token; :meth:`to_dict` is the ``cost`` entry of placement.json and
    manifest.json, :meth:`table` a printable summary."""

    energy_per_token_j: float
    energy_breakdown_j: dict[str, float]
    tokens_per_s: float
    time_per_token_s: dict[str, float]
    digital_memory_bytes: int
    kv_cache_bytes: int
    analog_tiles: int
    analog_weights: int
    per_token: dict[str, float]
    assumptions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def table(self) -> str:
        return format_cost(self.to_dict())


def format_cost(cost: dict) -> str:
    """A short table of a cost dict (:meth:`CostReport.to_dict`)."""
    from ..base.tables import format_table

    a = cost["assumptions"]
    total = cost["energy_per_token_j"]
    rows = [["energy per token", format_si(total, "J")]]
    for key, label in BREAKDOWN.items():
        value = cost["energy_breakdown_j"][key]
        rows.append(
            [f"  {label}", f"{format_si(value, 'J')} ({100 * value / total:.1f}%)" if total else format_si(value, "J")]
        )
    t, footprint = cost["time_per_token_s"], cost["digital_memory_bytes"]
    rows += [
        ["throughput", f"{cost['tokens_per_s']:,.0f} tokens/s"],
        ["  time digital / analog / link", " / ".join(format_si(t[k], "s") for k in ("digital", "analog", "link"))],
        ["digital memory footprint", f"{format_bytes(footprint)} ({footprint:,} B)"],
        ["analog tiles", f"{cost['analog_tiles']:,} of {a['tile_size']}x{a['tile_size']}"],
        ["analog weights", f"{cost['analog_weights']:,}"],
    ]
    p = a["params"]
    bits = f", digital experts INT{a['digital_experts_bits']}" if a.get("digital_experts_bits") else ""
    head = (
        f"cost estimate (decode, batch {p['batch_size']}, context {p['context_length']}, {a['routing']} routing, "
        f"{a['weight_bytes']:g}-byte weights{bits}):"
    )
    return head + "\n" + format_table(["quantity", "value"], rows)


def tile_count(out: int, inp: int, tile: int) -> int:
    return math.ceil(out / tile) * math.ceil(inp / tile)


def expert_bytes(layer: MoEShape, weight_bytes: float, bits: int | None, group_size: int) -> float:
    """Digital storage of one expert: model-dtype weights, or ``bits/8`` per weight + one scale per group."""
    h, i = layer.hidden, layer.inter
    if bits is None:
        return (3 * h * i + layer.bias) * weight_bytes
    check_quant_args(bits, group_size, h, f"layer {layer.index}'s gate/up projections (hidden size)")
    check_quant_args(bits, group_size, i, f"layer {layer.index}'s down projections (expert width)")
    quant = lambda out, inp: out * inp * bits / 8 + out * (inp // group_size) * weight_bytes  # noqa: E731
    return quant(2 * i, h) + quant(h, i) + layer.bias * weight_bytes


def usage(layer: MoEShape, frequencies=None) -> list[float]:
    """``p_e``: the probability that a token uses expert ``e`` (``K/E`` uniform, else the measured frequency)."""
    if frequencies is None:
        return [layer.top_k / layer.num_experts] * layer.num_experts
    p = [float(x) for x in frequencies]
    if len(p) != layer.num_experts or any(not 0.0 <= x <= 1.0 for x in p):
        raise HetMoEError(
            f"activation frequencies of layer {layer.index}: expected {layer.num_experts} values in "
            f"[0, 1] (the share of tokens routed to each expert), got {len(p)}"
        )
    return p


def any_analog(layer: MoEShape, analog: list[int], p: list[float], uniform: bool) -> float:
    """Probability that a token routes to at least one analog expert: exact (hypergeometric) under uniform routing;
    with measured frequencies, every one of the ``K`` slots lands digital with probability ``sum_digital p / K``."""
    if not analog:
        return 0.0
    e, k = layer.num_experts, layer.top_k
    if uniform:
        return 1.0 - math.comb(e - len(analog), k) / math.comb(e, k)
    on_analog = set(analog)
    digital_share = min(1.0, sum(p[x] for x in range(e) if x not in on_analog) / k)
    return 1.0 - digital_share**k


class Estimator:
    """Cost of placements of one model: ``dense`` part fixed, MoE layers re-evaluated per expert set (the budget
    search moves one expert at a time and re-evaluates only its layer)."""

    def __init__(
        self,
        profile: ModelProfile,
        params: CostParams,
        dense: str = "digital",
        frequencies: dict[int, list[float]] | None = None,
    ) -> None:
        self.profile, self.params, self.dense = profile, params, dense
        self.frequencies = frequencies
        self.weight_bytes = params.weight_bytes or profile.dtype_bytes
        self.tile = params.analog_tile_size or DEFAULT_TILE_SIZE
        self.usage = {m.index: usage(m, None if frequencies is None else frequencies.get(m.index)) for m in profile.moe}
        if frequencies is not None and set(frequencies) != {m.index for m in profile.moe}:
            raise HetMoEError(
                f"activation frequencies cover layers {sorted(frequencies)}; the MoE layers are "
                f"{[m.index for m in profile.moe]}"
            )
        self.layers = {m.index: m for m in profile.moe}
        self.dense_terms = self._dense()

    def quant(self, layer: MoEShape) -> tuple[int | None, int]:
        if self.params.digital_bits is not None:
            return self.params.digital_bits, self.params.group_size
        return layer.quant if layer.quant else (None, self.params.group_size)

    def context(self, att) -> int:
        """Tokens an attention layer attends to: the context length, capped by a sliding window."""
        return min(self.params.context_length, att.window) if att.window else self.params.context_length

    def expert_bytes(self, index: int) -> float:
        layer = self.layers[index]
        return expert_bytes(layer, self.weight_bytes, *self.quant(layer))

    def _dense(self) -> Terms:
        prm, wb, b = self.params, self.weight_bytes, self.params.batch_size
        t, stored = Terms(), set()
        owners: dict[str, int] = {}  # analog linears per owning module

        def store(pid, numel):
            if pid is not None and pid not in stored:
                stored.add(pid)
                t.footprint += numel * wb

        for lin in self.profile.linears:
            analog = lin.hpd == "analog" or (lin.hpd is None and self.dense == "analog" and lin.dense_analog)
            weights = lin.in_features * lin.out_features
            if analog:
                tiles = tile_count(lin.out_features, lin.in_features, self.tile)
                t.analog_cells += tiles * self.tile**2
                t.analog_tiles += tiles
                t.analog_weights += weights
                t.link_bits += (lin.in_features + lin.out_features) * prm.activation_bits
                owners[lin.owner] = owners.get(lin.owner, 0) + 1
                t.digital_bytes += lin.bias * wb / b
                store(lin.bias_id, lin.bias)
            else:
                t.digital_macs += weights
                t.digital_bytes += (weights + lin.bias) * wb / b
                store(lin.weight_id, weights)
                store(lin.bias_id, lin.bias)
        for ten in self.profile.tensors:
            t.digital_bytes += ten.row * wb if ten.row else ten.numel * wb / b
            store(ten.param_id, ten.numel)
        for att in self.profile.attention:
            ctx = self.context(att)
            t.digital_macs += att.heads * (att.qk_dim + att.v_dim) * ctx
            t.digital_bytes += att.kv_heads * (att.qk_dim + att.v_dim) * ctx * wb
        t.analog_latency_s += sum(min(2, n) for n in owners.values()) * prm.analog_mvm_latency_s
        return t

    def layer_terms(self, index: int, digital: set[int]) -> Terms:
        """One MoE layer's routed experts with ``digital`` expert ids on digital and the rest on analog."""
        layer, prm = self.layers[index], self.params
        p, b = self.usage[index], prm.batch_size
        h, i = layer.hidden, layer.inter
        nbytes = self.expert_bytes(index)
        tiles = tile_count(2 * i, h, self.tile) + tile_count(h, i, self.tile)
        t = Terms()
        analog = [e for e in range(layer.num_experts) if e not in digital]
        for e in range(layer.num_experts):
            if e in digital:
                t.digital_macs += p[e] * 3 * h * i
                t.digital_bytes += nbytes * (1.0 - (1.0 - p[e]) ** b) / b
                t.footprint += nbytes
            else:
                t.analog_cells += p[e] * tiles * self.tile**2
                t.analog_tiles += tiles
                t.analog_weights += 3 * h * i
                if layer.bias:  # an analog expert's biases are added digitally, from digital memory
                    bias_bytes = layer.bias * self.weight_bytes
                    t.footprint += bias_bytes
                    t.digital_bytes += bias_bytes * (1.0 - (1.0 - p[e]) ** b) / b
        hit = any_analog(layer, analog, p, self.frequencies is None)
        t.analog_latency_s += hit * 2 * prm.analog_mvm_latency_s
        t.link_bits += hit * 2 * h * prm.activation_bits
        return t

    def energy(self, terms: Terms) -> float:
        return sum(terms.energy(self.params).values())

    def report(self, devices: dict[int, dict[int, str]], extra: dict | None = None) -> CostReport:
        """The cost of ``devices`` (decoder layer -> expert id -> device, as ``Placement.devices()``)."""
        missing = sorted(set(self.layers) - set(devices))
        if missing:
            raise HetMoEError(f"the placement has no devices for MoE layer(s) {missing}; re-run 'hetmoe-compile place'")
        t = self.dense_terms
        for index in self.layers:
            t = t + self.layer_terms(index, {e for e, d in devices[index].items() if d == "digital"})
        prm = self.params
        breakdown = t.energy(prm)
        compute, memory = t.digital_macs / prm.digital_macs_per_s, t.digital_bytes / prm.digital_bytes_per_s
        link = t.link_bits / 8 / prm.link_bytes_per_s
        time = {"digital": max(compute, memory), "analog": t.analog_latency_s, "link": link}
        time["total"] = sum(time.values())
        kv = sum(a.kv_heads * (a.qk_dim + a.v_dim) * self.context(a) for a in self.profile.attention)
        quant = {self.quant(m) for m in self.profile.moe if self.quant(m)[0] is not None}
        assumptions = {
            "params": prm.to_dict(),
            "routing": "uniform" if self.frequencies is None else "measured",
            "dense": self.dense,
            "weight_bytes": self.weight_bytes,
            "tile_size": self.tile,
            "digital_experts_bits": min(quant)[0] if quant else None,
            "digital_experts_group_size": min(quant)[1] if quant else None,
            "digital_bound": "compute" if compute >= memory else "memory",
            **(extra or {}),
        }
        return CostReport(
            energy_per_token_j=sum(breakdown.values()),
            energy_breakdown_j=breakdown,
            tokens_per_s=1.0 / time["total"] if time["total"] > 0 else math.inf,
            time_per_token_s=time,
            digital_memory_bytes=int(round(t.footprint)),
            kv_cache_bytes=int(kv * self.weight_bytes * prm.batch_size),
            analog_tiles=t.analog_tiles,
            analog_weights=t.analog_weights,
            per_token={
                "digital_macs": t.digital_macs,
                "digital_bytes": t.digital_bytes,
                "analog_cell_macs": t.analog_cells,
                "link_bits": t.link_bits,
            },
            assumptions=assumptions,
        )


def estimate_cost(
    model: nn.Module,
    placement,
    params: CostParams | None = None,
    *,
    info: ModelInfo | None = None,
    dense: str | None = None,
    frequencies: dict[int, list[float]] | None = None,
    all_digital: bool = False,
    extra: dict | None = None,
) -> CostReport:
    """The cost of ``placement`` (a :class:`~hetmoe_compile.placement.Placement`) on ``model``.

    ``dense`` overrides the placement's dense device; ``frequencies`` (decoder layer -> per-expert share of tokens)
    replaces uniform routing; ``all_digital`` costs every expert digital (a monolithic export). HPD-split projections
    in ``model`` are costed by their halves. Digital experts quantised in a canonical model count at their bits
    unless ``params.digital_bits`` says otherwise."""
    info = info or recognize(model)
    est = Estimator(profile_model(model, info), params or CostParams(), dense or placement.policy.dense, frequencies)
    devices = placement.devices()
    if all_digital:
        devices = {layer: {e: "digital" for e in experts} for layer, experts in devices.items()}
    return est.report(devices, extra)
