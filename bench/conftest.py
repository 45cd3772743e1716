"""pytest-benchmark harness shared by every bench/bench_<op>.py.

Use the ``timed`` fixture:

    def test_x(benchmark, timed):
        inputs = setup_op(...)
        timed(benchmark, fn, group="op-fwd-B512", provider="drp", device=x.device,
              bytes_moved=..., flops=..., flush_l2=True)

What it does:

* CUDA timing with CUDA events around each call (after an optional L2 flush); the event median is
  the time behind the derived figures (``extra_info["cuda_event_ms"]``). pytest-benchmark's own
  wall-clock statistics (synchronised inside the timed function) are kept beside it.
* peak memory of one extra call; ``provider``, ``device`` (``torch.cuda.get_device_name()`` or the
  CPU), the achieved GB/s or TFLOP/s, and fractions of the device's datasheet peak and of the
  device-to-device copy bandwidth measured once per session on that device (the bandwidth
  denominator). A fraction above 1.0 means the byte or FLOP count or the timing is wrong: such a
  result is marked ``"suspect"`` and warned about.
* torch, triton and CUDA versions, the device and its measured copy bandwidth go into the JSON's
  ``machine_info``; out-of-memory in any benchmark becomes a skip that is listed in the JSON
  (``"oom_skips"``) and in the terminal summary.
* ``_bench.compiled(key, fn)``: one ``torch.compile`` per benchmark variant, with dynamo's caches reset
  whenever a new variant is compiled, so no variant silently falls back to eager after dynamo's
  recompile limit.
* ``DRP_BENCH_TARGETS=1`` (read by the bench files) keeps only the comparisons behind the kernel
  targets; ``DRP_BENCH_ROUNDS=n`` caps the timed rounds (both used by ``make gpu-check``).
* ``DRP_BENCH_ECHO=1`` prints one line per finished benchmark to stderr as it ends, so a run cut
  short still leaves its figures in the log.
"""
import contextlib
import os
import sys
import warnings

import pytest
import torch

from _bench import copy_bandwidth_gbps, device_name, device_peaks, versions

if not torch.cuda.is_available():
    # Triton kernels run under the interpreter on the CPU (slow: keep shapes small).
    os.environ.setdefault("TRITON_INTERPRET", "1")

_L2_FLUSH_BYTES = 256 * 1024 * 1024
_flush_buf = {}
_oom_skips = []


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _flush_l2(device):
    device = torch.device(device)
    if device.type != "cuda":
        return
    buf = _flush_buf.get(device)
    if buf is None:
        buf = _flush_buf[device] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    buf.zero_()


def _peak_memory(fn, device):
    device = torch.device(device)
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _cuda_event_ms(fn, device, rounds, flush_l2):
    """Per-call times in ms from CUDA events around each call (L2 flushed before each one)."""
    times = []
    for _ in range(rounds):
        if flush_l2:
            _flush_l2(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return sorted(times)


def _fraction(extra, name, value, denominator):
    if denominator:
        frac = value / denominator
        extra[name] = frac
        if frac > 1.0:
            extra["suspect"] = f"{name} = {frac:.2f} > 1: the byte/FLOP count or the timing is wrong"
            warnings.warn(f"{extra.get('provider')}: {extra['suspect']}", RuntimeWarning, stacklevel=3)


def _echo(config, line):
    """Write a line to the terminal at once (pytest's capture would hold a print back)."""
    capman = config.pluginmanager.get_plugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
        print(line, file=sys.stderr, flush=True)


@pytest.fixture
def timed(request):
    def run(benchmark, fn, *, group, provider, device, bytes_moved=None, flops=None,
            flops_kind="fp32_tflops", flush_l2=False, rounds=None, warmup_rounds=1, **info):
        benchmark.group = group
        extra = benchmark.extra_info
        extra.update(info)
        extra["provider"] = provider
        extra["device"] = device_name(device)
        for _ in range(warmup_rounds):
            fn()
        _sync(device)
        extra["peak_memory_bytes"] = _peak_memory(fn, device)

        def setup():
            if flush_l2:
                _flush_l2(device)
            _sync(device)

        def target():
            fn()
            _sync(device)

        on_cuda = torch.device(device).type == "cuda"
        n = rounds if rounds is not None else (20 if on_cuda else 5)
        if os.environ.get("DRP_BENCH_ROUNDS"):
            n = min(n, int(os.environ["DRP_BENCH_ROUNDS"]))
        benchmark.pedantic(target, setup=setup, rounds=n, iterations=1, warmup_rounds=0)
        t = benchmark.stats.stats.median
        if on_cuda:
            ev = _cuda_event_ms(fn, device, n, flush_l2)
            extra["cuda_event_ms"] = {"median": ev[len(ev) // 2], "min": ev[0], "max": ev[-1], "rounds": n}
            t = ev[len(ev) // 2] * 1e-3
        extra["time_s"] = t
        peaks = device_peaks(device) if on_cuda else None
        if bytes_moved is not None and t > 0:
            extra["bytes_moved"] = int(bytes_moved)
            extra["gbps"] = bytes_moved / t / 1e9
            if on_cuda:
                extra["copy_bandwidth_gbps"] = copy_bandwidth_gbps(device)
                _fraction(extra, "fraction_of_copy_bandwidth", extra["gbps"], extra["copy_bandwidth_gbps"])
                _fraction(extra, "fraction_of_peak_bandwidth", extra["gbps"], peaks and peaks["gbps"])
        if flops is not None and t > 0:
            extra["flops"] = int(flops)
            extra["tflops"] = flops / t / 1e12
            if on_cuda:
                _fraction(extra, "fraction_of_peak_flops", extra["tflops"], peaks and peaks[flops_kind])
        if os.environ.get("DRP_BENCH_ECHO", "0") == "1":
            rate = (f"{extra['gbps']:.0f} GB/s" if "gbps" in extra else
                    f"{extra['tflops']:.1f} TFLOP/s" if "tflops" in extra else "")
            _echo(request.config, f"[bench] {group} {provider}: {t * 1e3:.3f} ms {rate} "
                                  f"peak_mem={extra['peak_memory_bytes']}")
        return t

    return run


# ------------------------------------------------------------------------ session-wide hooks
@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Out-of-memory in a benchmark (inputs, warm-up or timing) becomes a recorded skip."""
    try:
        return (yield)
    except torch.OutOfMemoryError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "CUDA out of memory"
        _oom_skips.append({"name": item.name, "error": first[:300]})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        pytest.skip(f"out of memory: {first[:200]}")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["versions"] = versions()
    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
        machine_info["cuda_device"] = torch.cuda.get_device_name(dev)
        machine_info["cuda_copy_bandwidth_gbps"] = copy_bandwidth_gbps(dev)
        machine_info["cuda_datasheet_peaks"] = device_peaks(dev)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["oom_skips"] = list(_oom_skips)


def pytest_terminal_summary(terminalreporter):
    for s in _oom_skips:
        terminalreporter.write_line(f"[bench] skipped for out of memory: {s['name']}: {s['error']}")
