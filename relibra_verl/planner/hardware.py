"""Hardware profiles: every constant of the cost model, each with its source, and what they give for one
expert's GEMM call (expert_gemm_coeffs) and one token's non-expert compute (non_moe_flops_per_token).

They live with the planner: the planner's time-aware configuration (relibra_verl.planner.configs) is
derived from them, and the verl trainer plans without importing the simulator (relibra_verl.sim, which
re-exports them).

A profile is a flat mapping of the fields of `HardwareProfile`. Built-in profiles: `h100-ib400`,
`h800-ib400`. A user passes their own as a JSON or YAML file (`--profile PATH`) holding every field but
the optional ones (OPTIONAL, with defaults; a missing or unknown one is a UsageError naming it);
`"base": "h100-ib400"` in the file fills the fields it omits from a built-in profile. Optional `gemm_fit`
({preset: {"a_us": x, "b_ns_per_token": y}}) replaces the derived expert GEMM time of that preset by a
measured fit (bench/calibrate_gpu.py writes one).

Sources: ../shared/reference/facts.md ("Links", "Compute", "Model shapes"), cited per field below. Where
facts.md has no figure the value is marked "assumption" and should be measured.

`model` below is any object with the shape fields the function reads: a simulator ModelPreset
(relibra_verl.sim.presets) or, for expert_gemm_coeffs, an ExpertShape (relibra_verl.planner.configs).
"""
from __future__ import annotations

import dataclasses
import json
import os

from relibra_verl.errors import UsageError


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    """Constants of one cluster. Bandwidths per GPU, per direction."""

    name: str
    nvlink_a2a_GBps: float          # all-to-all (dispatch/combine) inside an NVLink domain
    ib_a2a_GBps: float              # all-to-all traffic between nodes
    nvlink_p2p_GBps: float          # replica weight copy / gradient reduce inside a node
    ib_bulk_GBps: float             # bulk state migration between nodes (reordering)
    a2a_latency_us: float           # fixed cost of one all-to-all call
    gemm_tflops: float              # bf16 expert GEMM rate at large tokens per expert (the b term)
    hbm_GBps: float                 # HBM read rate: streaming an expert's weights once (part of the a term)
    gemm_call_overhead_us: float    # per expert GEMM call beyond weight streaming (launch, tile tails)
    dense_tflops: float             # achieved rate of the non-MoE part (attention, shared experts, head)
    bwd_compute_factor: float       # backward FLOPs / forward FLOPs
    act_bytes: float                # bytes per activation element in dispatch/combine
    weight_bytes_per_param: float   # replica weight copies
    grad_bytes_per_param: float     # replica gradient reduction
    state_bytes_per_param: float    # reordering migration (weights + master + Adam)
    replica_contention_share: float # share of a prefetched copy still paid (NVLink/HBM contention)
    migration_exposed_share: float  # share of the reordering migration on the critical path
    ib_forwarding: float            # 0: NCCL all-to-all (own NIC receives); 1: DeepEP-style rail forwarding
    h2d_GBps: float = 25.0          # host-to-device copies (the balancing plan); optional in a profile file
    eplb_copies_over_nvlink: float = 0.0  # 1: every EPLB redundant copy over NVLink (a bound favouring EPLB); optional
    gemm_fit: dict = dataclasses.field(default_factory=dict, compare=False)
    source: str = ""


OPTIONAL = ("h2d_GBps", "eplb_copies_over_nvlink")
REQUIRED = tuple(f.name for f in dataclasses.fields(HardwareProfile)
                 if f.name not in ("name", "gemm_fit", "source") + OPTIONAL)

