"""Decode attention over a KIVI cache vs bf16 SDPA over a plain cache, on CUDA.

For each shape and bit width: check the op against the reference at a reduced batch, then
time the KIVI op (tensor-core path where it serves), bf16 SDPA on a [B, H, L, D] cache (best
of its backends) and our op's plain-cache path (n_quantized 0, ring of R = L) on that cache;
at 2 bits also with 4 sink tokens. Times are GPU times:
a CUDA graph replays the call over enough copies of the inputs to exceed L2 several times
(triton.testing.do_bench, median, L2 flushed before every replay), divided by the copies.
Then the flush kernel with the predicate true for every slot, and false; the prompt
quantization of prefill (Triton against the reference, bit for bit, timed); one decode step
(flush + attention through torch.ops) under torch.compile(mode="reduce-overhead",
fullgraph=True) against eager. Random data; every slot at length L.

    python scripts/bench_attention.py [--quick] [--splits] [--caps] [--json OUT] [--against DIR]

--caps also times the tensor-core path with ptxas' register cap forced to none, 192 and 168
(8, 8 and 12 warps an SM), each at the default split count for that residency.

--against DIR also times, on the same inputs in the same process, the op of another version:
DIR holds its decode_attention.py and mma_attention.py (and wgmma_attention.py, where that version
has one), for instance from `git show REV:kernels/decode_attention.py > DIR/decode_attention.py`
(and the same for the others).

--json writes {"device", "torch", "triton", "rows": [{"shape", "bits", "kivi_us", "sdpa_us"}]}.
"""

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402,F401  registers torch.ops.kivi
from kernels import mma_attention  # noqa: E402
from kernels.decode_attention import decode_attention  # noqa: E402
from kernels.quantize import flush, quantize_prompt  # noqa: E402
from kernels.reference import decode_attention_reference, flush_reference, quantize_prompt_reference  # noqa: E402
from kivi_cache import n_quantized  # noqa: E402

SHAPES = [  # B, L, Hq, H, D
    (32, 4096, 32, 32, 128),
    (8, 32768, 32, 32, 128),
    (32, 8192, 32, 8, 128),
    (16, 8192, 64, 8, 128),
    (64, 8192, 71, 1, 64),
    (64, 2048, 9, 3, 64),
]
G, R = 32, 128
ROTATE_BYTES = 256 << 20  # several times the L2 of an H100 (50 MB) or H200 (60 MB)


