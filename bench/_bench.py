"""Helpers of the benchmark harness that bench files import (fixtures live in bench/conftest.py)."""
import platform

import torch

__all__ = ["DEVICE_PEAKS", "cpu_model", "device_name", "device_peaks", "copy_bandwidth_gbps", "versions", "compiled"]

# Datasheet peaks (dense): HBM bandwidth (GB/s) and FP32 / TF32 / BF16 TFLOP/s. The H200 has the
# H100 SXM's arithmetic with faster memory.
DEVICE_PEAKS = {
    "H100": {"gbps": 3350.0, "fp32_tflops": 67.0, "tf32_tflops": 495.0, "bf16_tflops": 989.0},
    "H200": {"gbps": 4800.0, "fp32_tflops": 67.0, "tf32_tflops": 495.0, "bf16_tflops": 989.0},
}

_COPY_BYTES = 1 << 30
_copy_gbps = {}
_compiled = {}


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (e.g. "AMD EPYC"), or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_peaks(device):
    """Datasheet peaks of a CUDA device, by name (None when the device is not in DEVICE_PEAKS)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(DEVICE_PEAKS, key=len, reverse=True):
        if key in name:
            return DEVICE_PEAKS[key]
    return None


def copy_bandwidth_gbps(device):
    """Device-to-device copy bandwidth in GB/s (bytes read + written), measured once per device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _copy_gbps:
        src = torch.empty(_COPY_BYTES, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        start = [torch.cuda.Event(enable_timing=True) for _ in range(10)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(10)]
        for s, e in zip(start, end):
            s.record()
            dst.copy_(src)
            e.record()
        torch.cuda.synchronize(device)
        ms = sorted(s.elapsed_time(e) for s, e in zip(start, end))[len(start) // 2]
        _copy_gbps[key] = 2 * _COPY_BYTES / (ms * 1e-3) / 1e9
        del src, dst
        torch.cuda.empty_cache()
    return _copy_gbps[key]


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def compiled(key, make_fn):
    """torch.compile(make_fn()) for one benchmark variant ``key``, built once.

    Compiling a new variant resets dynamo first, so earlier variants' cache entries never count
    towards the recompile limit of this one (past it dynamo would run eager without an error).
    """
    if key not in _compiled:
        torch._dynamo.reset()
        _compiled.clear()
        _compiled[key] = torch.compile(make_fn())
    return _compiled[key]
