"""Checks and benchmarks of the dispatch kernels: `relibra-verl bench-kernels`, bench/gpu_check.sh.

cpu:  every kernel (forward and backward) under Triton's interpreter against its torch reference on
      randomized small inputs, fp32 and fp16 (the interpreter computes bf16 arithmetic wrongly).
cuda: the same checks in bf16 and fp32 with compiled kernels, a cross-check against Megatron-Core's
      permute when importable, then timings (median of triton.testing.do_bench, L2 flushed between runs)
      for T in {4096, 16384, 65536}, K = 8, H in {2048, 4096}, against Megatron-Core's unfused (and,
      with Transformer Engine, fused) permute/unpermute and a plain torch argsort implementation, and
      the card's device-to-device copy bandwidth.

Bandwidth is counted as the minimal traffic of the work (the same for every implementation):
permute reads T token rows and writes N rows; unpermute reads N rows and writes T rows; copy reads and
writes its buffer. Problem tables: E = G*S experts, G EP ranks in one node, R replica slots per rank,
the hottest G*R experts get one replica each, quotas about half of their pairs (perturbed, so they do
not match the routing exactly).
"""
import datetime
import platform
import time

import torch

from ._utils import HAVE_TRITON
from .slot_assign import assign_slots, assign_slots_reference
from .token_permute import permute, permute_reference, unpermute, unpermute_reference

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 5e-3), torch.bfloat16: (6e-2, 2e-2)}  # atol, rtol
BENCH_T = (4096, 16384, 65536)
BENCH_H = (2048, 4096)
BENCH_K = 8
GOAL_CASE = dict(T=16384, K=8, H=2048)


# ---------------------------------------------------------------- problems

