"""Model presets: the shapes the cost model and the synthetic routing generator need.

Shapes (MoE layers, experts, top-k, H, I, expert groups) come from ../shared/reference/facts.md ("Model
shapes"); the non-MoE parts (attention, dense layers, shared experts, vocabulary) from each model's public
`config.json` on Hugging Face (Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B, deepseek-ai/DeepSeek-V3,
deepseek-ai/DeepSeek-V2-Lite). Skew targets come from facts.md ("Skew of real routing").

Glossary: E routed experts, K top-k, L MoE layers, H hidden size, I expert (moe) intermediate size.
One SwiGLU expert holds 3*H*I parameters.
"""
from __future__ import annotations

import dataclasses

from relibra_verl.errors import UsageError


@dataclasses.dataclass(frozen=True)
class SkewTarget:
    """Calibration targets of the synthetic generator (facts.md "Skew of real routing").

    maxmean_median / maxmean_max: per-layer max/mean of one expert's count over the mean (single-domain data).
    top10_share: share of routed pairs taken by the hottest 10% of experts.
    consecutive_shared: experts shared by consecutive tokens (of K).
    source: where the figures come from.
    """

    maxmean_median: float
    maxmean_max: float
    top10_share: float
    consecutive_shared: float
    source: str


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """One MoE model. All sizes in elements (parameters, not bytes)."""

    name: str
    num_layers: int            # transformer layers (dense + MoE)
    num_moe_layers: int        # L
    num_experts: int           # E
    topk: int                  # K
    hidden: int                # H
    moe_intermediate: int      # I
    num_expert_groups: int     # DeepSeek group-limited routing (1: none)
    topk_groups: int
    num_shared_experts: int    # always-on experts of size I (not routed, computed locally)
    dense_intermediate: int    # FFN size of the dense (non-MoE) layers
    attn_params: int           # attention parameters of one layer (projections only)
    attn_heads: int            # query heads, for the score/value FLOPs
    attn_qk_dim: int           # per-head q.k dimension
    attn_v_dim: int            # per-head value dimension
    vocab: int
    skew: SkewTarget

    @property
    def expert_params(self) -> int:
        """Parameters of one routed SwiGLU expert: 3*H*I (facts.md)."""
        return 3 * self.hidden * self.moe_intermediate

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    def moe_layer_other_params(self) -> int:
        """Parameters of an MoE layer besides its routed experts: attention, router, shared experts."""
        return self.attn_params + self.hidden * self.num_experts + self.num_shared_experts * self.expert_params

    def dense_layer_params(self) -> int:
        """Parameters of one dense layer: attention + SwiGLU FFN (3*H*I_dense)."""
        return self.attn_params + 3 * self.hidden * self.dense_intermediate

    def attn_score_flops_per_token(self, mean_context: float) -> float:
        """Forward FLOPs of q.k^T and attn.v per token for `mean_context` attended positions."""
        return 2.0 * self.attn_heads * (self.attn_qk_dim + self.attn_v_dim) * mean_context


def _gqa_params(hidden: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """q, k, v, o projections of grouped-query attention (Qwen3)."""
    return hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2


def _mla_params(hidden: int, heads: int, q_lora: int, kv_lora: int, nope: int, rope: int, v: int) -> int:
    """Multi-head latent attention projections (DeepSeek-V2/V3); q_lora = 0 means a full q projection."""
    q = hidden * heads * (nope + rope) if q_lora == 0 else hidden * q_lora + q_lora * heads * (nope + rope)
    kv = hidden * (kv_lora + rope) + kv_lora * heads * (nope + v)
    return q + kv + heads * v * hidden


PRESETS: dict[str, ModelPreset] = {
    # facts.md: Qwen3-30B-A3B, 48 MoE layers, 128 experts top-8, H 2048, I 768.
    # config.json: 48 layers (all MoE), 32 q heads / 4 kv heads of 128, vocab 151936, no shared experts.
    "qwen3-30b-a3b": ModelPreset(
        "qwen3-30b-a3b", 48, 48, 128, 8, 2048, 768, 1, 1, 0, 6144,
        _gqa_params(2048, 32, 4, 128), 32, 128, 128, 151936,
        SkewTarget(8.8, 13.2, 0.43, 3.3, "facts.md: Qwen3-30B-A3B on GSM8K prompts")),
    # facts.md: Qwen3-235B-A22B, 94 MoE layers, 128 top-8, H 4096, I 1536.
    # config.json: 64 q heads / 4 kv heads of 128, vocab 151936. No published skew: Qwen3-30B-A3B's
    # figures stand in (same family, same E and K).
    "qwen3-235b-a22b": ModelPreset(
        "qwen3-235b-a22b", 94, 94, 128, 8, 4096, 1536, 1, 1, 0, 12288,
        _gqa_params(4096, 64, 4, 128), 64, 128, 128, 151936,
        SkewTarget(8.8, 13.2, 0.43, 3.3, "facts.md: Qwen3-30B-A3B on GSM8K (stand-in: same family, E, K)")),
    # facts.md: DeepSeek-V3, 58 MoE layers, 256 experts top-8 (8 groups, top-4 groups), H 7168, I 2048.
    # config.json: 61 layers (first 3 dense, FFN 18432), 1 shared expert, MLA with 128 heads,
    # q_lora 1536, kv_lora 512, qk nope 128 + rope 64, v 128, vocab 129280.
    # facts.md: GPQA max/mean median 6, p90 11, max 13; 12.5% of experts take ~31% (-> ~27% for 10%).
    # Consecutive-token reuse is not published for V3: the DeepSeek-V2-Lite ratio (1.6 of 6) scaled to K=8.
    "deepseek-v3": ModelPreset(
        "deepseek-v3", 61, 58, 256, 8, 7168, 2048, 8, 4, 1, 18432,
        _mla_params(7168, 128, 1536, 512, 128, 64, 128), 128, 192, 128, 129280,
        SkewTarget(6.0, 13.0, 0.27, 2.1, "facts.md: DeepSeek-V3/R1 on GPQA")),
    # facts.md: DeepSeek-V2-Lite (the bundled ESFT traces), 26 MoE layers, 64 experts top-6 (+2 shared),
    # H 2048, I 1408. config.json: 27 layers (layer 0 dense, FFN 10944), MLA with 16 heads, no q lora,
    # kv_lora 512, qk nope 128 + rope 64, v 128, vocab 102400.
    # facts.md: ESFT tasks max/mean median 3.3-5.6 (4.4 mid), max 7.7; top 10% take 22-37% (30 mid);
    # consecutive tokens share ~1.6 of 6.
    "deepseek-v2-lite": ModelPreset(
        "deepseek-v2-lite", 27, 26, 64, 6, 2048, 1408, 1, 1, 2, 10944,
        _mla_params(2048, 16, 0, 512, 128, 64, 128), 16, 192, 128, 102400,
        SkewTarget(4.4, 7.7, 0.30, 1.6, "facts.md: DeepSeek-V2-Lite on ESFT tasks (bundled traces)")),
}


def get_preset(name: str) -> ModelPreset:
    """Preset by name; UsageError naming the choices when unknown."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None
