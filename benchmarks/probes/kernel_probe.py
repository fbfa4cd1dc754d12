"""GPU diagnostic probe behind benchmarks/results/gpu-notes.md (run by kernel_probe.sh in one device call; not part of the package).

Kept as it ran: it imports the op API of commit 6c2e5d1 (``gatedlora.ops.checks``), so run it from a checkout
of that commit (``git worktree add /tmp/probe 6c2e5d1``). tools/gpu_check.py is the maintained GPU check.

    python benchmarks/probes/kernel_probe.py ncu|sweep|twophase|decode
"""
import sys, os, time, torch, triton
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import gatedlora
from gatedlora.ops import triton_backend as tb, cuda_backend, gated_lora_fused
from gatedlora.ops.checks import GatedLoraArgs
from triton.testing import do_bench_cudagraph, do_bench

dev = torch.device("cuda")
what = sys.argv[1]

def case(m, k=4096, n=4096, r=16, frac=1.0, copies=1):
    out = []
    for _ in range(copies):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        a = torch.randn(r, k, device=dev, dtype=torch.bfloat16) * k ** -0.5
        b = torch.randn(n, r, device=dev, dtype=torch.bfloat16) * 0.02
        y = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        g = (torch.rand(m, device=dev) < frac).float()
        if frac >= 1: g.fill_(1.0)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k ** -0.5
        out.append((x, a, b, y, g, w))
    return out

def args_of(c):
    x, a, b, y, g, w = c
    return GatedLoraArgs(x, a, b, 2.0, g, None, 0.0, 0.5, True)

if what == "ncu":  # a few launches, each kernel once after a warm-up, for ncu -k
    for m in (1, 4096):
        c = case(m)[0]
        for _ in range(2):
            tb.launch(c[3], args_of(c))
            cuda_backend.launch(c[3], args_of(c))
    for m in (1, 8):
        c = case(m)[0]
        for _ in range(2):
            gated_lora_fused(c[0], c[5], None, c[1], c[2], 2.0, gate=c[4], backend="cuda")
    torch.cuda.synchronize()
    print("ncu payload done")

elif what == "sweep":  # the triton kernel alone, graph replays over 8 copies (256 KB adapters; L2 holds them all)
    rows = []
    for m in (1, 64, 4096):
        cs = case(m, copies=4 if m == 4096 else 8)
        configs = []
        for bm in (16, 64):
            if m == 1 and bm == 64: continue
            for bk in (32, 64, 128, 256):
                for warps in (2, 4, 8):
                    for stages in (1, 2, 3, 4):
                        for split in ((8, 32, 64) if m < 4096 else (1, 4, 16)):
                            configs.append((bm, bk, warps, stages, split))
        import random; random.Random(0).shuffle(configs)
        t0 = time.time()
        for bm, bk, warps, stages, split in configs[:60]:
            tiles = tb.TileConfig(bm, 64, bk, 16, warps, stages)
            def fn(it=iter(range(10**9))):
                c = cs[next(it) % len(cs)]
                tb.launch(c[3], args_of(c), tiles=tiles, n_split=split)
            try:
                t = do_bench_cudagraph(fn, rep=15, return_mode="median")
                rows.append((m, bm, bk, warps, stages, split, t * 1e3))
            except Exception as e:
                rows.append((m, bm, bk, warps, stages, split, f"ERR {type(e).__name__}: {str(e)[:80]}"))
            if time.time() - t0 > 5: break
        # default heuristic and the cuda backend for comparison
        def dflt(it=iter(range(10**9))):
            c = cs[next(it) % len(cs)]; tb.launch(c[3], args_of(c))
        def cud(it=iter(range(10**9))):
            c = cs[next(it) % len(cs)]; cuda_backend.launch(c[3], args_of(c))
        def base(it=iter(range(10**9))):
            c = cs[next(it) % len(cs)]; torch.mm(c[0], c[5].t())
        for name, f in (("default", dflt), ("cuda", cud), ("base-mm", base)):
            rows.append((m, name, do_bench_cudagraph(f, rep=15, return_mode="median") * 1e3))
    for r in sorted(rows, key=lambda r: (r[0], r[-1] if isinstance(r[-1], float) else 1e9)):
        print(r)