def make_tables(topk_ids, E, G, S, R, gen, quota_noise=0.2):
    """copy_slot [E, C=G], quota [E, C] for one source rank (one node of G ranks); num_slots = G*(S+R)."""
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64).cpu()
    counts = torch.bincount(flat[flat >= 0], minlength=E)[:E]
    copy_slot = torch.full((E, G), -1, dtype=torch.int64)
    quota = torch.zeros((E, G), dtype=torch.int64)
    e_all = torch.arange(E)
    copy_slot[:, 0] = (e_all // S) * (S + R) + e_all % S
    free = [R] * G
    hot = torch.argsort(counts, descending=True, stable=True)[: G * R].tolist()
    for i, e in enumerate(hot):
        home = e // S
        for step in range(1, G):
            r = (home + i + step) % G
            if r != home and free[r]:
                break
        else:
            continue
        copy_slot[e, 1] = r * (S + R) + S + (R - free[r])
        free[r] -= 1
        noise = 1.0 + quota_noise * (2 * float(torch.rand((), generator=gen)) - 1)
        quota[e, 1] = int(counts[e] * 0.5 * noise)
    return copy_slot.to(dev), quota.to(dev), G * (S + R)


def make_problem(T, K, H, dtype, device, seed=0, E=16, G=4, R=1, mask=0.0, probs_dtype=None):
    """Random top-k routing with skew -> dict of inputs for all three kernels."""
    gen = torch.Generator().manual_seed(seed)
    S = E // G
    K = min(K, E)
    logits = torch.randn(T, E, generator=gen) + torch.linspace(2.0, 0.0, E)  # low ids hotter
    ids = torch.topk(logits, K, dim=1).indices if T else torch.zeros(0, K, dtype=torch.int64)
    ids = ids.to(torch.int32)
    if mask:
        ids[torch.rand(T, K, generator=gen) < mask] = -1
    copy_slot, quota, num_slots = make_tables(ids, E, G, S, R, gen)
    probs = torch.softmax(torch.randn(T, K, generator=gen), dim=1).to(probs_dtype or dtype)
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    return dict(ids=ids.to(device), copy_slot=copy_slot.to(device), quota=quota.to(device), num_slots=num_slots,
                probs=probs.to(device), hidden=hidden.to(device), T=T, K=K, H=H, E=E)


# ---------------------------------------------------------------- checks

def _err(a, b):
    if a.numel() == 0:
        return 0.0
    return float((a.detach().float() - b.detach().float()).abs().max())


def check_case(p, backend="triton"):
    """Kernels (backend) against the references on one problem. Returns a record with ok and errors."""
    dt = p["hidden"].dtype
    atol, rtol = TOL[dt]
    T = p["T"]
    rec = dict(T=T, K=p["K"], H=p["H"], E=p["E"], dtype=str(dt).replace("torch.", ""),
               probs_dtype=str(p["probs"].dtype).replace("torch.", ""), device=p["hidden"].device.type)
    fails = []
    slot, counts = assign_slots(p["ids"], p["copy_slot"], p["quota"], p["num_slots"], backend=backend)
    slot_r, counts_r = assign_slots_reference(p["ids"], p["copy_slot"], p["quota"], p["num_slots"])
    if not (torch.equal(slot, slot_r) and torch.equal(counts, counts_r)):
        fails.append("assign_slots")

    hidden = p["hidden"].clone().requires_grad_()
    probs = p["probs"].clone().requires_grad_()
    hidden_r = p["hidden"].clone().requires_grad_()
    probs_r = p["probs"].clone().requires_grad_()
    perm, pp, ri = permute(hidden, probs, slot, counts, backend=backend)
    perm_r, pp_r, ri_r = permute_reference(hidden_r, probs_r, slot_r, counts_r)
    if not (torch.equal(ri, ri_r) and torch.equal(perm, perm_r) and torch.equal(pp, pp_r)):
        fails.append("permute")

    gen = torch.Generator().manual_seed(T + 1)
    eo_data = torch.randn(perm.shape, generator=gen).to(device=perm.device, dtype=dt)
    eo = eo_data.clone().requires_grad_()
    eo_r = eo_data.clone().requires_grad_()
    out = unpermute(eo, probs, ri, T, backend=backend)
    out_r = unpermute_reference(eo_r, probs_r, ri_r, T)
    rec["unpermute_err"] = _err(out, out_r)
    if not torch.allclose(out.float(), out_r.float(), atol=atol, rtol=rtol):
        fails.append("unpermute")

    g_out = torch.randn(T, p["H"], generator=gen).to(device=perm.device, dtype=dt)
    g_perm = torch.randn(perm.shape, generator=gen).to(device=perm.device, dtype=dt)
    g_pp = torch.randn(pp.shape, generator=gen).to(device=perm.device, dtype=pp.dtype)

    def grads(perm_, pp_, out_, leaves):
        loss = (perm_.float() * g_perm.float()).sum() + (pp_.float() * g_pp.float()).sum() \
            + (out_.float() * g_out.float()).sum()
        got = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(got, leaves)]

    gk = grads(perm, pp, out, [hidden, probs, eo])
    gr = grads(perm_r, pp_r, out_r, [hidden_r, probs_r, eo_r])
    for name, a, b in zip(("grad_hidden", "grad_probs", "grad_expert_out"), gk, gr):
        rec[name + "_err"] = _err(a, b)
        # fp32 sums of up to K*2 terms in either order; reference half-precision grads round per add
        if not torch.allclose(a.float(), b.float(), atol=atol * 4, rtol=rtol * 2):
            fails.append(name)
    rec["ok"] = not fails
    rec["failed"] = fails
    return rec


