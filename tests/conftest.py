"""Fixtures shared by the kernel tests (tests/test_kernels_*.py)."""
import pytest
import torch

# CPU runs the Triton interpreter; on a GPU machine (bench/gpu_check.sh) the same cases also run compiled
KERNEL_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def interp(monkeypatch):
    """Triton's interpreter for CPU tensors: the kernels build their interpreted variant lazily."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(params=KERNEL_DEVICES)
def device(request):
    return request.param
