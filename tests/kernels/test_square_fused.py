"""The fused CPU ops of the Square Attack (csrc/square.cpp): bit for bit the PyTorch
formulation of attacks/square.py (the per-point keyed draws too), every input checked."""
import importlib
import math

import pytest
import torch
from torch import nn

from drp_kernels import attacks as A
from drp_kernels.attacks import _keys as R
from drp_kernels.ops.square import fused_ops

pytestmark = [pytest.mark.skipif(fused_ops() is None, reason="drp_kernels.ops._C not built"),
              pytest.mark.usefixtures("one_thread")]

sq = importlib.import_module("drp_kernels.attacks.square")
propose, accept, draws = fused_ops() or (None, None, None)


def _keys(n, seed=3):
    return R.point_keys(seed, torch.arange(n), 99)


def _model(c, side, dtype, classes=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, 32), nn.ReLU(), nn.Linear(32, classes)).to(dtype)


def _data(n, c, side, dtype, model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, side, side, generator=g).to(dtype)
    x[:4] = 0.0  # at the box's corners, many proposals equal the current point (the sign flip)
    x[4:8] = 1.0
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::5] = (y[::5] + 1) % 10  # some points misclassified from the start
    return x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("per_sample", [False, True])
def test_fused_matches_pytorch_bit_for_bit(dtype, c, per_sample):
    model = _model(c, 12, dtype)
    x, y = _data(40, c, 12, dtype, model)
    eps = (torch.rand(40, generator=torch.Generator().manual_seed(2)) * 0.2).to(dtype) if per_sample else 0.08
    outs = []
    for fused in (False, True):
        outs.append(sq._square(model, x, y, eps=eps, queries=400, p_init=0.8, keys=_keys(40), fused=fused))
    (xa, fa), (xb, fb) = outs
    assert torch.equal(fa, fb)
    assert torch.equal(xa, xb)
    assert 0 < int(fa.sum()) < 40  # some points broken during the search, some not: both paths exercised