elif what == "decode":  # model decode capture on a small model, every provider, launch-blocking
    from gatedlora.benchmarking.models import build_llama, LlamaSpec, add_prism_adapter
    from gatedlora.benchmarking.scenarios import build_setup, make_batch, Scenario, decode_providers
    spec = LlamaSpec(512, 1024, 3, 8, 4, 1024)
    setup = build_setup(build_llama(spec, dev, torch.bfloat16), lambda m: add_prism_adapter(m, 0), 0, ["triton", "cuda"])
    sc = Scenario("decode", 4, 16, 2)
    ids, mask, open_mask = make_batch(sc, setup.vocab_size, dev)
    from gatedlora.benchmarking.cuda_graphs import capture_decode_step
    for name, model, extra in [("base", setup.base, {}), ("peft", setup.peft, {}),
                               ("peft mixed", setup.peft, {"adapter_names": ["default", "default", "__base__", "__base__"]}),
                               ("gl triton", setup.gated["triton"], {}), ("gl cuda", setup.gated["cuda"], {})]:
        for r in setup.routers.values(): r.pattern = open_mask.float()
        try:
            with torch.inference_mode():
                replay, logits = capture_decode_step(model, ids, mask, setup.cache_argument, **extra)
                replay(); torch.cuda.synchronize()
                print(name, "captured ok", logits.float().abs().mean().item())
        except Exception as e:
            import traceback; print(name, "FAILED:", type(e).__name__, str(e)[:300]); traceback.print_exc(limit=-6)
            torch.cuda.synchronize()

if what == "twophase":  # shrink with cuBLAS, expand with a 2D-grid Triton kernel that skips closed row blocks
    import triton.language as tl

    @triton.jit
    def expand_kernel(xa_ptr, b_ptr, out_ptr, gate_ptr, M, N, R, stride_xa, stride_bn, stride_om, scaling, threshold,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        pid_m = tl.program_id(0); pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = offs_m < M
        p = tl.load(gate_ptr + offs_m, mask=row_in, other=0.0)
        is_open = (p >= threshold) & row_in
        if tl.max(is_open.to(tl.int32), axis=0) == 0:
            return
        offs_r = tl.arange(0, BLOCK_R); r_in = offs_r < R
        xa = tl.load(xa_ptr + offs_m[:, None].to(tl.int64) * stride_xa + offs_r[None, :], mask=is_open[:, None] & r_in[None, :], other=0.0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N); n_in = offs_n < N
        b = tl.load(b_ptr + offs_r[:, None] + offs_n[None, :] * stride_bn, mask=r_in[:, None] & n_in[None, :], other=0.0)
        delta = tl.dot(xa, b)
        o = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        msk = is_open[:, None] & n_in[None, :]
        base = tl.load(o, mask=msk, other=0.0)
        tl.store(o, (base.to(tl.float32) + delta * scaling).to(out_ptr.dtype.element_ty), mask=msk)

    def two_phase(c, bm, bn, warps):
        x, a, b, y, g, w = c
        xa = torch.mm(x, a.t())
        m, n = y.shape
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        expand_kernel[grid](xa, b, y, g, m, n, a.shape[0], xa.stride(0), b.stride(0), y.stride(0), 2.0, 0.5,
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=16, num_warps=warps)

    for m in (1, 8, 64, 512, 4096):
        for frac in (1.0, 0.06, 0.0):
            cs = case(m, frac=frac, copies=4 if m >= 512 else 8)
            res = []
            for bm, bn, warps in ((16, 64, 4), (16, 128, 4), (32, 128, 4), (64, 128, 4), (64, 256, 8), (128, 128, 8)):
                if m <= 8 and bm > 16: continue
                def fn(it=iter(range(10**9)), bm=bm, bn=bn, warps=warps):
                    two_phase(cs[next(it) % len(cs)], bm, bn, warps)
                try:
                    res.append((f"{bm}x{bn}w{warps}", round(do_bench_cudagraph(fn, rep=15, return_mode="median") * 1e3, 1)))
                except Exception as e:
                    res.append((f"{bm}x{bn}w{warps}", f"ERR {e}"[:80]))
            def mmonly(it=iter(range(10**9))):
                c = cs[next(it) % len(cs)]; torch.mm(c[0], c[1].t())
            def fused(it=iter(range(10**9))):
                c = cs[next(it) % len(cs)]; tb.launch(c[3], args_of(c))
            def cud(it=iter(range(10**9))):
                c = cs[next(it) % len(cs)]; cuda_backend.launch(c[3], args_of(c))
            def base(it=iter(range(10**9))):
                c = cs[next(it) % len(cs)]; torch.mm(c[0], c[5].t())
            extra = [(nm, round(do_bench_cudagraph(f, rep=15, return_mode="median") * 1e3, 1))
                     for nm, f in (("shrink-mm", mmonly), ("triton-fused", fused), ("cuda", cud), ("base", base))]
            print(f"M={m} open={frac}: " + ", ".join(f"{k} {v}" for k, v in res + extra), flush=True)