_H100 = dict(
    name="h100-ib400",
    # facts.md Links: NVLink4 450 GB/s per direction peak; DeepEP reaches ~80% of the H800 NVLink peak
    # (153-160 of ~200 GB/s) in all-to-all: 0.8 * 450.
    nvlink_a2a_GBps=360.0,
    # facts.md Links: DeepEP normal dispatch/combine internode EP16 43, EP32 58, EP64 51 GB/s on CX7 400 Gb/s.
    ib_a2a_GBps=50.0,
    # facts.md Links: NCCL all-reduce bus bandwidth ~460-480 GB/s on 8xH100; large point-to-point copies.
    nvlink_p2p_GBps=450.0,
    # facts.md Links: InfiniBand NDR CX7 400 Gb/s = 50 GB/s per direction; ~90% for bulk transfers (assumption).
    ib_bulk_GBps=45.0,
    # assumption (not in facts.md): launch + synchronisation of one NCCL/DeepEP all-to-all; measure.
    a2a_latency_us=20.0,
    # facts.md Compute: 798 TFLOP/s measured for an 8192^3 bf16 matmul on an H100 in this workplace.
    gemm_tflops=798.0,
    # facts.md Compute: HBM copy ~3.0 TB/s (read+write) on H100; reading weights streams at about that rate.
    hbm_GBps=3000.0,
    # facts.md Compute: grouped GEMM falls to 0.2-0.65 PFLOP/s at M=64-128 (DeepGEMM, V3 shape): with the
    # weight-streaming time that leaves ~5 us per call; assumption until bench/calibrate_gpu.py fits it.
    gemm_call_overhead_us=5.0,
    # facts.md Compute: 798 TFLOP/s big-matmul rate x ~0.6 for attention/norm/small projections (assumption).
    dense_tflops=480.0,
    # standard: backward = data gradient + weight gradient = 2x forward FLOPs.
    bwd_compute_factor=2.0,
    # bf16 activations through the dispatcher (Megatron all-to-all dispatcher, no fp8 dispatch).
    act_bytes=2.0,
    # facts.md Model shapes: bf16 per expert = 3*H*I*2 bytes.
    weight_bytes_per_param=2.0,
    # replica gradients reduced into the owner's fp32 main_grad (design.md): fp32 on the wire (conservative).
    grad_bytes_per_param=4.0,
    # facts.md Model shapes: ~14 B/param (bf16 w + fp32 master + Adam m, v).
    state_bytes_per_param=14.0,
    # assumption: a prefetched copy overlaps compute but shares HBM/NVLink with it; 10% of it is still paid.
    replica_contention_share=0.1,
    # assumption: of 14 B/param, the bf16 weights (2 B, 1/7) are needed before the next forward; fp32 master
    # and Adam states (12 B) only at the next optimizer step and stream in the background; 0.3 leaves room
    # for IB contention with the dispatch all-to-all.
    migration_exposed_share=0.3,
    # design.md: relibra dispatches through Megatron's all-to-all dispatcher (NCCL): each GPU receives its
    # inter-node bytes on its own NIC. 1 models DeepEP's internode kernels (RDMA to the same-index GPU, then
    # NVLink forwarding; DeepEP docs via facts.md Links).
    ib_forwarding=0.0,
    # assumption (not in facts.md): PCIe Gen5 x16 peaks at 64 GB/s per direction; about 25 GB/s from
    # pageable host memory (the planner's numpy arrays). Measure.
    h2d_GBps=25.0,
    # modelling choice, not hardware: 0 sends an EPLB redundant copy that crosses nodes over InfiniBand (what
    # global EPLB's placement implies); 1 prices every copy at NVLink, as if all stayed inside the home's node.
    eplb_copies_over_nvlink=0.0,
    source="facts.md (Links, Compute, Model shapes); H100 SXM 8 per node, CX7 400 Gb/s per GPU",
)

_H800 = dict(
    _H100,
    name="h800-ib400",
    # facts.md Links: H800 NVLink ~160 GB/s achieved by DeepEP; intranode EP8 dispatch/combine 153/158 GB/s.
    nvlink_a2a_GBps=155.0,
    # facts.md Links: H800 NVLink ~160 GB/s achieved by DeepEP (used for copies too).
    nvlink_p2p_GBps=160.0,
    # facts.md Compute: H100/H800 SXM share the ~989 TFLOP/s bf16 peak; the H100 measurement (798) stands in.
    gemm_tflops=798.0,
    source="facts.md (Links: DeepEP on H800, Compute, Model shapes); H800 SXM 8 per node, CX7 400 Gb/s per GPU",
)

BUILTIN: dict[str, dict] = {"h100-ib400": _H100, "h800-ib400": _H800}