def cpu_cases(seed=0):
    """Randomized small problems for the interpreter: T = 0, K = 1 and 8, masked, skewed, fp32/fp16."""
    gen = torch.Generator().manual_seed(seed)
    cases = [dict(T=0, K=8, H=16), dict(T=1, K=1, H=8), dict(T=33, K=8, H=24, mask=1.0),
             dict(T=48, K=8, H=16, E=32, G=8, R=2), dict(T=17, K=1, H=40, mask=0.2)]
    for _ in range(3):
        cases.append(dict(T=int(torch.randint(2, 60, (), generator=gen)), K=int(torch.randint(1, 9, (), generator=gen)),
                          H=int(torch.randint(1, 70, (), generator=gen)), mask=0.1))
    out = []
    for i, c in enumerate(cases):
        for dt in (torch.float32, torch.float16):
            out.append(dict(c, dtype=dt, seed=seed * 100 + i))
    out.append(dict(T=20, K=4, H=16, dtype=torch.float16, probs_dtype=torch.float32, seed=seed * 100 + 99))
    return out


def run_checks(device, cases):
    recs = []
    for c in cases:
        c = dict(c)
        dt = c.pop("dtype")
        T, K, H = c.pop("T"), c.pop("K"), c.pop("H")
        p = make_problem(T, K, H, dt, device, **c)
        t0 = time.perf_counter()
        rec = check_case(p)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        recs.append(rec)
    return recs


def megatron_cross_check(p):
    """Our permute/unpermute equal Megatron-Core's unfused ones on the slot-space routing map (exactly for
    permute; within fp tolerance for unpermute). Returns a record, or one with 'skipped'."""
    try:
        from megatron.core.transformer.moe import moe_utils
    except Exception as exc:  # noqa: BLE001  (any import failure means: not available here)
        return dict(skipped=f"megatron-core not importable: {type(exc).__name__}: {exc}")
    slot, counts = assign_slots(p["ids"], p["copy_slot"], p["quota"], p["num_slots"], backend="triton")
    perm, pp, ri = permute(p["hidden"], p["probs"], slot, counts, backend="triton")
    rmap, probs_dense = dense_routing(slot, p["probs"], p["num_slots"])
    n = perm.shape[0]
    m_perm, m_pp, m_idx, _, _ = moe_utils.permute(p["hidden"], rmap, probs=probs_dense, num_out_tokens=n)
    eo = torch.randn(perm.shape, generator=torch.Generator().manual_seed(1)).to(perm)
    ours = unpermute(eo, p["probs"], ri, p["T"], backend="triton")
    theirs = moe_utils.unpermute(eo, m_idx, p["hidden"].shape, probs=probs_dense, routing_map=rmap)
    atol, rtol = TOL[p["hidden"].dtype]
    return dict(permute_equal=bool(torch.equal(perm, m_perm) and torch.equal(pp, m_pp.to(pp.dtype))),
                unpermute_err=_err(ours, theirs),
                unpermute_close=bool(torch.allclose(ours.float(), theirs.float(), atol=atol * 4, rtol=rtol * 2)))


def dense_routing(slot_of_pair, probs, num_slots):
    """[T, K] slots -> Megatron's routing_map [T, num_slots] bool and probs [T, num_slots]."""
    T, K = slot_of_pair.shape
    valid = slot_of_pair >= 0
    rows = torch.arange(T, device=slot_of_pair.device).unsqueeze(1).expand(T, K)[valid]
    cols = slot_of_pair[valid]
    rmap = torch.zeros(T, num_slots, dtype=torch.bool, device=slot_of_pair.device)
    rmap[rows, cols] = True
    dense = torch.zeros(T, num_slots, dtype=probs.dtype, device=probs.device)
    dense[rows, cols] = probs[valid]
    return rmap, dense


# ---------------------------------------------------------------- benchmarks (CUDA)

def do_bench_median_ms(fn):
    """Median ms of fn on the GPU (triton.testing.do_bench: L2 flushed before each run)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(nbytes=1 << 30, device="cuda", timer=do_bench_median_ms):
    """Device-to-device copy GB/s (bytes read + written), median over runs."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / ms / 1e6, ms