def test_fused_matches_pytorch_wide_batch_two_threads_float16():
    """More than one parallel chunk (k > 64, 2 threads), a non-square image, float16."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 10 * 14, 10))

    def model(t):
        return lin(t.float())

    x = torch.rand(150, 3, 10, 14, generator=torch.Generator().manual_seed(1)).half()
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = torch.rand(150, generator=torch.Generator().manual_seed(2)) * 0.1
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outs = [sq._square(model, x, y, eps=eps, queries=300, p_init=0.8, keys=_keys(150), fused=fused)
                for fused in (False, True)]
    finally:
        torch.set_num_threads(n)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert 0 < int(outs[0][1].sum()) < 150


def test_square_uses_the_fused_ops_on_cpu(monkeypatch):
    seen = []
    real = sq._square_search

    def spy(*a, **kw):
        seen.append(kw["ops"] is not None)
        return real(*a, **kw)

    monkeypatch.setattr(sq, "_square_search", spy)
    model = _model(1, 8, torch.float32)
    x, y = _data(6, 1, 8, torch.float32, model)
    A.square(model, x, y, eps=0.1, queries=5)
    assert seen == [True]


def test_fused_true_without_the_ops_is_an_error(monkeypatch):
    monkeypatch.setattr(sq, "fused_ops", lambda: None)
    model = _model(1, 8, torch.float32)
    x, y = _data(6, 1, 8, torch.float32, model)
    with pytest.raises(RuntimeError, match="fused=True needs"):
        sq._square(model, x, y, eps=0.1, queries=5, p_init=0.8, keys=_keys(6), fused=True)
    # the default falls back to the PyTorch formulation
    sq._square(model, x, y, eps=0.1, queries=5, p_init=0.8, keys=_keys(6))


def test_propose_writes_the_window_and_flips_a_wasted_proposal():
    x = torch.zeros(2, 2, 5, 6)
    x[1] = 0.5
    xb = x.clone()
    eps = torch.tensor([0.25, 0.25])
    signs = torch.tensor([[-1.0, -1.0], [1.0, -1.0]])
    vh, vw = torch.tensor([1, 0]), torch.tensor([2, 3])
    out = propose(x, xb, eps, vh, vw, 2, signs)
    want = xb.clone()
    # point 0: x = 0 with sign -1 clamps to 0 = x_best everywhere: channel 0 flips to +eps
    want[0, 0, 1:3, 2:4] = 0.25
    want[1, 0, 0:2, 3:5] = 0.75
    want[1, 1, 0:2, 3:5] = 0.25
    assert torch.equal(out, want)
    assert torch.equal(xb, x)  # inputs untouched


def test_accept_keeps_improvements_and_counts_broken():
    xb = torch.zeros(4, 1, 2, 2)
    x_new = torch.ones(4, 1, 2, 2)
    mb = torch.tensor([1.0, 1.0, 0.5, -1.0])
    logits = torch.tensor([[2.0, 1.5, 0.0],     # margin 0.5 < 1: accepted
                           [3.0, 1.0, 1.0],     # margin 2: rejected
                           [1.0, 1.0, 0.0],     # margin 0 (a tie): accepted, broken
                           [math.nan, 0.0, 0.0]])  # NaN: never accepted
    y = torch.zeros(4, dtype=torch.long)
    n = accept(xb, mb, x_new, logits, y)
    assert n == 2  # points 2 (margin 0) and 3 (already -1)
    assert torch.equal(mb, torch.tensor([0.5, 1.0, 0.0, -1.0]))
    assert xb.flatten(1).amax(1).tolist() == [1.0, 0.0, 1.0, 0.0]
    # the margin is the float32 one of attacks._common.margin, bit for bit
    z = torch.randn(64, 10, dtype=torch.float64)
    yy = torch.randint(0, 10, (64,))
    from drp_kernels.attacks import _common as C
    m = torch.full((64,), math.inf)
    accept(torch.zeros(64, 1), m, torch.zeros(64, 1), z, yy)
    assert torch.equal(m, C.margin(z, yy))


def test_ops_reject_bad_inputs():
    x = torch.rand(3, 1, 6, 6)
    e = torch.full((3,), 0.1)
    s = torch.ones(3, 1)
    v = torch.zeros(3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="does not fit"):
        propose(x, x, e, torch.tensor([0, 5, 0]), v, 2, s)
    with pytest.raises(RuntimeError, match="s must be in"):
        propose(x, x, e, v, v, 7, s)
    with pytest.raises(RuntimeError, match="dtype"):
        propose(x, x.double(), e, v, v, 2, s)
    with pytest.raises(RuntimeError, match="signs must be"):
        propose(x, x, e, v, v, 2, torch.ones(3, 2))
    with pytest.raises(RuntimeError, match="eps must be"):
        propose(x, x, e[:2], v, v, 2, s)
    with pytest.raises(RuntimeError, match="int64"):
        propose(x, x, e, v.int(), v, 2, s)
    with pytest.raises(RuntimeError, match="contiguous"):
        propose(x.transpose(2, 3), x, e, v, v, 2, s)
    m = torch.zeros(3)
    with pytest.raises(RuntimeError, match="is not a class"):
        accept(x.clone(), m, x, torch.zeros(3, 4), torch.tensor([0, 4, 1]))
    with pytest.raises(RuntimeError, match="margin_best must be float32"):
        accept(x.clone(), m.double(), x, torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="logits must be"):
        accept(x.clone(), m, x, torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))
    # an empty batch is fine
    assert propose(x[:0], x[:0], e[:0], v[:0], v[:0], 2, s[:0]).shape == (0, 1, 6, 6)
    assert accept(x[:0].clone(), m[:0], x[:0], torch.zeros(0, 4), v[:0]) == 0


# ------------------------------------------------------------------- keyed draws
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_draws_op_matches_the_keyed_bits(dtype):
    """square_draws_cpu computes _keys.bits / below / signs in C++, bit for bit, for any counter."""
    keys = torch.cat([_keys(37), torch.tensor([0, -1, 2 ** 63 - 1, -(2 ** 63)])])
    for counter, bounds, n_signs in ((1, [20, 21], 1), (4999, [5, 6, 7, 8, 2], 3), (0, [], 9), (7, [1], 0)):
        ints, sg = draws(keys, counter, bounds, n_signs, dtype)
        b = R.bits(keys, counter, len(bounds) + n_signs)
        want = torch.stack([R.below(b[:, j], bd) for j, bd in enumerate(bounds)]) if bounds else \
            torch.empty((0, keys.shape[0]), dtype=torch.int64)
        assert torch.equal(ints, want), (counter, bounds)
        assert sg.dtype == dtype and torch.equal(sg, R.signs(b[:, len(bounds):]).to(dtype))
        if bounds:
            assert all(int(ints[j].max()) < bd for j, bd in enumerate(bounds)) and int(ints.min()) >= 0


def test_draws_are_spread_evenly():
    """Uniform windows and fair signs: counts within 5 standard deviations of their expectations."""
    ints, sg = draws(_keys(20000, seed=11), 17, [7], 1, torch.float32)
    counts = torch.bincount(ints[0], minlength=7).double()
    assert float((counts - 20000 / 7).abs().max()) < 5 * math.sqrt(20000 / 7)
    assert abs(float(sg.sum())) < 5 * math.sqrt(20000)


def test_keyed_bits_match_the_python_reference():
    """The int64 tensor hash (wrapping products, emulated logical shifts) is splitmix64 mod 2^64."""
    g = torch.Generator().manual_seed(5)
    raw = torch.randint(-(2 ** 63), 2 ** 63 - 1, (200,), generator=g, dtype=torch.int64)
    unsigned = [v % (1 << 64) for v in raw.tolist()]
    assert R.mix64(raw).tolist() == [R._signed(R.mix64_int(v)) for v in unsigned]
    assert R.derive(raw, 12).tolist() == [R._signed(R.derive_int(v, 12)) for v in unsigned]
    b = R.bits(raw[:9], 3, 4)
    assert b.tolist() == [[R._signed(u) for u in R.bits_int(v, 3, 4)] for v in unsigned[:9]]
    # block t of the splitmix64 stream seeded with the key: blocks of n draws follow one another
    assert torch.equal(torch.cat([R.bits(raw[:9], t, 4) for t in range(3)], dim=1), R.bits(raw[:9], 0, 12))


def test_draws_op_rejects_bad_inputs():
    k = _keys(4)
    with pytest.raises(RuntimeError, match="int64"):
        draws(k.int(), 1, [3], 1, torch.float32)
    with pytest.raises(RuntimeError, match="counter must be"):
        draws(k, -1, [3], 1, torch.float32)
    with pytest.raises(RuntimeError, match="bound must be"):
        draws(k, 1, [3, 0], 1, torch.float32)
    with pytest.raises(RuntimeError, match="contiguous"):
        draws(k.view(2, 2).t().reshape(-1)[::1].as_strided((2,), (2,)), 1, [3], 1, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l2_fused_draws_match_pytorch_bit_for_bit(dtype):
    model = _model(3, 12, dtype)
    x, y = _data(40, 3, 12, dtype, model)
    outs = [sq._square(model, x, y, eps=0.9, queries=300, p_init=0.8, keys=_keys(40), norm="l2", fused=fused)
            for fused in (False, True)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert 0 < int(outs[0][1].sum()) < 40
    delta = (outs[0][0] - x).flatten(1).double().norm(dim=1)
    assert bool((delta <= 0.9 * (1 + 1e-5)).all())


# ------------------------------------------------------------ torch.library: fakes, opcheck, compile
def _one_query(k=3, c=2, side=5):
    gen = torch.Generator().manual_seed(5)
    x, xb = torch.rand(k, c, side, side, generator=gen), torch.rand(k, c, side, side, generator=gen)
    corner = torch.tensor([0, 1, 2][:k])
    signs = torch.where(torch.rand(k, c, generator=gen) < 0.5, -1.0, 1.0)
    return x, xb, torch.full((k,), 0.1), corner, corner.flip(0), signs


@pytest.mark.parametrize("op", ["propose", "accept", "draws"])
def test_opcheck_square_ops(op):
    x, xb, eps, vh, vw, signs = _one_query()
    if op == "propose":
        torch.library.opcheck(torch.ops.drp.square_propose_cpu.default, (x, xb, eps, vh, vw, 3, signs))
    elif op == "accept":
        logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
        torch.library.opcheck(torch.ops.drp.square_accept_cpu_.default,
                              (xb.clone(), torch.ones(3), x, logits, torch.tensor([0, 1, 2])))
    else:
        torch.library.opcheck(torch.ops.drp.square_draws_cpu.default, (_keys(3), 4, [3, 5], 2, torch.float32))


def test_square_query_compiles_fullgraph():
    """One query (draws, proposal, acceptance) traces through the fakes without a graph break."""
    x, xb, eps, _, _, _ = _one_query()
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])

    def query(keys, x, xb, m):
        ints, signs = draws(keys, 7, [3, 3], 2, torch.float32)
        x_new = propose(x, xb, eps, ints[0], ints[1], 3, signs)
        broken = accept(xb, m, x_new, logits, y)
        return x_new, broken

    want_xb, got_xb, want_m, got_m = xb.clone(), xb.clone(), torch.ones(3), torch.ones(3)
    want = query(_keys(3), x, want_xb, want_m)
    got = torch.compile(query, fullgraph=True, backend="aot_eager")(_keys(3), x, got_xb, got_m)
    assert torch.equal(want[0], got[0]) and int(want[1]) == int(got[1])
    assert torch.equal(want_xb, got_xb) and torch.equal(want_m, got_m)
