"""The kernels compile for a Hopper GPU (sm_90) on this CPU machine, with Triton's bundled ptxas.

The interpreter tests cannot catch what only the compiler rejects (types, layouts, atomics on int64);
this does, and checks that the row kernels move 16-byte vectors (bandwidth). Skipped if this Triton's
compile API or its CUDA backend is not there.
"""
import re

import pytest

triton = pytest.importorskip("triton")

from relibra_verl.kernels import slot_assign as sa  # noqa: E402
from relibra_verl.kernels import token_permute as tp  # noqa: E402


def compile_sm90(kfn, sig, consts, num_warps=4, aligned=()):
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"triton compile API not available: {exc}")
    from triton.runtime.jit import JITFunction

    if not isinstance(triton.language.standard._sum_combine, JITFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: its library functions are interpreted")
    jf = JITFunction(kfn)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(jf.arg_names):
        if name in consts:
            signature[name], constexprs[(i,)] = "constexpr", consts[name]
        else:
            signature[name] = sig[name]
            if name in aligned:  # what the launcher specialises for 16-divisible pointers and sizes
                attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        return triton.compile(ASTSource(jf, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    except (TypeError, ImportError, FileNotFoundError) as exc:  # API drift or no ptxas: not our bug
        pytest.skip(f"cannot compile for sm_90 here: {type(exc).__name__}: {exc}")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))


@pytest.mark.parametrize("key_ty", ["*i32", "*i16", "*u8", "*i64"])
def test_slot_kernels_compile(key_ty):
    compile_sm90(sa._block_histogram_kernel, dict(keys_ptr=key_ty, counts_ptr="*i32", n="i32", NB="i32", NBLK="i32"),
                 dict(BLOCK=sa.RANK_BLOCK, NB_POW2=256))
    for mode in (0, 1):
        k = compile_sm90(sa._rank_kernel, dict(keys_ptr=key_ty, counts_ptr="*i32", incl_ptr="*i32", out_ptr="*i64",
                                               n="i32", NB="i32", NBLK="i32", cq_ptr="*i64", copy_slot_ptr="*i64",
                                               C="i32"),
                         dict(MODE=mode, BLOCK=sa.RANK_BLOCK, C_POW2=8 if mode == 0 else 1), num_warps=sa.RANK_WARPS)
        assert ".local" not in k.asm["ptx"]  # no register spills in the BLOCK x BLOCK comparison
    k = compile_sm90(sa._slot_counts_kernel, dict(incl_ptr="*i32", NBLK="i32", quota_ptr=key_ty, cq_ptr="*i64",
                                                  copy_slot_ptr=key_ty, slot_counts_ptr="*i64", E="i32", C="i32",
                                                  num_slots="i32"),
                     dict(BLOCK_E=64, C_POW2=8))
    assert "atom.global" in k.asm["ptx"]


ROW_PTRS = ("hidden_ptr", "probs_ptr", "row_index_ptr", "out_ptr", "out_probs_ptr", "H", "src_ptr", "grad_out_ptr",
            "expert_out_ptr", "grad_eo_ptr", "grad_probs_ptr")


@pytest.mark.parametrize("dt", ["*bf16", "*fp16", "*fp32"])
def test_row_kernels_compile_with_vector_access(dt):
    common = dict(K=8, K_POW2=8, BLOCK_H=tp.COPY_BLOCK_H)
    nw = tp._num_warps(tp.COPY_BLOCK_H, 8)
    kernels = [
        compile_sm90(tp._permute_kernel, dict(hidden_ptr=dt, probs_ptr="*fp32", row_index_ptr="*i64", out_ptr=dt,
                                              out_probs_ptr="*fp32", H="i32", N="i32"), common, nw, ROW_PTRS),
        compile_sm90(tp._gather_sum_kernel, dict(src_ptr=dt, probs_ptr="*fp32", row_index_ptr="*i64", out_ptr=dt,
                                                 H="i32", N="i32"), dict(common, HAS_PROBS=True), nw, ROW_PTRS),
        compile_sm90(tp._unpermute_bwd_kernel, dict(grad_out_ptr=dt, expert_out_ptr=dt, probs_ptr="*fp32",
                                                    row_index_ptr="*i64", grad_eo_ptr=dt, grad_probs_ptr="*fp32",
                                                    H="i32", N="i32"), dict(common, NEED_EO=True, NEED_PROBS=True), nw,
                     ROW_PTRS),
    ]
    for k in kernels:
        ops = set(re.findall(r"(?:st|ld)\.global[\w.]*", k.asm["ptx"]))
        assert "st.global.v4.b32" in ops and "ld.global.v4.b32" in ops, ops
    # odd K and a width-1 block (H == 0 launches) compile too
    compile_sm90(tp._permute_kernel, dict(hidden_ptr=dt, probs_ptr="*fp32", row_index_ptr="*i64", out_ptr=dt,
                                          out_probs_ptr="*fp32", H="i32", N="i32"), dict(K=6, K_POW2=8, BLOCK_H=1))
