"""Compile every Triton kernel of drp_kernels ahead of time (Triton -> PTX -> cubin) without a GPU.

The launch configurations are not written down here: the real launchers in ``drp_kernels.ops``
run on fake CUDA tensors (``FakeTensorMode``) with a stub Triton driver whose target is the
chosen ``sm_XX``, and ``JITFunction.run`` is replaced by a recorder. Whatever block sizes,
heuristics (``EVEN_D``), ``num_warps``, ``num_stages``, dot precision and argument
specialisations the launchers pick for a CUDA device is therefore exactly what gets compiled.
With ``--autotune`` the ops are imported with ``DRP_AUTOTUNE=1`` and every config that the
autotuner would benchmark (after its pruning) is compiled instead.

Triton's ``triton.compile`` needs no driver for a given ``GPUTarget``: the nvidia backend only
runs its MLIR passes, LLVM and the ``ptxas`` bundled in the wheel. The stub driver exists
because ``JITFunction`` asks the active driver for the device, stream and target when binding
arguments.

Must run in a process WITHOUT ``TRITON_INTERPRET`` (under the interpreter ``triton.jit``
returns an ``InterpretedFunction``). Usage::

    python tools/triton_aot.py --arch 80 --arch 90 [--op proto_loss] [--autotune] [--jobs 2] [--list]

Prints one JSON object per line ({"arch", "kernel", "config", "ok", "error", "seconds", ...})
and exits with status 1 if any compile failed, 2 if the launch capture itself failed.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

from drp_kernels.ops._triton_utils import interpreter_enabled  # noqa: E402  (the one TRITON_INTERPRET parser)

if interpreter_enabled():
    raise SystemExit("tools/triton_aot.py must run without TRITON_INTERPRET (the interpreter cannot compile)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature  # noqa: E402

from drp_kernels._constants import METRICS, REPULSION_KINDS  # noqa: E402

# SM count of the reference part of each architecture (A100, H100 SXM): launchers that size
# their grid from torch.cuda.get_device_properties see these.
_SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}
# Largest dynamic shared memory per block (opt-in) and registers per block, by compute capability.
MAX_SHARED = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
REGS_PER_BLOCK = 65536
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _AotDriver:
    """The slice of Triton's driver interface that JITFunction binding needs, for a fixed target."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cuda", 0)

    def is_active(self):
        return True


class _DeviceProps:
    def __init__(self, arch: int):
        self.multi_processor_count = _SM_COUNT.get(arch, 108)
        self.major, self.minor = divmod(arch, 10)
        self.name = f"aot-sm_{arch}"


def _getitem(t, idx):
    """t[idx] through aten ops (the C++ __getitem__ takes a CUDA device guard a CPU build lacks)."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    out, dim = t, 0
    for n, i in enumerate(idx):
        if i is None:
            out = out.unsqueeze(dim)
            dim += 1
        elif i is Ellipsis:
            rest = sum(1 for j in idx[n + 1:] if j is not None and j is not Ellipsis)
            dim = out.dim() - rest
        elif isinstance(i, bool):
            raise NotImplementedError("bool index in fake-CUDA capture")
        elif isinstance(i, int):
            out = out.select(dim, i)
        elif isinstance(i, slice):
            out = torch.ops.aten.slice.Tensor(out, dim, i.start, i.stop, i.step or 1)
            dim += 1
        elif isinstance(i, torch.Tensor):
            if i.dtype == torch.bool:
                raise NotImplementedError("boolean-mask index in fake-CUDA capture (data-dependent shape)")
            out = torch.ops.aten.index.Tensor(out, [None] * dim + [i])
            dim += i.dim()
        else:
            raise NotImplementedError(f"index {i!r} in fake-CUDA capture")
    return out


class _FakeCudaIndexing(TorchFunctionMode):
    """Routes Tensor indexing and copy_ to aten ops so that fake CUDA tensors work on a CPU-only torch."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            return _getitem(*args)
        if func is torch.Tensor.__setitem__:
            t, idx, value = args
            view = _getitem(t, idx)
            if not isinstance(value, torch.Tensor):
                value = torch.full((), value, dtype=t.dtype, device=t.device)
            torch.ops.aten.copy_.default(view, value.expand_as(view))
            return None
        if func is torch.Tensor.copy_:
            return torch.ops.aten.copy_.default(*args, **kwargs)
        return func(*args, **kwargs)


