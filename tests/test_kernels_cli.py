"""`relibra-verl bench-kernels`: the CPU (interpreter) check path, its exit codes and its JSON."""
import json

import pytest
import torch

from relibra_verl.cli import main


@pytest.fixture(autouse=True)
def _restore_interpreter_env(monkeypatch):
    # the cpu path sets TRITON_INTERPRET=1 for its process; keep that out of other tests
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_cpu_checks_pass_and_write_json(tmp_path, capsys):
    path = tmp_path / "k.json"
    assert main(["bench-kernels", "--device", "cpu", "--json", str(path)]) == 0
    rep = json.loads(path.read_text())
    assert rep["ok"] and rep["device"] == "cpu" and rep["versions"]["torch"] and rep["date"]
    assert len(rep["checks"]) >= 10 and all(r["ok"] for r in rep["checks"])
    assert {r["T"] for r in rep["checks"]} >= {0, 1} and {r["K"] for r in rep["checks"]} >= {1, 8}
    assert "checks passed" in capsys.readouterr().out


def test_cpu_mismatch_exits_1(monkeypatch, tmp_path):
    from relibra_verl.kernels import benchmark

    monkeypatch.setattr(benchmark, "cpu_cases", lambda seed: [dict(T=9, K=2, H=8, dtype=torch.float32, seed=1)])
    wrong = benchmark.assign_slots_reference

    def off_by_one(*a):
        slot, counts = wrong(*a)
        return slot, counts + 1

    monkeypatch.setattr(benchmark, "assign_slots_reference", off_by_one)
    monkeypatch.setattr(benchmark, "megatron_cross_check", lambda p: dict(skipped="test"))
    path = tmp_path / "k.json"
    assert main(["bench-kernels", "--device", "cpu", "--json", str(path)]) == 1
    rep = json.loads(path.read_text())
    assert not rep["ok"] and rep["checks"][0]["failed"] == ["assign_slots"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_usage_error(capsys):
    assert main(["bench-kernels", "--device", "cuda"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["--device", "cpu", "--json", "/nonexistent-dir/x.json"], "does not exist"),
    (["--device", "cpu", "--sizes", "4096"], "--sizes applies to --device cuda only"),
])
def test_usage_errors(argv, msg, capsys):
    assert main(["bench-kernels", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_cuda_path_dry_run_on_cpu():
    """The benchmark path of `--device cuda` (checks, Megatron rows, goals) on CPU with a fake timer."""
    from relibra_verl.kernels import benchmark

    calls = []

    def timer(fn):
        fn()
        calls.append(1)
        return 1.0

    checks = [dict(T=5, K=8, H=8, dtype=torch.float32, seed=0, E=16, G=4, R=1)]
    rep = benchmark.run_cuda(Ts=(64,), Hs=(16,), log=lambda s: None, device="cpu", checks=checks, timer=timer,
                             copy_bytes=1 << 12, cross_check_size=(40, 16))
    assert rep["ok"] and rep["card"].startswith("cpu")
    impls = {r["impl"] for r in rep["results"]}
    assert {"relibra_assign_permute", "relibra_unpermute", "relibra_permute_fwd_bwd", "torch_argsort_assign_permute",
            "megatron_permute_unfused", "megatron_unpermute_unfused"} <= impls
    assert all("median_ms" in r for r in rep["results"])
    assert rep["megatron_cross_check"]["permute_equal"]
    g = benchmark.goals([dict(r, T=16384, H=2048) for r in rep["results"]], 1000.0)
    assert g["speedup_vs_megatron_unfused"] == 1.0 and g["at_least_2x_megatron_unfused"] is False
    assert "fraction_of_copy_bandwidth" in g
