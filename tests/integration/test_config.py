"""actor_rollout_ref.relibra: the dataclass, and composition through verl's own Hydra config."""
from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from relibra_verl.config import RelibraConfig, RelibraConfigError, from_actor_rollout_ref
from relibra_verl.integration.plugin import CONFIG_DIR


def test_defaults_documented_and_equal_to_yaml():
    with open(os.path.join(CONFIG_DIR, "relibra_megatron_trainer.yaml")) as f:
        section = yaml.safe_load(f)["actor_rollout_ref"]["relibra"]
    assert section == RelibraConfig().to_dict()
    import relibra_verl.config as mod

    for key in RelibraConfig.keys():  # every key is in the module's documented table
        assert f"\n  {key} " in mod.__doc__, key


@pytest.mark.parametrize("bad, needle", [
    ({"enabel": True}, "unknown key 'actor_rollout_ref.relibra.enabel'; did you mean 'enable'?"),
    ({"replica_slot": 2}, "did you mean 'replica_slots'?"),
    ({"mode": "replicat"}, "did you mean 'replicate'?"),
    ({"kernels": "cuda"}, "kernels='cuda' is not one of auto, triton, torch"),
    ({"on_missing_routing": "raise"}, "on_missing_routing='raise'"),
    ({"replica_slots": -1}, "replica_slots must be >= 0"),
    ({"replica_slots": True}, "replica_slots must be int"),
    ({"enable": "yes"}, "enable must be bool"),
    ({"enable": True, "mode": "replicate", "replica_slots": 0}, "needs replica_slots >= 1"),
    ({"inter_node_share": 1.5}, "inter_node_share must be in [0, 1), got 1.5"),
    ({"profile": "h100-ib200"}, "actor_rollout_ref.relibra.profile: unknown hardware profile 'h100-ib200'"),
    ({"inter_node_share": "high"}, "inter_node_share must be float"),
    ({"inter_node_share": True}, "inter_node_share must be float"),
    ({"passes": {"logprb": True}}, "unknown key 'actor_rollout_ref.relibra.passes.logprb'; did you mean 'logprob'?"),
    ({"passes": {"ref": 1}}, "passes.ref must be bool, got 1"),
    ({"passes": ["update"]}, "passes must be a mapping of pass: bool, got list"),
])
def test_rejects_bad_keys_and_values(bad, needle):
    with pytest.raises(RelibraConfigError) as exc:
        RelibraConfig.from_mapping(bad)
    assert needle in str(exc.value)


def test_float_key_takes_ints():
    assert RelibraConfig.from_mapping({"inter_node_share": 0}).inter_node_share == 0


def test_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        RelibraConfig(True)  # noqa
    cfg = RelibraConfig(enable=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.enable = False


def _compose(config_name, overrides, *, verl_dir=False):
    from hydra import compose, initialize_config_dir, initialize_config_module

    init = initialize_config_module("verl.trainer.config", version_base=None) if verl_dir else \
        initialize_config_dir(CONFIG_DIR, version_base=None)
    with init:
        return compose(config_name=config_name, overrides=overrides)


def test_compose_through_verl_megatron_config():
    cfg = _compose("relibra_megatron_trainer", ["actor_rollout_ref.relibra.enable=true",
                                                "actor_rollout_ref.relibra.mode=replicate",
                                                "actor_rollout_ref.actor.megatron.router_replay.mode=R3"])
    assert cfg.actor_rollout_ref.actor.strategy == "megatron"          # verl's real megatron config
    assert cfg.actor_rollout_ref.actor.megatron.router_replay.mode == "R3"
    rc = from_actor_rollout_ref(cfg.actor_rollout_ref)
    assert rc == RelibraConfig(enable=True, mode="replicate")


def test_compose_rejects_typo_by_name():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as exc:  # Hydra struct mode on relibra's section
        _compose("relibra_megatron_trainer", ["actor_rollout_ref.relibra.enabel=true"])
    assert "enabel" in str(exc.value.__cause__ or exc.value)
    # the stock verl config with a `+` section: the section reaches the worker raw; we reject it by name
    cfg = _compose("ppo_megatron_trainer", ["+actor_rollout_ref.relibra.enable=true",
                                            "+actor_rollout_ref.relibra.replica_slotz=2"], verl_dir=True)
    with pytest.raises(RelibraConfigError,
                       match="'actor_rollout_ref.relibra.replica_slotz'; did you mean 'replica_slots'"):
        from_actor_rollout_ref(cfg.actor_rollout_ref)


def test_stock_config_without_section_is_off():
    cfg = _compose("ppo_megatron_trainer", [], verl_dir=True)
    assert from_actor_rollout_ref(cfg.actor_rollout_ref) == RelibraConfig()


def test_verl_driver_rejects_typo_before_starting_ray():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", "--config-name", "ppo_megatron_trainer",
                        "+actor_rollout_ref.relibra.enable=true", "+actor_rollout_ref.relibra.gpus_per_nod=8"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode != 0
    assert "unknown key 'actor_rollout_ref.relibra.gpus_per_nod'; did you mean 'gpus_per_node'?" in r.stderr
    assert "ray.init" not in r.stderr


def test_passes_partial_mapping_keeps_the_other_defaults():
    passes = RelibraConfig.from_mapping({"passes": {"ref": False}}).passes
    assert (passes.update, passes.logprob, passes.ref) == (True, True, False)