# Keyword arguments that JITFunction.run adds from triton.knobs before binding. They differ
# between Triton versions (3.6 has neither instrumentation_mode nor fpsan_homomorphic_casts
# everywhere), so each is passed only when the installed Triton has the knob.
_KNOB_KWARGS = (("instrumentation_mode", "compilation", "instrumentation_mode"),
                ("fpsan_homomorphic_casts", "compilation", "fpsan_homomorphic_casts"))


def _knob(group: str, name: str, default=None):
    knobs = getattr(triton, "knobs", None)
    grp = getattr(knobs, group, None) if knobs is not None else None
    return getattr(grp, name, default) if grp is not None else default


def _run_knobs(fn, kwargs) -> dict:
    out = {"debug": kwargs.get("debug", getattr(fn, "debug", False)) or bool(_knob("runtime", "debug", False))}
    missing = object()
    for kwarg, group, name in _KNOB_KWARGS:
        value = _knob(group, name, missing)
        if value is not missing:
            out[kwarg] = value
    return out


def op_of_module(module: str) -> str:
    """Op name of a kernel module: drp_kernels.ops.proto_loss_kernels -> proto_loss."""
    name = module.rsplit(".", 1)[-1]
    return name[: -len("_kernels")] if name.endswith("_kernels") else name


