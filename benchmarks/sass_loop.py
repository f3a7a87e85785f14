"""Instruction counts of the tensor-core attention's main loop, offline (no GPU needed):

    python benchmarks/sass_loop.py [gqa gqa4 mqa mqa4 smol mha 64/8 48/1]

Compiles the packed kernel decode_attention launches for bf16 on sm_90 (kernels/wgmma_attention.py's
for the wide groups it fits, kernels/mma_attention.py's otherwise) with the installed Triton (the
counts in benchmarks/NOTES.md are Triton 3.6's, the version torch 2.11 brings), disassembles
it with the nvdisasm and cuobjdump Triton ships, and prints, per configuration, the
registers a thread and the instructions of the main loop's straight path: the backward
branch's body that holds the ring's copies (LDGSTS), less the regions that a forward
conditional branch skips (the rare ones: the lazy rescale, the key-min table).
"""

import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon import language as gl

from kernels import mma_attention, wgmma_attention

CONFIGS = {  # name: (heads per kv head, head_dim, group size, bits K, bits V)
    "gqa": (4, 128, 32, 2, 2), "gqa4": (4, 128, 32, 4, 4), "mqa": (71, 64, 32, 2, 2),
    "smol": (3, 64, 32, 2, 2), "mha": (1, 128, 32, 2, 2), "64/8": (8, 128, 32, 2, 2), "mqa4": (71, 64, 32, 4, 4),
    "48/1": (48, 128, 32, 2, 2),
}
POINTERS = {"Q": "*bf16", "K_PACKED": "*i32", "K_SCALE": "*bf16", "K_MIN": "*bf16", "V_PACKED": "*i32",
            "V_SCALE": "*bf16", "V_MIN": "*bf16", "LENGTHS": "*i32", "N_QUANTIZED": "*i32", "O_PART": "*fp32",
            "LSE_PART": "*fp32"}
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)")


def compile_cubin(HG: int, D: int, G: int, bits_k: int, bits_v: int) -> bytes:
    """The packed kernel decode_attention launches for bf16 on sm_90: wgmma_attention's for the
    wide groups it fits, mma_attention's otherwise."""
    if wgmma_attention.fits(HG, D):
        kernel, num_warps, cap = wgmma_attention._wgmma_kernel, 4, None
        constants = dict(H=8, HG=HG, L=8192, S=0, W=1 << 30, D=D, G=G, BITS_K=bits_k, BITS_V=bits_v, NUM_PARTS=8,
                         PART0=0)
    else:
        kernel, num_warps = mma_attention._mma_kernel, 1
        cap = mma_attention.register_cap(D, bits_k, bits_v, HG)  # as packed_attention launches it
        constants = dict(H=8, HG=HG, HN=16 if HG > 8 else 8, NUM_CHUNKS=triton.cdiv(HG, 16), L=8192, S=0,
                         W=1 << 30, D=D, G=G, BITS_K=bits_k, BITS_V=bits_v, NUM_PARTS=8, PART0=0, DTYPE=gl.bfloat16)
    signature = {name: POINTERS.get(name, "constexpr" if name in constants else "fp32" if name == "qk_scale"
                                    else "i32") for name in kernel.arg_names}
    aligned = [*POINTERS, "stride_qb", "stride_qh"]  # what the launcher's tensors give: 16-byte alignment
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = GluonASTSource(kernel, signature, constants, attrs=attrs)
    options = {"num_warps": num_warps}
    if cap is not None:
        options["maxnreg"] = cap
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]


def loop_counts(cubin: bytes) -> tuple[int, collections.Counter]:
    """(registers, opcode counts of the main loop's straight path)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([TOOLS / "nvdisasm", "-c", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([TOOLS / "cuobjdump", "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    lines = sass.splitlines()
    code = [(int(m.group(1), 16), m.group(2), line) for line in lines if (m := INSTRUCTION.match(line))]
    labels = {}  # label -> address of the instruction after it
    for i, line in enumerate(lines):
        following = (int(m.group(1), 16) for x in lines[i + 1:] if (m := INSTRUCTION.match(x)))
        if re.match(r"\.L_x_\d+:", line.strip()):
            labels[line.strip()[:-1]] = next(following, None)
    branches = [(addr, labels[m.group(1)], text) for addr, op, text in code
                if op == "BRA" and (m := re.search(r"(\.L_x_\d+)", text)) and labels.get(m.group(1)) is not None]
    loops = [(target, addr) for addr, target, _ in branches if target < addr]
    in_loop = lambda lo, hi: [c for c in code if lo <= c[0] <= hi]
    lo, hi = max(loops, key=lambda r: sum("LDGSTS" in c[1] for c in in_loop(*r)))
    skipped = set()
    for addr, target, text in branches:
        if lo <= addr <= hi and target > addr and re.search(r"@!?P\d", text):
            skipped |= {c[0] for c in in_loop(addr + 1, target - 1)}
    return registers, collections.Counter(op for addr, op, _ in in_loop(lo, hi) if addr not in skipped)


def main() -> None:
    names = sys.argv[1:] or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"error: unknown configuration {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    for name in names:
        HG, D, G, bits_k, bits_v = CONFIGS[name]
        registers, ops = loop_counts(compile_cubin(*CONFIGS[name]))
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(12))
        print(f"{name:5} HG {HG} D {D} G {G} bits {bits_k}/{bits_v}: {registers} registers, "
              f"{sum(ops.values())} loop instructions ({top})")


if __name__ == "__main__":
    main()