def profile_from_dict(raw: dict, origin: str) -> HardwareProfile:
    """Validate a mapping into a HardwareProfile. UsageError naming the missing/unknown/bad field."""
    if not isinstance(raw, dict):
        raise UsageError(f"profile {origin}: must be a mapping of constants, got {type(raw).__name__}")
    raw = dict(raw)
    base = raw.pop("base", None)
    if base is not None:
        if base not in BUILTIN:
            raise UsageError(f"profile {origin}: unknown base profile {base!r}; choose one of {', '.join(BUILTIN)}")
        raw = {**BUILTIN[base], "source": f"{origin} over {base}", **raw}
    known = {f.name for f in dataclasses.fields(HardwareProfile)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UsageError(f"profile {origin}: unknown constant {unknown[0]!r}")
    for key in REQUIRED:
        if key not in raw:
            raise UsageError(f"profile {origin}: missing constant {key!r}")
        val = raw[key]
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0:
            raise UsageError(f"profile {origin}: constant {key!r} must be a number >= 0, got {val!r}")
        raw[key] = float(val)
    for key in OPTIONAL:
        if key in raw:
            val = raw[key]
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0:
                raise UsageError(f"profile {origin}: constant {key!r} must be a number >= 0, got {val!r}")
            raw[key] = float(val)
    for key in ("h2d_GBps", "nvlink_a2a_GBps", "ib_a2a_GBps", "nvlink_p2p_GBps", "ib_bulk_GBps", "gemm_tflops", "hbm_GBps", "dense_tflops"):
        if raw.get(key, 1.0) <= 0:
            raise UsageError(f"profile {origin}: constant {key!r} must be > 0")
    fit = raw.get("gemm_fit") or {}
    if not isinstance(fit, dict) or any(not isinstance(v, dict) or {"a_us", "b_ns_per_token"} - set(v) for v in fit.values()):
        raise UsageError(f"profile {origin}: `gemm_fit` must map preset -> {{a_us, b_ns_per_token}}")
    raw["gemm_fit"] = fit
    raw.setdefault("name", os.path.basename(origin))
    raw.setdefault("source", origin)
    return HardwareProfile(**raw)


def load_profile(spec: str | HardwareProfile) -> HardwareProfile:
    """A built-in profile name or a JSON/YAML file path -> HardwareProfile."""
    if isinstance(spec, HardwareProfile):
        return spec
    if spec in BUILTIN:
        return profile_from_dict(BUILTIN[spec], spec)
    if not os.path.isfile(spec):
        raise UsageError(f"unknown hardware profile {spec!r}: not one of {', '.join(BUILTIN)} and no such file")
    try:
        with open(spec) as f:
            text = f.read()
        if spec.endswith((".yaml", ".yml")):
            import yaml
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except (OSError, ValueError) as exc:  # yaml.YAMLError subclasses Exception, caught below
        raise UsageError(f"profile {spec}: not readable ({exc.__class__.__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - yaml errors
        raise UsageError(f"profile {spec}: not readable ({exc.__class__.__name__})") from None
    return profile_from_dict(raw, spec)


def profile_to_dict(profile: HardwareProfile) -> dict:
    """JSON-ready mapping (the file format load_profile reads)."""
    return dataclasses.asdict(profile)


def expert_gemm_coeffs(model, profile: HardwareProfile) -> tuple[float, float]:
    """Forward time of one expert GEMM call: a + b * pairs. Returns (a seconds, b seconds per pair).

    A measured fit in profile.gemm_fit[model.name] wins; otherwise a = 3*H*I*weight_bytes / hbm +
    gemm_call_overhead, b = 6*H*I / gemm_tflops.
    """
    fit = profile.gemm_fit.get(model.name)
    if fit:
        return float(fit["a_us"]) * 1e-6, float(fit["b_ns_per_token"]) * 1e-9
    a = model.expert_params * profile.weight_bytes_per_param / (profile.hbm_GBps * 1e9) + profile.gemm_call_overhead_us * 1e-6
    b = 2.0 * model.expert_params / (profile.gemm_tflops * 1e12)
    return a, b


def non_moe_flops_per_token(model, mean_context: float) -> tuple[float, float]:
    """Forward FLOPs per token: (one MoE layer's non-expert part, the per-micro-batch rest: dense layers +
    LM head)."""
    score = model.attn_score_flops_per_token(mean_context)
    per_moe_layer = 2.0 * model.moe_layer_other_params() + score
    rest = model.num_dense_layers * (2.0 * model.dense_layer_params() + score) + 2.0 * model.hidden * model.vocab
    return per_moe_layer, rest