def bench_case(T, K, H, dtype=torch.bfloat16, E=128, G=8, R=2, seed=0, moe_utils=None, have_te=False,
               device="cuda", timer=do_bench_median_ms):
    """Median ms and effective GB/s of each implementation on one problem; returns a list of rows."""
    p = make_problem(T, K, H, dtype, device, seed=seed, E=E, G=G, R=R, probs_dtype=torch.float32)
    ids, cs, q, ns = p["ids"], p["copy_slot"], p["quota"], p["num_slots"]
    hidden, probs = p["hidden"], p["probs"]
    elt = hidden.element_size()
    slot, counts = assign_slots(ids, cs, q, ns, backend="triton")
    n = int(counts.sum())
    perm_bytes = (T + n) * H * elt
    rows = []

    def add(name, fn, nbytes, note=""):
        if device == "cuda":
            torch.cuda.synchronize()
        ms = timer(fn)
        rows.append(dict(T=T, K=K, H=H, dtype=str(dtype).replace("torch.", ""), impl=name, median_ms=round(ms, 4),
                         GBps=round(nbytes / ms / 1e6, 1) if nbytes else None, note=note))

    add("relibra_assign_slots", lambda: assign_slots(ids, cs, q, ns, backend="triton", validate=False),
        T * K * (4 + 8), "ids in, slots out")
    add("relibra_permute", lambda: permute(hidden, probs, slot, counts, backend="triton", validate=False,
                                           num_out=n), perm_bytes)

    def ours_assign_permute():
        s, c = assign_slots(ids, cs, q, ns, backend="triton", validate=False)
        return permute(hidden, probs, s, c, backend="triton", validate=False, num_out=n)

    add("relibra_assign_permute", ours_assign_permute, perm_bytes, "goal metric: no host sync (N known)")

    def ours_validated():
        s, c = assign_slots(ids, cs, q, ns, backend="triton")
        return permute(hidden, probs, s, c, backend="triton")

    add("relibra_assign_permute_validated", ours_validated, perm_bytes, "default arguments: value checks, syncs")
    perm, pp, ri = permute(hidden, probs, slot, counts, backend="triton")
    eo = torch.randn_like(perm)
    add("relibra_unpermute", lambda: unpermute(eo, probs, ri, T, backend="triton", validate=False),
        (n + T) * H * elt)
    h_g = hidden.clone().requires_grad_()
    g_perm = torch.randn_like(perm)

    def ours_permute_fwd_bwd():
        out, _, _ = permute(h_g, probs, slot, counts, backend="triton", validate=False, num_out=n)
        out.backward(g_perm)

    add("relibra_permute_fwd_bwd", ours_permute_fwd_bwd, 2 * perm_bytes)
    eo_g = eo.clone().requires_grad_()
    pr_g = probs.clone().requires_grad_()
    g_out = torch.randn_like(hidden)

    def ours_unpermute_fwd_bwd():
        unpermute(eo_g, pr_g, ri, T, backend="triton", validate=False).backward(g_out)

    add("relibra_unpermute_fwd_bwd", ours_unpermute_fwd_bwd, (n + T) * H * elt + (2 * n + T) * H * elt)
    del h_g, eo_g, pr_g

    # plain torch argsort implementation (the references)
    def torch_assign_permute():
        s, c = assign_slots_reference(ids, cs, q, ns)
        return permute_reference(hidden, probs, s, c, num_out=n)

    add("torch_argsort_assign_permute", torch_assign_permute, perm_bytes)
    add("torch_unpermute", lambda: unpermute_reference(eo, probs, ri, T), (n + T) * H * elt)

    if moe_utils is not None:
        rmap, probs_dense = dense_routing(slot, probs, ns)
        add("megatron_permute_unfused",
            lambda: moe_utils.permute(hidden, rmap, probs=probs_dense, num_out_tokens=n), perm_bytes,
            "routing_map [T, slots] given (its build not timed)")
        _, _, m_idx, _, _ = moe_utils.permute(hidden, rmap, probs=probs_dense, num_out_tokens=n)
        add("megatron_unpermute_unfused",
            lambda: moe_utils.unpermute(eo, m_idx, hidden.shape, probs=probs_dense, routing_map=rmap),
            (n + T) * H * elt)
        if have_te:
            try:
                add("megatron_permute_fused_te",
                    lambda: moe_utils.permute(hidden, rmap, probs=probs_dense, num_out_tokens=n, fused=True),
                    perm_bytes)
                _, _, f_idx, _, _ = moe_utils.permute(hidden, rmap, probs=probs_dense, num_out_tokens=n, fused=True)
                add("megatron_unpermute_fused_te",
                    lambda: moe_utils.unpermute(eo, f_idx, hidden.shape, probs=probs_dense, routing_map=rmap,
                                                fused=True), (n + T) * H * elt)
            except Exception as exc:  # noqa: BLE001
                rows.append(dict(T=T, K=K, H=H, impl="megatron_fused_te", error=f"{type(exc).__name__}: {exc}"))
    del perm, pp, ri, eo
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def versions():
    v = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda)
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    try:
        import megatron.core

        v["megatron_core"] = megatron.core.__version__
    except Exception:  # noqa: BLE001
        v["megatron_core"] = None
    try:
        import transformer_engine

        v["transformer_engine"] = transformer_engine.__version__
    except Exception:  # noqa: BLE001
        v["transformer_engine"] = None
    return v


