"""The `actor_rollout_ref.relibra` config section: one validated, keyword-only dataclass.

verl 0.9.1 converts only `model`, `actor`, `ref`, `rollout` and `checkpoint_engine` of
`actor_rollout_ref` into dataclasses; a `relibra` section reaches the worker as a raw DictConfig that
nobody checks. `RelibraConfig.from_mapping` is that check: unknown keys are rejected by name (with the
closest known key as a suggestion), values by type and range.

Keys and defaults (the same table is in docs/verl.md and in
relibra_verl/integration/config/relibra_megatron_trainer.yaml):

  enable               False    switch relibra on for the actor's Megatron engine
  mode                 both     replicate (replicas per micro-batch) | reorder (placement per batch) | both
  replica_slots        2        replica slots per EP rank (R); 0 allows only reordering
  gpus_per_node        8        EP ranks per NVLink domain (replicas never leave it)
  reorder_every        1        reorder the expert placement every N optimizer steps (0: never)
  max_moved_experts    -1       move budget: experts whose home may change per layer and reorder (-1: any)
  profile              h100-ib400  hardware profile (relibra_verl/planner/hardware.py name, or a JSON/YAML
                                file) for time-aware planning: a replica must repay its weight copies,
                                its GEMM call is charged to the rank that runs it, replication weighs the
                                busiest NIC against the busiest rank's GEMMs, an expert's move must repay
                                its migration (the cost model of `relibra-verl simulate`); none: plan
                                pair counts only
  inter_node_share     0.0      the reorder's NIC-aware node assignment: the share of a routed pair's
                                cost that is its InfiniBand transfer when it crosses nodes; > 0 makes
                                the reorder weigh the busiest NIC (sends and receive) against the
                                busiest node's GEMMs (0: nodes by pairs only).
                                `relibra-verl simulate --model M` prints it (h100-ib400: qwen3-30b-a3b
                                0.90, deepseek-v3 0.78). Worth it where InfiniBand dominates the step;
                                it costs planner time (README, "How the planner works"), spent in the
                                background thread that plans the next placement beside the step
  kernels              auto     slot assignment and permutation over physical slots: auto (relibra's Triton
                                kernels on GPU; else torch, Megatron's unfused permute) | triton | torch;
                                with moe_permute_fusion=True relibra's kernels take the place of TE's
  on_missing_routing   fallback fallback (warn, count `relibra/fallbacks`, plain dispatch) | error (strict)
  metrics              True     report relibra/* metrics in verl's metrics dict
  passes               all on   which passes relibra balances, each true/false (all exact, so all on):
                                {update: the actor's update (forward + backward), logprob: the actor's
                                old-log-prob forward (its split; the batch's placement is applied before
                                it), ref: the reference model's forward (its own engine, or the actor
                                without LoRA adapter)}
  data_placement       verl     verl (the driver's balancing) | locality (sequences moved between the ranks
                                of their mini-batch so their routed pairs stay on their node; legacy and V1
                                trainers, relibra_verl/integration/data_placement.py)
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from relibra_verl.errors import UsageError

SECTION = "actor_rollout_ref.relibra"
MODES = ("replicate", "reorder", "both")
KERNELS = ("auto", "triton", "torch")
ON_MISSING = ("fallback", "error")


class RelibraConfigError(UsageError, ValueError):
    """The relibra config section is malformed; the message names the key."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Passes:
    """`actor_rollout_ref.relibra.passes`: which of a step's passes relibra balances."""

    update: bool = True
    logprob: bool = True
    ref: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool):
                raise RelibraConfigError(f"{SECTION}.passes.{f.name} must be bool, got {value!r} ({type(value).__name__})")

    @classmethod
    def from_mapping(cls, section: Any) -> "Passes":
        if isinstance(section, Passes):
            return section
        if not isinstance(section, Mapping):
            raise RelibraConfigError(f"{SECTION}.passes must be a mapping of pass: bool, got {type(section).__name__}")
        _known_keys(section, tuple(f.name for f in dataclasses.fields(cls)), f"{SECTION}.passes")
        return cls(**{str(k): v for k, v in section.items()})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RelibraConfig:
    """Validated `actor_rollout_ref.relibra` (see the module docstring for every key)."""

    enable: bool = False
    mode: str = "both"
    replica_slots: int = 2
    gpus_per_node: int = 8
    reorder_every: int = 1
    max_moved_experts: int = -1
    profile: str = "h100-ib400"
    inter_node_share: float = 0.0
    kernels: str = "auto"
    on_missing_routing: str = "fallback"
    metrics: bool = True
    passes: Passes = dataclasses.field(default_factory=Passes)
    data_placement: str = "verl"

    def __post_init__(self):
        object.__setattr__(self, "passes", Passes.from_mapping(self.passes))
        for f in dataclasses.fields(self):
            if f.name == "passes":
                continue
            value = getattr(self, f.name)
            want = {"bool": bool, "int": int, "float": (int, float)}.get(f.type, str)
            # bool is an int subclass: refuse True for an int or float key and 1 for a bool key
            if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
                name = "float" if f.type == "float" else want.__name__
                raise RelibraConfigError(f"{SECTION}.{f.name} must be {name}, got {value!r} ({type(value).__name__})")
        _choice("mode", self.mode, MODES)
        _choice("kernels", self.kernels, KERNELS)
        _choice("on_missing_routing", self.on_missing_routing, ON_MISSING)
        _choice("data_placement", self.data_placement, ("verl", "locality"))
        _at_least("replica_slots", self.replica_slots, 0)
        _at_least("gpus_per_node", self.gpus_per_node, 1)
        _at_least("reorder_every", self.reorder_every, 0)
        _at_least("max_moved_experts", self.max_moved_experts, -1)
        if self.profile != "none":
            from relibra_verl.planner import load_profile

            try:
                load_profile(self.profile)
            except UsageError as exc:
                raise RelibraConfigError(f"{SECTION}.profile: {exc} (or none for pair-count planning)") from None
        if not 0.0 <= self.inter_node_share < 1.0:
            raise RelibraConfigError(f"{SECTION}.inter_node_share must be in [0, 1), got {self.inter_node_share}")
        if self.mode in ("replicate", "both") and self.replica_slots == 0 and self.enable:
            raise RelibraConfigError(
                f"{SECTION}.mode={self.mode} needs replica_slots >= 1 (or use mode=reorder)")

    @property
    def strict(self) -> bool:
        return self.on_missing_routing == "error"

    @property
    def replicates(self) -> bool:
        return self.mode in ("replicate", "both") and self.replica_slots > 0

    @property
    def reorders(self) -> bool:
        return self.mode in ("reorder", "both") and self.reorder_every > 0

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, section: Any) -> "RelibraConfig":
        """Build from a dict / OmegaConf DictConfig / None (None or {} gives the defaults).

        Raises RelibraConfigError naming the first unknown key (with a suggestion) or bad value.
        """
        if section is None:
            return cls()
        if isinstance(section, RelibraConfig):
            return section
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(section, DictConfig):
                section = OmegaConf.to_container(section, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf comes with verl
            pass
        if not isinstance(section, Mapping):
            raise RelibraConfigError(f"{SECTION} must be a mapping of keys, got {type(section).__name__}")
        _known_keys(section, cls.keys(), SECTION)
        return cls(**{str(k): v for k, v in section.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _known_keys(section: Mapping, known: tuple[str, ...], where: str) -> None:
    for key in section:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RelibraConfigError(f"unknown key '{where}.{key}'{hint} (known keys: {', '.join(known)})")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RelibraConfigError(f"{SECTION}.{key}={value!r} is not one of {', '.join(allowed)}{hint}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise RelibraConfigError(f"{SECTION}.{key} must be >= {low}, got {value}")


def from_actor_rollout_ref(actor_rollout_ref: Any) -> RelibraConfig:
    """The validated section of a (raw DictConfig or dict) `actor_rollout_ref`; defaults when absent."""
    if actor_rollout_ref is None:
        return RelibraConfig()
    getter = getattr(actor_rollout_ref, "get", None)
    section = getter("relibra", None) if getter is not None else getattr(actor_rollout_ref, "relibra", None)
    return RelibraConfig.from_mapping(section)