class Recorder:
    """Replaces JITFunction.run / Autotuner.run: records (kernel, signature, constexprs, attrs, options)."""

    def __init__(self):
        self.jobs = {}  # key -> job dict
        self.binders = {}
        self.target = None
        self.n_launches = 0
        self.in_autotune = False
        self.scenario = ""

    def jit_run(self, fn, args, kwargs):
        if not self.in_autotune:
            self.n_launches += 1
        launch = f"sm_{self.target.arch}#{self.n_launches}"
        kwargs = dict(kwargs)
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        args = [MockTensor(a.dtype, list(a.shape)) if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: MockTensor(v.dtype, list(v.shape)) if isinstance(v, torch.Tensor) else v
                  for k, v in kwargs.items()}
        kwargs.update(_run_knobs(fn, kwargs))
        target = self.target
        cache_key = (id(fn), target.arch)
        if cache_key not in self.binders:  # fn.device_caches would pin the first arch's target
            backend = make_backend(target)
            self.binders[cache_key] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
        backend, binder = self.binders[cache_key]
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
        named = {fn.arg_names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
        key = (fn.fn.__module__, fn.fn.__qualname__, target.arch, repr(sorted(signature.items())),
               repr(sorted(constexprs.items())), repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
        if key not in self.jobs:
            self.jobs[key] = {
                "fn": fn, "signature": signature, "constexprs": constexprs, "attrs": attrs,
                "options": options.__dict__, "target": target, "arch": target.arch,
                "kernel": f"{op_of_module(fn.fn.__module__)}.{fn.fn.__qualname__}",
                "config": {**{k: _plain(v) for k, v in named.items()},
                           "num_warps": options.num_warps, "num_stages": options.num_stages,
                           "dtypes": sorted({v for v in signature.values() if isinstance(v, str)
                                             and v.startswith("*")})},
                "scenario": self.scenario, "launches": [],
            }
        if launch not in self.jobs[key]["launches"]:
            self.jobs[key]["launches"].append(launch)

    @contextlib.contextmanager
    def installed(self, arch: int):
        target = GPUTarget("cuda", arch, 32)
        self.target = target
        recorder = self
        old_jit_run, old_tune_run = JITFunction.run, Autotuner.run
        old_props = torch.cuda.get_device_properties
        old_device = torch.cuda.device

        def jit_run(fn, *args, grid, warmup, **kwargs):
            recorder.jit_run(fn, args, kwargs)

        def tune_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            recorder.n_launches += 1
            recorder.in_autotune = True
            try:
                for config in tuner.prune_configs(kwargs):
                    tuner.fn.run(*args, **dict(kwargs, **config.all_kwargs()))
            finally:
                recorder.in_autotune = False

        old_driver = _driver._active
        _driver.set_active(_AotDriver(target))
        JITFunction.run = jit_run
        Autotuner.run = tune_run
        torch.cuda.get_device_properties = lambda *a, **k: _DeviceProps(arch)
        torch.cuda.device = lambda *a, **k: contextlib.nullcontext()  # no device to switch to
        try:
            yield
        finally:
            JITFunction.run, Autotuner.run = old_jit_run, old_tune_run
            torch.cuda.get_device_properties = old_props
            torch.cuda.device = old_device
            _driver._active = old_driver


def _plain(v):
    return v if isinstance(v, (bool, int, float, str, type(None))) else str(v)


@contextlib.contextmanager
def _matmul_precision(value):
    """torch.set_float32_matmul_precision(value) inside the block (None: unchanged)."""
    old = torch.get_float32_matmul_precision()
    if value is not None:
        torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


# ------------------------------------------------------------------------ scenarios
# Two shapes per op: one where every size is a multiple of 16 (EVEN_D, 16-divisible integer
# specialisations) and an odd one (masked D tail, no divisibility hints).
SHAPES = [(256, 128, 128), (37, 257, 130)]


def _scenarios_proto_loss(dtypes, quick):
    """proto_loss / proto_logits forward and backward: every metric, CE on and off, grad_P on and off."""
    from drp_kernels.ops import proto_loss as pl

    pairs = [(dtypes[n], dtypes[n]) for n in dtypes]
    if not quick and "bf16" in dtypes and "fp32" in dtypes:
        pairs.append((torch.bfloat16, torch.float32))  # autocast: 16-bit features, fp32 prototypes
    shapes = SHAPES[1:] if quick else SHAPES
    ces = (0.5,) if quick else (0.0, 0.5)  # 0.5 runs every kernel; 0.0 only drops HAS_BASE
    need_ps = (True,) if quick else (False, True)
    for zdt, pdt in pairs:
        for b, c, d in shapes:
            for metric in METRICS:
                native = zdt == pdt and zdt != torch.float32  # 16-bit dot; else torch's fp32 precision
                precs = ["highest", "high"] if metric == "cosine" and not native and not quick else [None]
                for prec in precs:
                    name = f"proto_loss {metric} z={zdt} P={pdt} B,C,D={b},{c},{d} matmul_precision={prec}"

                    def run(metric=metric, zdt=zdt, pdt=pdt, b=b, c=c, d=d, prec=prec):
                        with _matmul_precision(prec):
                            z = torch.empty((b, d), device="cuda", dtype=zdt)
                            p = torch.empty((c, d), device="cuda", dtype=pdt)
                            y = torch.empty((b,), device="cuda", dtype=torch.int64)
                            for ce in ces:
                                per, lse, idx = pl.proto_loss_forward(z, p, y, metric, ce, 2.0)
                                for need_p in need_ps:
                                    pl.proto_loss_backward(torch.empty_like(per), z, p, y, lse, idx, metric, ce,
                                                           2.0, need_p)
                            logits = pl.proto_logits_forward(z, p, metric)
                            for need_p in need_ps:
                                pl.proto_logits_backward(torch.empty_like(logits), z, p, metric, need_p)

                    yield name, run


def _scenarios_repulsion(dtypes, quick):
    """repulsion forward and backward: every metric and kind."""
    from drp_kernels.ops import repulsion as rp

    shapes = [(257, 130)] if quick else [(128, 128), (257, 130)]
    for dt in dtypes.values():
        for c, d in shapes:
            for metric in METRICS:
                precs = ["highest", "high"] if metric == "cosine" and not quick else [None]
                for prec in precs:
                    for kind in REPULSION_KINDS:
                        name = f"repulsion {metric} {kind} X={dt} C,D={c},{d} matmul_precision={prec}"

                        def run(metric=metric, kind=kind, dt=dt, c=c, d=d, prec=prec):
                            with _matmul_precision(prec):
                                x = torch.empty((c, d), device="cuda", dtype=dt)
                                row = rp.repulsion_forward(x, metric=metric, kind=kind, temperature=0.5)
                                grad = torch.empty((), device="cuda", dtype=torch.float32)
                                rp.repulsion_backward(grad, x, row, metric=metric, kind=kind, temperature=0.5)

                        yield name, run


@triton.jit
def _selftest_mixed_dot_kernel(a_ptr, b_ptr, o_ptr, BLOCK: tl.constexpr):
    """Does not compile: tl.dot of fp16 and fp32 operands."""
    r = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])
    b = tl.load(b_ptr + r[:, None] * BLOCK + r[None, :])
    tl.store(o_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, b))


