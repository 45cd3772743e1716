"""Per-point keyed randomness: every random draw of an evaluation is a function of the seed,
the point's index in the dataset and what the draw is for, never of the point's position in a
batch. So a point's result does not depend on the batch size, on the order in which points are
attacked, on how they are sharded over processes, or on a resumed run's history.

The keys are 64-bit integers made with the splitmix64 finaliser (Steele, Lea, Flood 2014):

    mix64(z) = z ^ (z >>> 30); z *= 0xBF58476D1CE4E5B9; z ^= z >>> 27; z *= 0x94D049BB133111EB;
               z ^ (z >>> 31)                                                      (mod 2^64)
    derive(key, part) = mix64(key + (part + 1) * 0x9E3779B97F4A7C15)

``derive`` chains a key with small integers: the seed with the purpose of the draw (stage,
eps, run), then with the point's index; Square's draws at query t are the block t of the
splitmix64 stream seeded with the point's key (``bits``). Python
ints (``derive_int``) and int64 tensors (``derive``, with wrapping products and emulated
logical shifts) compute the same bits; csrc/square.cpp has the same hash in C++ for Square's
fused per-query draws.

Two kinds of draws:
* counter-based bits (``bits``): (k, n) 64-bit draws per point, the splitmix64 stream seeded
  with the point's key, vectorised and exact on any device: Square's window positions and
  signs, one block of n per query;
* per-point torch generators (``ball_noise``): the random starts, drawn with ``torch.rand`` /
  ``torch.randn`` from a CPU generator seeded with the point's key, one point at a time, so
  they come from the same distributions as ``drp_kernels.random_init``'s.
"""
from __future__ import annotations

import struct

import torch

__all__ = ["MASK64", "mix64_int", "derive_int", "mix64", "derive", "point_keys", "bits", "below", "signs",
           "ball_noise", "eps_part", "STAGE_IDS", "PUBLIC_IDS", "bits_int"]

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB

#: The purpose of a draw, mixed into its key (new stages get new numbers; never reuse one).
STAGE_IDS = {
    "apgd-ce": 1,
    "apgd-t": 2,
    "apgd-dlr": 3,
    "square": 4,
    "paper-pgd": 5,
    "check-more-iterations": 11,
    "check-chance-probe": 12,
    "check-quick-square": 13,
}
#: The purposes of the public attack functions' draws (``apgd``, ``square``).
PUBLIC_IDS = {"apgd": 21, "square": 22}


def _signed(u: int) -> int:
    """The int64 with the bits of the unsigned 64-bit ``u``."""
    u &= MASK64
    return u - (1 << 64) if u >= 1 << 63 else u


def mix64_int(z: int) -> int:
    """splitmix64's finaliser on a Python int (the reference for ``mix64``)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * _M1) & MASK64
    z = ((z ^ (z >> 27)) * _M2) & MASK64
    return z ^ (z >> 31)


def derive_int(key: int, *parts: int) -> int:
    """``key`` chained with each of ``parts`` (unsigned 64-bit Python ints)."""
    for p in parts:
        key = mix64_int(key + (int(p) + 1) * GOLDEN)
    return key


def _lsr(t: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (t >> s) & ((1 << (64 - s)) - 1)


def mix64(t: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on the bits of an int64 tensor (products wrap mod 2^64)."""
    t = (t ^ _lsr(t, 30)) * _signed(_M1)
    t = (t ^ _lsr(t, 27)) * _signed(_M2)
    return t ^ _lsr(t, 31)


def derive(keys: torch.Tensor, part) -> torch.Tensor:
    """``derive_int`` elementwise: keys (int64) chained with ``part`` (an int or an int64 tensor)."""
    if isinstance(part, torch.Tensor):
        return mix64(keys + (part.to(torch.int64) + 1) * _signed(GOLDEN))
    return mix64(keys + _signed((int(part) + 1) * GOLDEN))


def eps_part(eps: float) -> int:
    """An eps as a key part: the bits of its float64 value."""
    return struct.unpack("<Q", struct.pack("<d", float(eps)))[0]


def point_keys(seed: int, index: torch.Tensor, *parts: int) -> torch.Tensor:
    """(k,) int64 keys on the CPU: the seed chained with ``parts``, then with each point's index."""
    base = derive_int(int(seed) & MASK64, *parts)
    idx = index.detach().to("cpu", torch.int64)
    return derive(torch.full_like(idx, _signed(base)), idx)


def bits(keys: torch.Tensor, counter: int, n: int) -> torch.Tensor:
    """(k, n) int64: the n 64-bit draws of each key at ``counter``, draw j being
    mix64(key + (counter * n + j + 1) * GOLDEN) = derive(key, counter * n + j): the splitmix64
    stream seeded with the key, one block of n outputs per counter."""
    first = int(counter) * n
    steps = (torch.arange(first + 1, first + n + 1, device=keys.device, dtype=torch.int64) * _signed(GOLDEN))
    return mix64(keys[:, None] + steps[None, :])


def bits_int(key: int, counter: int, n: int) -> list:
    """``bits`` for one unsigned Python-int key (the reference)."""
    return [derive_int(key, counter * n + j) for j in range(n)]


def below(b: torch.Tensor, bound) -> torch.Tensor:
    """Integers uniform in [0, bound) from draws ``b`` (the top 63 bits modulo bound; the bias,
    below bound / 2^63, is far under anything measurable)."""
    return _lsr(b, 1) % bound


def signs(b: torch.Tensor) -> torch.Tensor:
    """+1 or -1 (int64) from draws ``b``: -1 where the top bit is set."""
    return 1 - 2 * _lsr(b, 63)


def ball_noise(keys: torch.Tensor, shape, norm: str, device):
    """The random start's noise, one point at a time: a CPU ``torch.Generator`` seeded with each
    key draws ``torch.rand(shape)`` (linf), or ``torch.randn(shape)`` then one ``torch.rand``
    radius draw (l2), as ``drp_kernels.random_init`` draws them for a batch.

    Returns (noise (k, *shape) float32, radius_u (k,) float32 or None) on ``device``."""
    k = keys.shape[0]
    noise = torch.empty((k,) + tuple(shape), dtype=torch.float32)
    radius = torch.empty(k, dtype=torch.float32) if norm == "l2" else None
    g = torch.Generator()
    for i, key in enumerate(keys.tolist()):
        g.manual_seed(key & 0x7FFFFFFFFFFFFFFF)
        if norm == "linf":
            torch.rand(shape, generator=g, out=noise[i])
        else:
            torch.randn(shape, generator=g, out=noise[i])
            radius[i] = torch.rand((), generator=g)
    return noise.to(device), (None if radius is None else radius.to(device))
