"""relibra end to end on a CPU machine: verl's own GRPO (`python -m verl.trainer.main_ppo`) with the vLLM CPU
engine as rollout (routes returned, R3), the Megatron actor built by verl through mbridge, EP 2 over gloo on
2 processes, relibra switched on by its config section; then the same run with relibra off.

    python e2e/run.py [--out e2e/out] [--steps 3]      (make e2e: builds .venv-e2e first)

Writes OUT/summary.json and exits non-zero when a check fails:
  * losses and grad norms with relibra on equal those with relibra off on identical data (TOLERANCE);
  * relibra/replicas > 0, relibra/fallbacks == 0 and relibra/imbalance_after < relibra/imbalance_before on
    every step; experts moved (a reordering) after a step before the last;
  * the routes arrived from vLLM (one row per token but the last) and the replay mismatch was measured;
  * the weights sent to vLLM are in canonical expert order after the reorderings: every exported expert
    matches the relibra-off run's expert of the same name; step 1's sampled rollouts (same initial weights)
    are token-identical on and off, and so are at least half of the greedy validation responses after the
    steps (bf16 rounding lets the runs drift; summarize.py says why).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Equal within bf16 training noise: relibra computes the same sums in another order (a replica's tokens in
# a separate bf16 GEMM, its weight gradient added into the owner's fp32 main_grad), so losses and grad norms
# differ by rounding, not by any token or expert. 2e-3 relative is half a bf16 ulp (2^-8); the differences
# measured on identical data are far below it (docs/e2e.md). Compared on the leading steps whose rollouts
# were token-identical in both runs (step 1 always: same initial weights, same sampling seeds).
TOLERANCE = {"rtol": 2e-3, "atol": 1e-5}

STEPS_DEFAULT = 3


def overrides(assets: str, out: str, steps: int, relibra_on: bool) -> list[str]:
    """Hydra overrides of verl's ppo_megatron_trainer (through relibra's config) for the CPU run."""
    model = os.path.join(assets, "model")
    data = os.path.join(assets, "data")
    mt = "++actor_rollout_ref.actor.megatron.override_transformer_config"
    return [
        "algorithm.adv_estimator=grpo",
        "algorithm.use_kl_in_reward=False",
        f"data.train_files={data}/train.parquet",
        f"data.val_files={data}/val.parquet",
        "data.train_batch_size=8",
        "data.max_prompt_length=48",
        "data.max_response_length=24",
        "data.shuffle=False",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={model}",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        # the order of GRPO learning rates for LLMs (verl's examples: 1e-6); larger ones on this random
        # model let bf16 rounding noise (Adam amplifies near-zero gradients to +-lr) flip sampled tokens
        "actor_rollout_ref.actor.optim.lr=1e-5",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.use_dynamic_bsz=True",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=160",
        # a KL loss against the reference model: verl then runs the ref model's forward (its own Megatron
        # engine, routes not replayed) every step, and relibra balances it too
        "actor_rollout_ref.actor.use_kl_loss=True",
        "actor_rollout_ref.actor.kl_loss_coef=0.01",
        "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
        "actor_rollout_ref.actor.entropy_coeff=0",
        "actor_rollout_ref.actor.megatron.use_mbridge=True",
        "actor_rollout_ref.actor.megatron.vanilla_mbridge=True",
        "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=1",
        "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1",
        "actor_rollout_ref.actor.megatron.expert_model_parallel_size=2",
        "actor_rollout_ref.actor.megatron.expert_tensor_parallel_size=1",
        "actor_rollout_ref.actor.megatron.param_offload=False",
        "actor_rollout_ref.actor.megatron.optimizer_offload=False",
        "actor_rollout_ref.actor.megatron.router_replay.mode=R3",
        f"{mt}.moe_router_dtype=fp32",
        f"{mt}.moe_token_dispatcher_type=alltoall",
        f"{mt}.moe_permute_fusion=False",
        f"{mt}.moe_grouped_gemm=False",
        f"{mt}.gradient_accumulation_fusion=False",
        f"{mt}.persist_layer_norm=False",
        f"{mt}.masked_softmax_fusion=False",
        f"{mt}.bias_activation_fusion=False",
        f"{mt}.bias_dropout_fusion=False",
        f"{mt}.use_cpu_initialization=True",
        f"{mt}.attention_backend=unfused",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.mode=async",
        "actor_rollout_ref.rollout.enable_rollout_routing_replay=True",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.temperature=1.0",
        "actor_rollout_ref.rollout.enforce_eager=True",
        "actor_rollout_ref.rollout.free_cache_engine=False",
        "+actor_rollout_ref.rollout.enable_sleep_mode=False",   # vLLM CPU has no sleep mode
        "actor_rollout_ref.rollout.max_model_len=96",
        "actor_rollout_ref.rollout.max_num_batched_tokens=512",
        "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=160",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=False",
        "actor_rollout_ref.rollout.val_kwargs.temperature=0",
        "actor_rollout_ref.rollout.val_kwargs.n=1",
        f"actor_rollout_ref.relibra.enable={relibra_on}",
        "actor_rollout_ref.relibra.mode=both",
        "actor_rollout_ref.relibra.replica_slots=1",
        "actor_rollout_ref.relibra.gpus_per_node=2",
        "actor_rollout_ref.relibra.reorder_every=1",
        # a time-aware plan would rightly make no replica for experts this small (copying an expert costs
        # more than computing its tokens); count pairs so that replicas and reordering are exercised
        "actor_rollout_ref.relibra.profile=none",
        "actor_rollout_ref.relibra.on_missing_routing=error",
        # the driver reads the routes back from TransferQueue and plans the data placement (one node here:
        # it keeps verl's placement, which leaves the comparison with the off run exact)
        f"actor_rollout_ref.relibra.data_placement={'locality' if relibra_on else 'verl'}",
        f"reward.custom_reward_function.path={HERE}/reward.py",
        "reward.custom_reward_function.name=compute_score",
        "reward.num_workers=1",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        "trainer.critic_warmup=0",
        "trainer.logger=[console,file]",
        "trainer.project_name=relibra_e2e",
        f"trainer.experiment_name={'on' if relibra_on else 'off'}",
        "trainer.nnodes=1",
        "trainer.n_gpus_per_node=2",
        "trainer.save_freq=-1",
        "trainer.test_freq=1",                     # greedy validation rollout after every step
        "trainer.val_before_train=False",
        f"trainer.total_training_steps={steps}",
        "trainer.total_epochs=1",
        f"trainer.validation_data_dir={out}/validation",
        f"trainer.rollout_data_dir={out}/rollout",
        f"trainer.default_local_dir={out}/ckpt",
        "+ray_kwargs.ray_init.num_gpus=2",
        "ray_kwargs.ray_init.num_cpus=16",
    ]


def environment(out: str) -> dict:
    env = dict(os.environ)
    env.update({
        "VERL_USE_EXTERNAL_MODULES": "relibra_verl.patches.cpu_platform,relibra_e2e_probe",
        "VERL_PLATFORM": "relibra_cpu",
        "VERL_ENGINE_DEVICE": "cuda",          # verl registers its Megatron engines for cuda and npu only
        "PYTHONPATH": HERE + os.pathsep + env.get("PYTHONPATH", ""),
        "VERL_FILE_LOGGER_PATH": os.path.join(out, "metrics.jsonl"),
        "RELIBRA_E2E_PROBE_DIR": os.path.join(out, "probe"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_TMPDIR": env.get("RAY_TMPDIR", "/tmp/relibra-ray"),
        "RAY_DEDUP_LOGS": "0",
        "HYDRA_FULL_ERROR": "1",
        "HF_HUB_OFFLINE": "1",
    })
    return env


def run_one(name: str, assets: str, out_root: str, steps: int, timeout: int) -> dict:
    out = os.path.join(out_root, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    config_dir = os.path.join(ROOT, "relibra_verl", "integration", "config")
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", f"--config-path={config_dir}",
           "--config-name=relibra_megatron_trainer", *overrides(assets, out, steps, name == "relibra_on")]
    t0 = time.time()
    with open(os.path.join(out, "log.txt"), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, env=environment(out), stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                              cwd=ROOT)
    wall = time.time() - t0
    print(f"[e2e] {name}: exit {proc.returncode} in {wall:.0f} s (log {out}/log.txt)", flush=True)
    return {"returncode": proc.returncode, "wall_s": wall, "out": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--steps", type=int, default=STEPS_DEFAULT)
    ap.add_argument("--timeout", type=int, default=1500, help="seconds per training run")
    ap.add_argument("--only", choices=["relibra_on", "relibra_off"], help="run one side only (debugging)")
    ap.add_argument("--fault", choices=["swap_experts"],
                    help="break the relibra-on run's weight export on purpose: the checks must then fail")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    wall = {}
    t0 = time.time()
    assets = os.path.join(a.out, "assets")
    shutil.rmtree(assets, ignore_errors=True)
    subprocess.run([sys.executable, os.path.join(HERE, "make_assets.py"), assets], check=True,
                   stdout=subprocess.DEVNULL)
    wall["assets"] = time.time() - t0
    runs = {}
    for name in ("relibra_on", "relibra_off"):
        if a.only and name != a.only:
            continue
        if a.fault and name == "relibra_on":
            os.environ["RELIBRA_E2E_FAULT"] = a.fault
        runs[name] = run_one(name, assets, a.out, a.steps, a.timeout)
        os.environ.pop("RELIBRA_E2E_FAULT", None)
        wall[name] = runs[name]["wall_s"]
    from summarize import summarize

    summary, failures = summarize(a.out, runs, a.steps, TOLERANCE, wall)
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary["checks"], indent=1))
    for msg in failures:
        print(f"[e2e] FAILED: {msg}", file=sys.stderr)
    print(f"[e2e] {'FAILED' if failures else 'PASSED'}; summary in {a.out}/summary.json", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())
