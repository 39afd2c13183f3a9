"""Loading into verl: entry point, external_lib, version checks, the vLLM hook, the example scripts."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120, env=dict(ENV, **env))


def test_entry_point_registered_in_installed_package():
    eps = [ep for ep in importlib.metadata.entry_points(group="verl.plugins") if ep.name == "relibra"]
    assert eps and eps[0].value == "relibra_verl.integration.plugin:register"
    assert callable(eps[0].load())


def test_loaded_on_import_verl_and_patches_on_import():
    r = _run("import verl, sys\n"
             "from relibra_verl.integration import plugin\n"
             "assert 'relibra_verl.integration.plugin' in sys.modules\n"
             "import verl.workers.engine.megatron.transformer_impl as ti, verl.workers.engine_workers as ew\n"
             "s = plugin.status(); print(s)\n"
             "assert s['registered'] and 'MegatronEngine.forward_backward_batch' in s['patched'][ti.__name__]\n"
             "assert getattr(ti.prepare_micro_batches, '_relibra_wrapped', False)\n"
             "assert getattr(ew.ActorRolloutRefWorker.update_actor, '_relibra_wrapped', False)\n",
             VERL_USE_EXTERNAL_PLUGINS="auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "relibra-verl: registered with verl 0.9.1 / megatron-core 0.19.2" in r.stderr
    assert "relibra-verl: patched verl.workers.engine.megatron.transformer_impl" in r.stderr
    assert "relibra chains after it, never replaces it" in r.stderr


def test_external_lib_path_without_entry_points():
    r = _run("import sys, verl\n"
             "assert 'relibra_verl.integration.plugin' not in sys.modules\n"
             "from verl.utils.import_utils import import_external_libs\n"
             "import_external_libs('relibra_verl.integration.plugin')  # what HFModelConfig does with external_lib\n"
             "from relibra_verl.integration import plugin; assert plugin.status()['registered']\n",
             VERL_USE_EXTERNAL_PLUGINS="none")
    assert r.returncode == 0, r.stderr[-3000:]


def test_worker_dispatch_attributes_survive_wrapping():
    import relibra_verl.integration.plugin  # noqa: F401
    from verl.single_controller.base.decorator import MAGIC_ATTR
    from verl.workers.engine_workers import ActorRolloutRefWorker

    for name in ("init_model", "update_actor"):
        fn = getattr(ActorRolloutRefWorker, name)
        assert getattr(fn, "_relibra_wrapped", False) and hasattr(fn, MAGIC_ATTR), name


def test_unsupported_versions_leave_verl_native(monkeypatch, caplog):
    from relibra_verl.integration import plugin

    monkeypatch.setattr(plugin, "_status", {"registered": False, "reason": None, "patched": {}})
    monkeypatch.setattr(plugin, "SUPPORTED", {"verl": ("0.8.0",), "megatron-core": ("0.19.2",)})
    n_finders = len(sys.meta_path)
    with caplog.at_level("WARNING", logger="relibra_verl"):
        st = plugin.register()
    assert not st["registered"] and "verl 0.9.1 (tested: 0.8.0)" in st["reason"]
    assert "NOT loaded, verl runs natively" in caplog.text and len(sys.meta_path) == n_finders


def test_vllm_server_hook_adds_routed_experts_flag():
    """verl's vllm_async_server cannot be imported without vLLM: check its seam in the source, then patch a
    stand-in module with the same class/method/version names."""
    from packaging import version

    from relibra_verl.patches import vllm_routed_experts as hook

    import verl

    src = open(os.path.join(os.path.dirname(verl.__file__), "workers", "rollout", "vllm_rollout",
                            "vllm_async_server.py")).read()
    assert "self._preprocess_engine_kwargs(engine_kwargs)" in src and "**engine_kwargs" in src
    assert 'args.update({"enable_return_routed_experts": True})' in src  # verl's own R3 request

    class vLLMHttpServer:
        def __init__(self, **cfg):
            self.config = types.SimpleNamespace(**cfg)

        def _preprocess_engine_kwargs(self, engine_kwargs):
            engine_kwargs.setdefault("seen", True)

    mod = types.SimpleNamespace(vLLMHttpServer=vLLMHttpServer, _VLLM_VERSION=version.parse("0.22.1"))
    assert hook.patch_vllm_async_server(mod) == ["vLLMHttpServer._preprocess_engine_kwargs"]
    assert hook.patch_vllm_async_server(mod) == []  # idempotent
    cases = [({"enable_rollout_routing_replay": False, "moe_load_balance_metrics_interval": 0}, {}, False),
             ({"enable_rollout_routing_replay": True, "moe_load_balance_metrics_interval": 0}, {}, True),
             ({"enable_rollout_routing_replay": False, "moe_load_balance_metrics_interval": 5}, {}, True),
             ({"enable_rollout_routing_replay": False, "moe_load_balance_metrics_interval": 0},
              {hook.ENV: "1"}, True)]
    for cfg, env, want in cases:
        kwargs = {}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            vLLMHttpServer(**cfg)._preprocess_engine_kwargs(kwargs)
        assert kwargs.get("seen") and kwargs.get(hook.FLAG, False) == want, (cfg, env)
    old = types.SimpleNamespace(vLLMHttpServer=type("S", (), {"_preprocess_engine_kwargs": lambda s, k: None}),
                                _VLLM_VERSION=version.parse("0.21.0"))
    assert hook.patch_vllm_async_server(old) == []


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(os.path.join(REPO, "examples")) if f.endswith(".sh")))
def test_example_prints_composed_config(script):
    r = subprocess.run(["bash", os.path.join(REPO, "examples", script), "--cfg", "job"], capture_output=True,
                       text=True, timeout=180, env=ENV, cwd="/tmp")
    assert r.returncode == 0, r.stderr[-3000:]
    import yaml

    cfg = yaml.safe_load(r.stdout)
    arr = cfg["actor_rollout_ref"]
    assert arr["relibra"]["enable"] is True and arr["actor"]["strategy"] == "megatron"
    assert arr["actor"]["megatron"]["router_replay"]["mode"] == "R3"
    assert arr["rollout"]["enable_rollout_routing_replay"] is True
    from relibra_verl.config import from_actor_rollout_ref

    rc = from_actor_rollout_ref(arr)
    ep = arr["actor"]["megatron"]["expert_model_parallel_size"]
    assert ep == cfg["trainer"]["nnodes"] * cfg["trainer"]["n_gpus_per_node"] and rc.gpus_per_node == 8
    assert rc.profile == "h100-ib400"                                    # time-aware planning
    assert rc.inter_node_share == (0.9 if cfg["trainer"]["nnodes"] > 1 else 0.0)   # NIC-aware reorder across nodes


def test_failed_patch_is_counted_in_fallbacks_and_raises_in_strict_mode(monkeypatch, caplog):
    """A verl patch that fails to apply leaves that module native; it is not silent: the actor's update
    metrics carry relibra/fallbacks/patch_failed (and relibra/fallbacks), and on_missing_routing=error
    refuses to start."""
    import types

    from verl.utils import tensordict_utils as tu

    from relibra_verl.patches.verl_engine import patch_engine_workers
    from relibra_verl.integration import plugin
    from relibra_verl.integration.trainer import RelibraError

    monkeypatch.setattr(plugin, "_status", {"registered": True, "reason": None, "patched": {}, "failed": {}})
    monkeypatch.setitem(plugin._TARGETS, "verl.some_module", ("relibra_verl.integration.plugin", "no_such_patch"))
    with caplog.at_level("ERROR", logger="relibra_verl"):
        plugin._apply("verl.some_module", types.ModuleType("verl.some_module"))
    assert "patching verl.some_module failed" in caplog.text
    assert "no_such_patch" in plugin.status()["failed"]["verl.some_module"]

    class Worker:  # verl's ActorRolloutRefWorker surface that the wrapper touches
        def __init__(self, relibra):
            self.config = {"relibra": relibra}

        def init_model(self):
            return None

        def update_actor(self, data):
            return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": {"actor/pg_loss": [0.5]}})

    patch_engine_workers(types.SimpleNamespace(ActorRolloutRefWorker=Worker))
    out = Worker({"enable": True}).update_actor(None)
    metrics = tu.get(out, "metrics")
    assert metrics["relibra/fallbacks/patch_failed"] == [1.0] and metrics["relibra/fallbacks"] == [1.0]
    assert metrics["actor/pg_loss"] == [0.5]
    off = tu.get(Worker({"enable": False}).update_actor(None), "metrics")
    assert "relibra/fallbacks" not in off                                   # relibra off: nothing added
    with pytest.raises(RelibraError, match="verl.some_module: AttributeError"):
        Worker({"enable": True, "on_missing_routing": "error"}).init_model()