def run_cpu(seed=0, log=print):
    """Interpreter checks. Returns the report dict (report['ok'])."""
    recs = run_checks("cpu", cpu_cases(seed))
    for r in recs:
        log(_fmt_check(r))
    mp = make_problem(50, 8, 24, torch.float32, "cpu", seed=seed, E=32, G=8, R=2)
    mx = megatron_cross_check(mp)
    log(f"megatron cross-check: {mx}")
    ok = all(r["ok"] for r in recs) and ("skipped" in mx or (mx["permute_equal"] and mx["unpermute_close"]))
    return dict(device="cpu", date=_now(), versions=versions(), checks=recs, megatron_cross_check=mx, ok=ok)


def cuda_cases(seed=0):
    """Checks on the GPU: edge cases and real sizes, bf16 and fp32."""
    cases = [dict(T=T, K=K_, H=H, dtype=dt, seed=seed + i, E=E, G=G, R=R, mask=m)
             for i, (T, K_, H, E, G, R, m) in enumerate([
                 (0, 8, 64, 16, 4, 1, 0.0), (1, 1, 128, 16, 4, 1, 0.0), (333, 8, 2048, 128, 8, 2, 0.05),
                 (4096, 8, 1000, 64, 8, 2, 0.0), (2048, 6, 4096, 32, 4, 1, 1.0), (5000, 8, 2304, 256, 8, 4, 0.1)])
             for dt in (torch.bfloat16, torch.float32)]
    cases.append(dict(T=4096, K=8, H=2048, dtype=torch.bfloat16, probs_dtype=torch.float32, E=128, G=8, R=2,
                      seed=seed + 77))
    return cases