@triton.jit
def _selftest_big_tile_kernel(a_ptr, o_ptr, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Compiles, but its pipelined fp32 tiles need far more shared memory than any GPU has."""
    r = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + r[:, None] * K + kk[None, :])
        b = tl.load(a_ptr + kk[:, None] * K + r[None, :])
        acc += tl.dot(a, b)
    tl.store(o_ptr + r[:, None] * BLOCK + r[None, :], acc)


def _scenarios_selftest(dtypes, quick):
    """Two kernels that must be reported as failures (checks this harness, not drp_kernels)."""

    def run():
        a = torch.empty((64, 64), device="cuda", dtype=torch.float16)
        b = torch.empty((64, 64), device="cuda", dtype=torch.float32)
        _selftest_mixed_dot_kernel[(1,)](a, b, b, BLOCK=64)
        x = torch.empty((1024, 1024), device="cuda", dtype=torch.float32)
        _selftest_big_tile_kernel[(1,)](x, x, 1024, BLOCK=128, BLOCK_K=64, num_warps=4, num_stages=4)

    yield "selftest", run


def _scenarios_lp_dist(dtypes, quick):
    """lp_dist forward and backward: every power mode of p (1, 2, 8, integer, real, inf, large p)."""
    from drp_kernels.ops import lp_dist as lp

    shapes = SHAPES[1:] if quick else SHAPES
    for dt in dtypes.values():
        for b, n, d in shapes:
            for p in (1.0, 2.0, 8.0, 5.0, 3.5, 1000.0, 40.5, float("inf")):
                for stats in (False, True):
                    def run(dt=dt, b=b, n=n, d=d, p=p, stats=stats):
                        x = torch.empty((b, d), device="cuda", dtype=dt)
                        w = torch.empty((n, d), device="cuda", dtype=dt)
                        out, idx, inv, r = lp.lp_dist_forward(x, w, p, stats)
                        if stats:
                            lp.lp_dist_backward(torch.empty_like(out), x, w, out, idx, inv, r, p, True, True)

                    yield f"lp_dist p={p} stats={stats} {dt} B,N,D={b},{n},{d}", run
        if not quick:  # the float64 max path (p = inf)
            def run64():
                x = torch.empty((64, 32), device="cuda", dtype=torch.float64)
                lp.lp_dist_forward(x, x, float("inf"), True)

            yield "lp_dist p=inf float64", run64


SCENARIOS = {"proto_loss": _scenarios_proto_loss, "repulsion": _scenarios_repulsion,
             "lp_dist": _scenarios_lp_dist}
SELFTEST = {"_selftest": _scenarios_selftest}


# -------------------------------------------------------------------------- compile
_JOBS = []


_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _resource_usage(cubin: bytes, name: str) -> dict:
    """REG / LOCAL (spill) / SHARED of the kernel, from the cuobjdump shipped in the Triton wheel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"Function " + re.escape(name) + r":\s*\n\s*(.*)", out)
    if m is None:
        raise RuntimeError(f"no resource usage for {name} in cuobjdump output:\n{out}")
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|LOCAL|STACK):(\d+)", m.group(1))}


def _compile_one(i: int) -> dict:
    """Compile one job; 'ok' also requires the launch-time limits that Triton's loader checks."""
    job = _JOBS[i]
    t0 = time.perf_counter()
    out = {"arch": job["arch"], "kernel": job["kernel"], "config": job["config"], "scenario": job["scenario"],
           "launches": job["launches"]}
    try:
        src = ASTSource(job["fn"], job["signature"], job["constexprs"], job["attrs"])
        k = triton.compile(src, target=job["target"], options=job["options"])
        asm = k.asm
        if not asm.get("cubin"):
            raise RuntimeError(f"no cubin produced (stages: {sorted(asm)})")
        use = _resource_usage(asm["cubin"], k.metadata.name)
        threads = k.metadata.num_warps * k.metadata.warp_size
        max_shared = MAX_SHARED[job["arch"]]
        out.update(shared=k.metadata.shared, regs=use.get("reg"), spill_bytes=use.get("stack", 0) + use.get("local", 0),
                   cubin_bytes=len(asm["cubin"]), ptx_lines=asm["ptx"].count("\n"))
        problems = []
        if k.metadata.shared > max_shared:
            problems.append(f"needs {k.metadata.shared} B of shared memory, sm_{job['arch']} allows {max_shared} B "
                            "per block (triton raises OutOfResources at launch)")
        if use.get("reg", 0) * threads > REGS_PER_BLOCK:
            problems.append(f"{use['reg']} registers x {threads} threads > {REGS_PER_BLOCK}")
        out.update(ok=not problems, error="; ".join(problems) or None)
    except Exception as exc:  # report every failure, keep compiling the others
        msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        out.update(ok=False, error=msg[-4000:])
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def defined_kernels() -> dict:
    """{module: [kernel names]} of every launchable Triton kernel (``*_kernel``) in drp_kernels.ops."""
    import importlib
    import pkgutil

    import drp_kernels.ops as ops_pkg

    found = {}
    for info in pkgutil.iter_modules(ops_pkg.__path__):
        mod = importlib.import_module(f"drp_kernels.ops.{info.name}")
        names = sorted(n for n, v in vars(mod).items()
                       if n.endswith("_kernel") and isinstance(v, triton.runtime.jit.KernelInterface))
        if names:
            found.setdefault(op_of_module(info.name), []).extend(names)
    return found


