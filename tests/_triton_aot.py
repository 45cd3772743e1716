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

    python tests/_triton_aot.py --arch 80 --arch 90 [--op proto_loss] [--autotune] [--jobs 2] [--list]

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
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
    raise SystemExit("tests/_triton_aot.py must run without TRITON_INTERPRET (the interpreter cannot compile)")

import torch  # noqa: E402
import triton  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, MockTensor  # noqa: E402

# SM count of the reference part of each architecture (A100, H100 SXM): launchers that size
# their grid from torch.cuda.get_device_properties see these.
_SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}
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


class Recorder:
    """Replaces JITFunction.run / Autotuner.run: records (kernel, signature, constexprs, attrs, options)."""

    def __init__(self):
        self.jobs = {}  # key -> job dict
        self.scenario = ""

    def jit_run(self, fn, args, kwargs):
        kwargs = dict(kwargs)
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        args = [MockTensor(a.dtype, list(a.shape)) if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: MockTensor(v.dtype, list(v.shape)) if isinstance(v, torch.Tensor) else v
                  for k, v in kwargs.items()}
        kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = triton.knobs.compilation.fpsan_homomorphic_casts
        _, _, target, backend, binder = fn.device_caches[0]
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
        named = {fn.arg_names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
        key = (fn.fn.__module__, fn.fn.__qualname__, target.arch, repr(sorted(signature.items())),
               repr(sorted(constexprs.items())), repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
        if key not in self.jobs:
            self.jobs[key] = {
                "fn": fn, "signature": signature, "constexprs": constexprs, "attrs": attrs,
                "options": options.__dict__, "target": target, "arch": target.arch,
                "kernel": f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__qualname__}",
                "config": {**{k: _plain(v) for k, v in named.items()},
                           "num_warps": options.num_warps, "num_stages": options.num_stages,
                           "dtypes": sorted({v for v in signature.values() if isinstance(v, str)
                                             and v.startswith("*")})},
                "scenario": self.scenario,
            }

    @contextlib.contextmanager
    def installed(self, arch: int):
        target = GPUTarget("cuda", arch, 32)
        recorder = self
        old_jit_run, old_tune_run = JITFunction.run, Autotuner.run
        old_props = torch.cuda.get_device_properties

        def jit_run(fn, *args, grid, warmup, **kwargs):
            recorder.jit_run(fn, args, kwargs)

        def tune_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            for config in tuner.prune_configs(kwargs):
                tuner.fn.run(*args, **dict(kwargs, **config.all_kwargs()))

        old_driver = _driver._active
        _driver.set_active(_AotDriver(target))
        JITFunction.run = jit_run
        Autotuner.run = tune_run
        torch.cuda.get_device_properties = lambda *a, **k: _DeviceProps(arch)
        try:
            yield
        finally:
            JITFunction.run, Autotuner.run = old_jit_run, old_tune_run
            torch.cuda.get_device_properties = old_props
            _driver._active = old_driver


def _plain(v):
    return v if isinstance(v, (bool, int, float, str, type(None))) else str(v)


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------ scenarios
# Two shapes per op: one where every size is a multiple of 16 (EVEN_D, 16-divisible integer
# specialisations) and an odd one (masked D tail, no divisibility hints).
SHAPES = [(256, 128, 128), (37, 257, 130)]


def _scenarios_proto_loss(dtypes):
    from drp_kernels.ops import proto_loss as pl

    pairs = [(dtypes[n], dtypes[n]) for n in dtypes]
    if "bf16" in dtypes and "fp32" in dtypes:
        pairs.append((torch.bfloat16, torch.float32))  # autocast: 16-bit features, fp32 prototypes
    for zdt, pdt in pairs:
        for b, c, d in SHAPES:
            for metric in pl.METRICS:
                native = zdt == pdt and zdt != torch.float32  # 16-bit dot; else DRP_FP32_DOT decides
                fp32_dots = ["tf32x3", "ieee", "tf32"] if metric == "cosine" and not native else [None]
                for prec in fp32_dots:
                    name = f"proto_loss {metric} z={zdt} P={pdt} B,C,D={b},{c},{d} DRP_FP32_DOT={prec}"

                    def run(metric=metric, zdt=zdt, pdt=pdt, b=b, c=c, d=d, prec=prec):
                        with _env(DRP_FP32_DOT=prec):
                            z = torch.empty((b, d), device="cuda", dtype=zdt)
                            p = torch.empty((c, d), device="cuda", dtype=pdt)
                            y = torch.empty((b,), device="cuda", dtype=torch.int64)
                            for ce in (0.0, 0.5):
                                per, lse, idx = pl.proto_loss_forward(z, p, y, metric, ce, 2.0)
                                g = torch.empty_like(per)
                                for need_p in (False, True):
                                    pl.proto_loss_backward(g, z, p, y, lse, idx, metric, ce, 2.0, need_p)
                            logits = pl.proto_logits_forward(z, p, metric)
                            for need_p in (False, True):
                                pl.proto_logits_backward(torch.empty_like(logits), z, p, metric, need_p)

                    yield name, run


def _scenarios_repulsion(dtypes):
    from drp_kernels.ops import repulsion as rp
    import inspect

    metrics = getattr(rp, "METRICS", ("cosine", "l2", "linf"))
    kinds = getattr(rp, "KINDS", ("softmin", "max", "log"))
    params = inspect.signature(rp.repulsion_backward).parameters
    for name_dt, dt in dtypes.items():
        for c, d in [(128, 128), (257, 130)]:
            for metric in metrics:
                for kind in kinds:
                    name = f"repulsion {metric} {kind} P={dt} C,D={c},{d}"

                    def run(metric=metric, kind=kind, dt=dt, c=c, d=d):
                        x = torch.empty((c, d), device="cuda", dtype=dt)
                        try:
                            rp._check_x(x, metric, kind)
                        except (ValueError, RuntimeError):
                            return  # a combination the op rejects before launching anything
                        out = rp.repulsion_forward(x, metric=metric, kind=kind, temperature=0.5)
                        row = out[1] if isinstance(out, tuple) else out
                        kw = {k: v for k, v in (("metric", metric), ("kind", kind), ("temperature", 0.5))
                              if k in params}
                        rp.repulsion_backward(torch.empty((), device="cuda", dtype=torch.float32), x, row, **kw)

                    yield name, run


SCENARIOS = {"proto_loss": _scenarios_proto_loss, "repulsion": _scenarios_repulsion}


# -------------------------------------------------------------------------- compile
_JOBS = []


def _compile_one(i: int) -> dict:
    job = _JOBS[i]
    t0 = time.perf_counter()
    out = {"arch": job["arch"], "kernel": job["kernel"], "config": job["config"], "scenario": job["scenario"]}
    try:
        src = ASTSource(job["fn"], job["signature"], job["constexprs"], job["attrs"])
        k = triton.compile(src, target=job["target"], options=job["options"])
        asm = k.asm
        if "cubin" not in asm or not asm["cubin"]:
            raise RuntimeError(f"no cubin produced (stages: {sorted(asm)})")
        out.update(ok=True, error=None, cubin_bytes=len(asm["cubin"]), n_regs=k.n_regs if hasattr(k, "n_regs") else None,
                   shared=k.metadata.shared)
    except Exception as exc:  # report every failure, keep compiling the others
        msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        out.update(ok=False, error=msg[-4000:])
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def capture(archs, ops, dtypes, autotune: bool):
    """Run the launchers on fake CUDA tensors for each arch; return the deduplicated compile jobs."""
    if autotune:
        os.environ["DRP_AUTOTUNE"] = "1"
    jobs = []
    for arch in archs:
        rec = Recorder()
        with rec.installed(arch):
            for op in ops:
                for name, run in SCENARIOS[op](dtypes):
                    rec.scenario = name
                    with FakeTensorMode(), _FakeCudaIndexing():
                        run()
        jobs.extend(rec.jobs.values())
    return jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 80 or 90 (repeatable)")
    ap.add_argument("--op", action="append", choices=sorted(SCENARIOS), help="op file (repeatable; default all)")
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="input dtype (repeatable; default all)")
    ap.add_argument("--autotune", action="store_true", help="compile every DRP_AUTOTUNE=1 config instead")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compile processes")
    ap.add_argument("--list", action="store_true", help="only list the captured configurations")
    a = ap.parse_args(argv)
    archs = a.arch or [80, 90]
    ops = a.op or sorted(SCENARIOS)
    dtypes = {n: DTYPES[n] for n in (a.dtype or ["fp32", "fp16", "bf16"])}
    try:
        jobs = capture(archs, ops, dtypes, a.autotune)
    except Exception:
        print(json.dumps({"capture_error": traceback.format_exc()[-6000:]}), flush=True)
        return 2
    print(json.dumps({"captured": len(jobs)}), flush=True)
    if a.list:
        for j in jobs:
            print(json.dumps({"arch": j["arch"], "kernel": j["kernel"], "config": j["config"],
                              "scenario": j["scenario"]}), flush=True)
        return 0
    _JOBS[:] = jobs
    failed = 0
    if a.jobs > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("fork")
        with cf.ProcessPoolExecutor(max_workers=a.jobs, mp_context=ctx) as ex:
            results = ex.map(_compile_one, range(len(jobs)))
            for r in results:
                failed += not r["ok"]
                print(json.dumps(r), flush=True)
    else:
        for i in range(len(jobs)):
            r = _compile_one(i)
            failed += not r["ok"]
            print(json.dumps(r), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