def run_cuda(seed=0, Ts=BENCH_T, Hs=BENCH_H, K=BENCH_K, log=print, device="cuda", checks=None,
             timer=do_bench_median_ms, copy_bytes=1 << 30, cross_check_size=(4096, 2048)):
    """bf16/fp32 checks, Megatron cross-check, benchmarks, copy bandwidth, goal verdicts.

    device/checks/timer/copy_bytes/cross_check_size exist for a dry run of this path on CPU (tests)."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not importable")
    card = torch.cuda.get_device_name() if device == "cuda" else f"{device} (dry run)"
    report = dict(device=device, card=card, date=_now(), versions=versions(), notes=[])
    report["checks"] = run_checks(device, cuda_cases(seed) if checks is None else checks)
    for r in report["checks"]:
        log(_fmt_check(r))
    c_T, c_H = cross_check_size
    mp = make_problem(c_T, 8, c_H, torch.bfloat16 if device == "cuda" else torch.float32, device, seed=seed,
                      E=128, G=8, R=2, probs_dtype=torch.float32)
    report["megatron_cross_check"] = megatron_cross_check(mp)
    log(f"megatron cross-check: {report['megatron_cross_check']}")
    ok = all(r["ok"] for r in report["checks"])
    mx = report["megatron_cross_check"]
    if "skipped" not in mx:
        ok = ok and mx["permute_equal"] and mx["unpermute_close"]
    report["ok"] = ok

    moe_utils, have_te = None, False
    try:
        from megatron.core.transformer.moe import moe_utils as _mu
        from megatron.core.extensions.transformer_engine import HAVE_TE

        moe_utils, have_te = _mu, bool(HAVE_TE)
    except Exception as exc:  # noqa: BLE001
        report["notes"].append(f"megatron-core not importable ({type(exc).__name__}: {exc}): Megatron "
                               "comparisons skipped; carry the megatron-core 0.19.2 wheel (bench/results/README.md)")
    if moe_utils is not None and not have_te:
        report["notes"].append("Transformer Engine not present: fused Megatron permute not measured")
    bw, _ = copy_bandwidth(copy_bytes, device=device, timer=timer)
    report["copy_bandwidth_GBps"] = round(bw, 1)
    log(f"device-to-device copy: {bw:.0f} GB/s (read + write)")
    results = []
    for T in Ts:
        for H in Hs:
            try:
                rows = bench_case(T, K, H, seed=seed, moe_utils=moe_utils, have_te=have_te, device=device,
                                  timer=timer, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
            except torch.cuda.OutOfMemoryError as exc:
                rows = [dict(T=T, K=K, H=H, impl="all", error=f"OOM: {exc}")]
                torch.cuda.empty_cache()
            for r in rows:
                log(_fmt_bench(r))
            results.extend(rows)
    report["results"] = results
    report["goals"] = goals(results, bw)
    log(f"goals: {report['goals']}")
    return report


def goals(results, copy_gbps):
    """Issue 5's targets at T=16384, K=8, H=2048, bf16."""
    def pick(impl):
        for r in results:
            if r.get("impl") == impl and all(r.get(k) == v for k, v in GOAL_CASE.items()) and "median_ms" in r:
                return r
        return None

    ours, meg = pick("relibra_assign_permute"), pick("megatron_permute_unfused")
    g = dict(case=dict(GOAL_CASE, dtype="bfloat16"), copy_bandwidth_GBps=round(copy_gbps, 1))
    if ours:
        g["ours_ms"] = ours["median_ms"]
        g["fraction_of_copy_bandwidth"] = round(ours["GBps"] / copy_gbps, 3)
        g["at_least_70pct_of_copy_bandwidth"] = ours["GBps"] >= 0.7 * copy_gbps
    if ours and meg:
        g["megatron_unfused_ms"] = meg["median_ms"]
        g["speedup_vs_megatron_unfused"] = round(meg["median_ms"] / ours["median_ms"], 2)
        g["at_least_2x_megatron_unfused"] = meg["median_ms"] >= 2 * ours["median_ms"]
    else:
        g["at_least_2x_megatron_unfused"] = None
    return g


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _fmt_check(r):
    errs = " ".join(f"{k[:-4]}={r[k]:.2e}" for k in r if k.endswith("_err"))
    state = "ok  " if r["ok"] else "FAIL " + ",".join(r["failed"])
    return (f"check {r['device']} T={r['T']:<5} K={r['K']} H={r['H']:<5} E={r['E']:<3} {r['dtype']:<8} "
            f"probs={r['probs_dtype']:<8} {state} {errs}")


def _fmt_bench(r):
    if "error" in r:
        return f"bench T={r['T']} H={r['H']} {r['impl']}: {r['error']}"
    gbps = f"{r['GBps']:8.1f} GB/s" if r["GBps"] is not None else ""
    return f"bench T={r['T']:<6} K={r['K']} H={r['H']:<5} {r['impl']:<34} {r['median_ms']:9.4f} ms {gbps}"