def capture(archs, ops, dtypes, autotune: bool, quick: bool = False):
    """Run the launchers on fake CUDA tensors for each arch; return the deduplicated compile jobs."""
    if autotune:
        os.environ["DRP_AUTOTUNE"] = "1"
    jobs = []
    for arch in archs:
        rec = Recorder()
        with rec.installed(arch):
            for op in ops:
                for name, run in {**SCENARIOS, **SELFTEST}[op](dtypes, quick):
                    rec.scenario = name
                    with FakeTensorMode(), _FakeCudaIndexing():
                        run()
        jobs.extend(rec.jobs.values())
    return jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 80 or 90 (repeatable)")
    ap.add_argument("--op", action="append", choices=sorted({**SCENARIOS, **SELFTEST}),
                    help="op file (repeatable; default all)")
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="input dtype (repeatable; default all)")
    ap.add_argument("--autotune", action="store_true", help="compile every DRP_AUTOTUNE=1 config instead")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="parallel compile processes (default: all cores)")
    ap.add_argument("--quick", action="store_true",
                    help="one odd shape, all flags on, default dot precision, no mixed dtypes")
    ap.add_argument("--kernel", help="only compile kernels whose name contains this")
    ap.add_argument("--list", action="store_true", help="only list the captured configurations")
    a = ap.parse_args(argv)
    archs = a.arch or [80, 90]
    ops = a.op or sorted(SCENARIOS)
    dtypes = {n: DTYPES[n] for n in (a.dtype or ["fp32", "fp16", "bf16"])}
    try:
        jobs = capture(archs, ops, dtypes, a.autotune, a.quick)
        jobs = [j for j in jobs if a.kernel is None or a.kernel in j["kernel"]]
    except Exception:
        print(json.dumps({"capture_error": traceback.format_exc()[-6000:]}), flush=True)
        return 2
    print(json.dumps({"captured": len(jobs), "defined_kernels": defined_kernels(),
                      "scenario_ops": sorted(SCENARIOS)}), flush=True)
    if a.list:
        for j in jobs:
            print(json.dumps({"arch": j["arch"], "kernel": j["kernel"], "config": j["config"],
                              "scenario": j["scenario"]}), flush=True)
        return 0
    _JOBS[:] = jobs
    results = []
    if a.jobs > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("fork")
        with cf.ProcessPoolExecutor(max_workers=a.jobs, mp_context=ctx) as ex:
            for r in ex.map(_compile_one, range(len(jobs))):
                results.append(r)
                print(json.dumps(r), flush=True)
    else:
        for i in range(len(jobs)):
            results.append(_compile_one(i))
            print(json.dumps(results[-1]), flush=True)
    if not a.autotune:
        failed = [r for r in results if not r["ok"]]
    else:
        # the autotuner skips configs that hit launch limits; a launch fails when none of its configs works
        ok_launches = {launch for r in results if r["ok"] for launch in r["launches"]}
        failed = [r for r in results if not r["ok"] and not set(r["launches"]) <= ok_launches]
        for launch in sorted({launch for r in results for launch in r["launches"]} - ok_launches):
            print(json.dumps({"launch_without_working_config": launch}), flush=True)
    print(json.dumps({"compiled": len(results), "failed": len(failed),
                      "seconds": round(sum(r["seconds"] for r in results), 1)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