def kivi_cache(B: int, H: int, L: int, D: int, bits: int, dtype: torch.dtype) -> dict:
    """Random packed store, scales and mins for L tokens, ring; no sinks."""
    words = lambda *s: torch.randint(-2**31, 2**31 - 1, s, device="cuda", dtype=torch.int32)
    pos = lambda *s: (torch.rand(s, device="cuda") * 0.2 + 0.01).to(dtype)
    sym = lambda *s: torch.randn(s, device="cuda", dtype=dtype)
    return dict(
        k_ring=sym(B, H, R, D), v_ring=sym(B, H, R, D), k_sink=sym(B, H, 0, D), v_sink=sym(B, H, 0, D),
        k_packed=words(B, H, L, D * bits // 32), k_scale=pos(B, H, L // G, D), k_min=-sym(B, H, L // G, D).abs(),
        v_packed=words(B, H, L, D * bits // 32), v_scale=pos(B, H, D // G, L), v_min=-sym(B, H, D // G, L).abs(),
    )


def plain_cache(k: torch.Tensor, v: torch.Tensor) -> dict:
    """The fp cache as our op reads it: a ring of R = L, empty sinks and packed store."""
    B, H, _, D = k.shape
    empty = lambda *s, dtype=k.dtype: torch.empty(B, H, *s, device="cuda", dtype=dtype)
    return dict(k_ring=k, v_ring=v, k_sink=empty(0, D), v_sink=empty(0, D),
                k_packed=empty(0, D // 16, dtype=torch.int32), k_scale=empty(0, D), k_min=empty(0, D),
                v_packed=empty(0, D // 16, dtype=torch.int32),
                v_scale=empty(D // G, 0), v_min=empty(D // G, 0))


def cache_bytes(L: int, D: int, bits: int, itemsize: int) -> int:
    """Bytes one (slot, kv head) reads: codes, scales and mins of n_q tokens, the ring's rest."""
    nq = n_quantized(L, R, G)
    return (nq * D * bits // 8 * 2 + nq // G * D * 2 * itemsize + nq * D // G * 2 * itemsize
            + (L - nq) * D * 2 * itemsize)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in output"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def same_bits(a: dict, b: dict) -> bool:
    """Every buffer of two caches equal bit for bit."""
    bits = lambda t: t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return all(torch.equal(bits(a[name]), bits(b[name])) for name in a)


def bench(calls: list) -> float:
    """GPU microseconds per call: one CUDA graph runs every call of the list once."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median") * 1e3 / len(calls)


def time_register_caps(kv_args, n: int) -> dict:
    """The op with mma_attention.register_cap forced to each cap (None: ptxas' choice); the
    split count follows the cap's residency (default_splits)."""
    default_cap, times = mma_attention.register_cap, {}
    for cap in (None, 192, 168):
        mma_attention.register_cap = lambda *_, cap=cap: cap
        times[cap] = round(bench([lambda i=i: decode_attention(*kv_args(i)) for i in range(n)]), 1)
    mma_attention.register_cap = default_cap
    return times


def load_version(folder: Path):
    """decode_attention() of the version in `folder`, calling that version's tensor-core kernels
    (its wgmma_attention.py too where the folder has one; the helpers that imports from
    kernels.mma_attention are this checkout's)."""
    modules = {}
    names = ["mma_attention"] + (["wgmma_attention"] if (folder / "wgmma_attention.py").is_file() else [])
    for name in names + ["decode_attention"]:
        spec = importlib.util.spec_from_file_location(f"other_{name}", folder / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    for name in names:
        setattr(modules["decode_attention"], name, modules[name])
    return modules["decode_attention"].decode_attention


def copies(nbytes: int) -> int:
    return max(1, min(16, math.ceil(ROTATE_BYTES / nbytes)))


def sdpa_best(qs: list, ks: list, vs: list) -> tuple[float, str]:
    best = (float("inf"), "")
    gqa = qs[0].shape[1] != ks[0].shape[1]
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel(backend):
                calls = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
                         for q, k, v in zip(qs, ks, vs)]
                best = min(best, (bench(calls), backend.name.lower()))
        except RuntimeError:
            continue
    return best


def check_compiled_step() -> float:
    """flush + decode_attention through torch.ops under torch.compile(mode="reduce-overhead",
    fullgraph=True) against eager; returns the max abs difference over 3 steps."""
    B, H, Hq, L, D, bits = 4, 4, 8, 1024, 128, 2
    c = kivi_cache(B, H, L, D, bits, torch.bfloat16)
    c["k_sink"], c["v_sink"] = (torch.randn(B, H, 4, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([R, R + G, 700, 1000], device="cuda", dtype=torch.int32)

    def step(q, lengths, n_q, *bufs):
        torch.ops.kivi.flush(bufs[0], bufs[1], *bufs[4:], lengths, bits, bits, G, 4)
        return torch.ops.kivi.decode_attention(q, *bufs, lengths, n_q, bits, bits, G, D**-0.5)

    for t in c.values():
        torch._dynamo.mark_static_address(t)  # the cache is a static buffer, as in the engine
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    diff = 0.0
    with torch.inference_mode():
        for i in range(3):
            q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
            lens = lengths + i
            n_q = n_quantized(lens, R, G)
            eager_bufs = {k: t.clone() for k, t in c.items()}
            want = step(q, lens, n_q, *eager_bufs.values())
            got = compiled(q, lens, n_q, *c.values()).clone()
            diff = max(diff, (got.float() - want.float()).abs().max().item(),
                       max((c[k].float() - eager_bufs[k].float()).abs().max().item() for k in c))
    return diff


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--splits", action="store_true", help="also time the packed splits 2..32 at 2 bits")
    parser.add_argument("--caps", action="store_true", help="also time register caps none, 192 and 168")
    parser.add_argument("--json", type=Path, help="write the KIVI and SDPA times here")
    parser.add_argument("--against", type=Path, help="a folder with another version's two kernel modules")
    args = parser.parse_args()
    if args.json is not None and not args.json.parent.is_dir():
        sys.exit(f"error: --json {args.json}: no folder {args.json.parent}")
    missing = [f for f in ("decode_attention.py", "mma_attention.py") if args.against and not (args.against / f).is_file()]
    if missing:
        sys.exit(f"error: --against {args.against}: no {', '.join(missing)}")
    other = load_version(args.against) if args.against else None
    against_rows = []
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows = []
    for B, L, Hq, H, D in SHAPES[:1] if args.quick else SHAPES:
        sm_scale = D**-0.5
        lengths = torch.full((B,), L, device="cuda", dtype=torch.int32)
        zeros = torch.zeros(B, device="cuda", dtype=torch.int32)
        fp_bytes = B * H * L * D * 2 * 2
        n = copies(fp_bytes)
        ks = [torch.randn(B, H, L, D, device="cuda", dtype=dtype) for _ in range(n)]
        vs = [torch.randn(B, H, L, D, device="cuda", dtype=dtype) for _ in range(n)]
        qs = [torch.randn(B, Hq, D, device="cuda", dtype=dtype) for _ in range(n)]
        fp = [plain_cache(k, v) for k, v in zip(ks, vs)]
        fp_args = lambda i, b=B: (qs[i][:b], *(t[:b] for t in fp[i].values()), lengths[:b], zeros[:b], 2, 2, G, sm_scale)
        err_fp = rel_err(decode_attention(*fp_args(0, 2)), decode_attention_reference(*fp_args(0, 2)))
        t_fp = bench([lambda i=i: decode_attention(*fp_args(i)) for i in range(n)])
        t_sdpa, backend = sdpa_best([q[:, :, None] for q in qs], ks, vs)
        del ks, vs, fp
        for bits in (2, 4):
            kv_bytes = B * H * cache_bytes(L, D, bits, 2)
            n = copies(kv_bytes)
            cs = [kivi_cache(B, H, L, D, bits, dtype) for _ in range(n)]
            nq = torch.full((B,), n_quantized(L, R, G), device="cuda", dtype=torch.int32)
            kv_args = lambda i, b=B: (qs[i % len(qs)][:b], *(t[:b] for t in cs[i].values()), lengths[:b], nq[:b],
                                      bits, bits, G, sm_scale)
            ref = decode_attention_reference(*kv_args(0, 2))
            err = rel_err(decode_attention(*kv_args(0, 2)), ref)
            t_kivi = bench([lambda i=i: decode_attention(*kv_args(i)) for i in range(n)])
            if bits == 2:  # the same with 4 sink tokens
                sink = torch.randn(B, H, 4, D, device="cuda", dtype=dtype)
                sink_args = lambda i: (*kv_args(i)[:3], sink, sink, *kv_args(i)[5:])
                t_sinks = bench([lambda i=i: decode_attention(*sink_args(i)) for i in range(n)])
                print(f"  4 sinks: {t_sinks:.1f} us ({t_sinks / t_kivi - 1:+.1%})", flush=True)
            rows.append((f"B{B} L{L} {Hq}/{H} D{D}", bits, t_kivi, t_sdpa, backend, t_fp,
                         kv_bytes / t_kivi / 1e6, fp_bytes / t_sdpa / 1e6, fp_bytes / t_fp / 1e6, err, err_fp))
            print(rows[-1], flush=True)
            if args.splits and bits == 2:
                sweep = {s: bench([lambda i=i, s=s: decode_attention(*kv_args(i), num_splits=s) for i in range(n)])
                         for s in (2, 4, 8, 16, 32)}
                print("  num_splits (us):", {s: round(t, 1) for s, t in sweep.items()}, flush=True)
            if args.caps:
                print("  register caps (us):", time_register_caps(kv_args, n), flush=True)
            if other is not None:
                t_other = bench([lambda i=i: other(*kv_args(i)) for i in range(n)])
                t_here = bench([lambda i=i: decode_attention(*kv_args(i)) for i in range(n)])  # beside it, again
                against_rows.append((rows[-1][0], bits, t_other, t_here, rel_err(other(*kv_args(0, 2)), ref)))
                print(f"  against {args.against}: {t_other:.1f} us, this version {t_here:.1f} us", flush=True)
            del cs

    # flush at B=32 L=4096 32 heads D=128, bf16, 4 sinks: every slot due, then none
    B, H, L, D = 32, 32, 4096, 128
    flush_rows = []
    for bits in (2, 4):
        c = kivi_cache(B, H, L, D, bits, dtype)
        due = torch.full((B,), L - 96, device="cuda", dtype=torch.int32)  # (L - 96 - R) % G == 0
        none = due + 1
        flush_args = lambda lens: (c["k_ring"], c["v_ring"], c["k_packed"], c["k_scale"], c["k_min"], c["v_packed"],
                                   c["v_scale"], c["v_min"], lens, bits, bits, G, 4)
        ref = {k: t.clone() for k, t in c.items()}
        flush_reference(ref["k_ring"], ref["v_ring"], ref["k_packed"], ref["k_scale"], ref["k_min"], ref["v_packed"],
                        ref["v_scale"], ref["v_min"], due, bits, bits, G, 4)
        flush(*flush_args(due))
        exact = same_bits(c, ref)
        flush_rows.append((bits, bench([lambda: flush(*flush_args(due))]), bench([lambda: flush(*flush_args(none))]),
                           exact))
        del c, ref

    # prefill's quantization of 8 packed 1000-token prompts (896 tokens of each quantized) into
    # slots 0..7, k and v as the model makes them ([N, H, D] views of the q, k, v projection), 4 sinks
    n_prompts, length, H, D = 8, 1000, 32, 128
    count = n_quantized(length, R, G)
    prompt_rows = []
    for bits in (2, 4):
        c = kivi_cache(8, H, 4096, D, bits, dtype)
        qkv = torch.randn(n_prompts * length, 3 * H, D, device="cuda", dtype=dtype)
        k, v = qkv[:, H : 2 * H], qkv[:, 2 * H :]
        prompts = torch.tensor([[i * length, i, count] for i in range(n_prompts)], dtype=torch.int32, device="cuda")
        store = lambda bufs: [bufs[name] for name in ("k_packed", "k_scale", "k_min", "v_packed", "v_scale", "v_min")]
        ref = {name: t.clone() for name, t in c.items()}
        quantize_prompt_reference(k, v, prompts, count, *store(ref), bits, bits, G, 4)
        quantize_prompt(k, v, prompts, count, *store(c), bits, bits, G, 4)
        exact = same_bits(c, ref)
        # plain do_bench (launches included): the reference is dozens of kernels, as prefill runs it
        t_ref = triton.testing.do_bench(lambda: quantize_prompt_reference(k, v, prompts, count, *store(ref), bits, bits,
                                                                          G, 4))
        t_tri = triton.testing.do_bench(lambda: quantize_prompt(k, v, prompts, count, *store(c), bits, bits, G, 4))
        prompt_rows.append((bits, t_ref * 1e3, t_tri * 1e3, exact))
        del c, ref

    compiled_diff = check_compiled_step()
    dev = torch.cuda.get_device_name()
    print(f"\n{dev}, torch {torch.__version__}, triton {triton.__version__}, {dtype}, G={G} R={R}, GPU time per call")
    print("| shape | bits | KIVI us | SDPA bf16 us (backend) | speedup | our fp path us | KIVI TB/s | SDPA TB/s "
          "| fp path TB/s | rel err KIVI / fp |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape, bits, t_k, t_s, be, t_f, bw_k, bw_s, bw_f, e_k, e_f in rows:
        print(f"| {shape} | {bits}/{bits} | {t_k:.1f} | {t_s:.1f} ({be}) | {t_s / t_k:.2f}x | {t_f:.1f} | "
              f"{bw_k:.2f} | {bw_s:.2f} | {bw_f:.2f} | {e_k:.1e} / {e_f:.1e} |")
    if other is not None:
        print(f"\nthe op against {args.against}'s, same inputs, us (this version timed again beside it)")
        print("| shape | bits | other us | this us | change | other's rel err |")
        print("| --- | --- | --- | --- | --- | --- |")
        for shape, bits, t_o, t_h, e_o in against_rows:
            print(f"| {shape} | {bits}/{bits} | {t_o:.1f} | {t_h:.1f} | {t_h / t_o - 1:+.1%} | {e_o:.1e} |")
    print("\nflush, B=32 L=4096 H=32 D=128 bf16, 4 sinks")
    print("| bits | all due us | none due us | bit-exact vs reference |")
    print("| --- | --- | --- | --- |")
    for bits, t_due, t_none, exact in flush_rows:
        print(f"| {bits}/{bits} | {t_due:.1f} | {t_none:.1f} | {exact} |")
    print(f"\nprompt quantization, {n_prompts} prompts of {length} tokens packed ({count} of each quantized), "
          f"H={H} D={D} bf16, 4 sinks, one layer (launches included)")
    print("| bits | reference us | Triton us | speedup | bit-exact vs reference |")
    print("| --- | --- | --- | --- | --- |")
    for bits, t_ref, t_tri, exact in prompt_rows:
        print(f"| {bits}/{bits} | {t_ref:.1f} | {t_tri:.1f} | {t_ref / t_tri:.1f}x | {exact} |")
    print(f"\ntorch.compile(reduce-overhead, fullgraph) flush + decode vs eager: max abs diff {compiled_diff:.2e}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "rows": [{"shape": r[0], "bits": f"{r[1]}/{r[1]}", "kivi_us": round(r[2], 1), "sdpa_us": round(r[3], 1)}
                     for r in rows]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
