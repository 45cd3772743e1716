"""pytest-benchmark harness shared by every bench/bench_<op>.py.

Use the ``timed`` fixture:

    def test_x(benchmark, timed):
        inputs = setup_op(...)
        timed(benchmark, fn, group="op-fwd-B512", provider="drp", device=x.device,
              bytes_moved=..., flops=..., flush_l2=True)

It makes timing correct on CUDA (synchronises inside the timed function and
optionally flushes L2 before every repetition), measures peak memory of one
extra call, and fills ``extra_info`` with provider, device name, peak memory and
the achieved GB/s or TFLOP/s with its fraction of the device's peak.
"""
import os
import platform

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run under the interpreter on the CPU (slow: keep shapes small).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Peak figures of the H100 SXM (dense): HBM3 bandwidth and FP32 / TF32 / BF16 TFLOP/s.
H100_PEAK = {"gbps": 3350.0, "fp32_tflops": 67.0, "tf32_tflops": 495.0, "bf16_tflops": 989.0}

_L2_FLUSH_BYTES = 256 * 1024 * 1024
_flush_buf = {}


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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


@pytest.fixture
def timed():
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
        benchmark.pedantic(target, setup=setup, rounds=n, iterations=1, warmup_rounds=0)
        t = benchmark.stats.stats.median
        if bytes_moved is not None and t > 0:
            extra["bytes_moved"] = int(bytes_moved)
            extra["gbps"] = bytes_moved / t / 1e9
            if on_cuda:
                extra["fraction_of_peak_bandwidth"] = extra["gbps"] / H100_PEAK["gbps"]
        if flops is not None and t > 0:
            extra["flops"] = int(flops)
            extra["tflops"] = flops / t / 1e12
            if on_cuda:
                extra["fraction_of_peak_flops"] = extra["tflops"] / H100_PEAK[flops_kind]
        return t

    return run
