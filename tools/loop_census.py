"""Instruction census of the innermost loops of the lp_dist micro-kernels (objdump -d).

For each kernel symbol of one SIMD copy, finds the loops (a backward conditional jump to an
address inside the same function) that contain no other loop, and counts their instructions
by class: vector arithmetic, loads/broadcasts, stores, shuffles/inserts (per-lane work that a
clean kernel does not need), scalar. Used for bench/RESULTS.md ("Disassembly").

    python tools/loop_census.py drp_kernels/ops/_C*.so --isa avx2 [--json out.json]
"""
import argparse
import json
import re
import subprocess
from collections import Counter

KERNELS = ["fwd_max<float, 2, true>", "fwd_max<float, 4, true>", "fwd_max<float, 4, false>",
           "fwd_pow_sum<float, 2, 8, false, false>", "fwd_pow_sum<float, 4, 8, false, false>",
           "fwd_pow_sum<float, 2, -1, true, true>", "fwd_pow_sum<float, 4, -1, true, true>",
           "fwd_pow_sum<float, 2, -1, true, false>", "fwd_pow_sum<float, 4, -1, true, false>",
           "fwd_sparse_sum<float, 2>", "fwd_sparse_sum<float, 4>",
           "fwd_max_chunks<float, 4>", "fwd_sparse_gated<float, 8>", "bwd_block_e<float, 16>",
           "bwd_block_e<float, 23>", "bwd_pairs<float>",
           "bwd_rows<float, 7, false, true, true>", "bwd_rows<float, 7, false, true, false>",
           "bwd_rows<float, -1, false, true, false>", "bwd_sparse<float>",
           # the kernels of the previous revision (same census on an older build)
           "tile_max<float, true>", "tile_max<float, false>", "tile_sum<float, 8>", "tile_sum<float, -1>",
           "bwd_rows<float, 7, false>", "bwd_rows<float, -1, false>"]

LINE = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
FUNC = re.compile(r"^([0-9a-f]+) <(.*)>:$")


def classify(op, args):
    if op.startswith("j") or op in ("cmp", "test"):
        return "branch/compare"
    if op in ("vinsertps", "vinsertf128", "vpinsrd", "vextractf128", "vpermps", "vshufps", "kmovw", "kmovb",
              "vpbroadcastd", "vmovd", "vmovss"):
        return "per-lane/shuffle"
    if op.startswith("vbroadcast"):
        return "broadcast"
    if op.startswith(("vmov", "movs")) and "(" in args:
        dst = args.split(",")[-1]
        return "store" if "(" in dst else "load"
    if op.startswith("v") or op.startswith("k"):
        return "vector op" + (" (mem operand)" if "(" in args else "")
    return "scalar"


def functions(path):
    if path.endswith(".txt"):  # a saved `objdump -d --no-show-raw-insn -C` listing
        with open(path) as f:
            out = f.read()
    else:
        out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", path], capture_output=True, text=True,
                             check=True).stdout
    funcs, cur = {}, None
    for line in out.splitlines():
        m = FUNC.match(line)
        if m:
            cur = m.group(2)
            funcs[cur] = []
            continue
        m = LINE.match(line)
        if m and cur is not None:
            funcs[cur].append((int(m.group(1), 16), m.group(2), m.group(3)))
    return funcs


def inner_loops(insns):
    addrs = [a for a, _, _ in insns]
    loops = []
    for i, (a, op, args) in enumerate(insns):
        if op.startswith("j") and op != "jmp":
            m = re.match(r"([0-9a-f]+)", args)
            if m:
                tgt = int(m.group(1), 16)
                if addrs[0] <= tgt < a:
                    loops.append((addrs.index(tgt) if tgt in addrs else None, i))
    loops = [(s, e) for s, e in loops if s is not None]
    return [(s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("so", help="the extension (.so) or a saved objdump listing (.txt)")
    ap.add_argument("--isa", default="avx2")
    ap.add_argument("--min", type=int, default=12, help="ignore loops with fewer instructions")
    ap.add_argument("--json")
    args = ap.parse_args()
    funcs = functions(args.so)
    report = {}
    for name, insns in funcs.items():
        if f"::{args.isa}::" not in name:
            continue
        short = name.split(f"::{args.isa}::", 1)[1].split("(")[0]
        if not any(k in short for k in KERNELS) and "fwd_tile_impl" not in short:
            continue
        for n, (s, e) in enumerate(inner_loops(insns)):
            body = insns[s:e + 1]
            if len(body) < args.min:
                continue
            c = Counter(classify(op, a) for _, op, a in body)
            ops = Counter(op for _, op, _ in body)
            report[f"{short} loop {n}"] = {"instructions": len(body), "classes": dict(c),
                                           "ops": dict(ops.most_common())}
    for k, v in report.items():
        print(f"{k}: {v['instructions']} instructions; " + ", ".join(f"{a} {b}" for a, b in v["classes"].items()))
        print("    " + ", ".join(f"{o} {n}" for o, n in v["ops"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
