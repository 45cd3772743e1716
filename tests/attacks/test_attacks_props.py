"""Properties of every attack on tiny models: the eps ball and [0, 1] hold exactly,
modes are restored, no parameter gradients, bad inputs raise; APGD's schedule."""
import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from drp_kernels import attacks as A
from drp_kernels.attacks.apgd import checkpoints
from drp_kernels.attacks.square import window_fraction

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(c, h, w, classes=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 16), nn.ReLU(), nn.Linear(16, classes)).eval()


@st.composite
def problems(draw):
    b = draw(st.integers(1, 4))
    c = draw(st.integers(1, 2))
    h = draw(st.integers(2, 6))
    w = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g)
    x[x < 0.1] = 0.0  # values on the box's faces
    x[x > 0.9] = 1.0
    y = torch.randint(0, 5, (b,), generator=g)
    if draw(st.booleans()):
        eps = draw(st.floats(0.0, 0.6, allow_nan=False))
    else:
        eps = torch.rand(b, generator=g) * 0.6
    model = tiny_model(c, h, w, seed=seed % 7)
    return model, x, y, eps


def ev(eps, x):
    return eps.view(-1, 1, 1, 1) if isinstance(eps, torch.Tensor) else eps


def assert_linf(x_adv, x, eps):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert bool(((x_adv >= 0) & (x_adv <= 1)).all())
    e = ev(eps, x)
    assert bool(((x_adv <= x + e) & (x_adv >= x - e)).all())


def assert_l2(x_adv, x, eps):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert bool(((x_adv >= 0) & (x_adv <= 1)).all())
    e = eps if isinstance(eps, torch.Tensor) else torch.full((x.shape[0],), eps)
    assert bool(((x_adv - x).flatten(1).norm(dim=1) <= e * (1 + 1e-5) + 1e-6).all())


@SETTINGS
@given(problems())
def test_linf_attacks_stay_in_the_ball(p):
    model, x, y, eps = p
    outs = [
        A.fgsm(model, x, y, eps=eps),
        A.pgd(model, x, y, eps=eps, alpha=0.1, steps=3, restarts=2, seed=0),
        A.apgd(model, x, y, eps=eps, steps=4, seed=0),
        A.apgd(model, x, y, eps=eps, steps=3, loss="dlr-t", n_target_classes=2, seed=0),
        A.square(model, x, y, eps=eps, queries=8, seed=0),
    ]
    for out in outs:
        assert_linf(out, x, eps)
    h = A.hop_skip_jump(model, x, y, norm="linf", steps=2, init_evals=4, init_tries=3, eps=eps, seed=0)
    assert bool(((h - x).abs().flatten(1).amax(1) <= (eps if isinstance(eps, float) else eps) + 1e-6).all())
    assert bool(((h >= 0) & (h <= 1)).all())


@SETTINGS
@given(problems())
def test_l2_attacks_stay_in_the_ball(p):
    model, x, y, eps = p
    eps = eps * 3 if isinstance(eps, torch.Tensor) else eps * 3
    for out in (A.fgsm(model, x, y, eps=eps, norm="l2"),
                A.pgd(model, x, y, eps=eps, alpha=0.5, steps=3, norm="l2", seed=0),
                A.apgd(model, x, y, eps=eps, steps=4, norm="l2", loss="dlr", seed=0),
                A.hop_skip_jump(model, x, y, norm="l2", steps=2, init_evals=4, init_tries=3, eps=eps, seed=0)):
        assert_l2(out, x, eps)


def test_flat_inputs_and_float64():
    model = nn.Sequential(nn.Linear(6, 4)).double().eval()
    x = torch.rand(5, 6, dtype=torch.float64)
    y = torch.arange(5) % 4
    for out in (A.pgd(model, x, y, eps=0.2, alpha=0.05, steps=3), A.apgd(model, x, y, eps=0.2, steps=3)):
        assert out.dtype == torch.float64
        assert_linf(out, x, 0.2)


class _Recorder(nn.Module):
    """Dropout and batch norm in train mode; records the mode it is called in."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 5))
        self.seen = set()

    def forward(self, x):
        self.seen.add(self.training)
        return self.body(x)


ATTACKS = {
    "fgsm": lambda m, x, y: A.fgsm(m, x, y, eps=0.1),
    "pgd": lambda m, x, y: A.pgd(m, x, y, eps=0.1, alpha=0.02, steps=2),
    "apgd": lambda m, x, y: A.apgd(m, x, y, eps=0.1, steps=2),
    "square": lambda m, x, y: A.square(m, x, y, eps=0.1, queries=3),
    "hsj": lambda m, x, y: A.hop_skip_jump(m, x, y, steps=1, init_evals=3, init_tries=2),
    "evaluate": lambda m, x, y: A.evaluate(m, x, y, eps=0.1, suite="quick", progress=False, check_samples=4),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_mode_restored_and_no_parameter_grads(name):
    torch.manual_seed(0)
    model = _Recorder().train()
    model.body[3].eval()  # a mixed tree must come back exactly as it was
    x = torch.rand(6, 1, 4, 4)
    y = torch.arange(6) % 5
    ATTACKS[name](model, x, y)
    assert model.seen == {False}
    assert model.training and model.body[2].training and not model.body[3].training
    assert all(p.grad is None for p in model.parameters())


def test_mode_restored_on_exception():
    model = _Recorder().train()
    with pytest.raises(ValueError, match="y must hold class indices"):
        A.pgd(model, torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 9]), eps=0.1, alpha=0.01, steps=1)
    assert model.training

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    boom = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        A.apgd(boom, torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), eps=0.1, steps=1)
    assert boom.training


@pytest.mark.parametrize("call,match", [
    (lambda m, x, y: A.pgd(m, x * 2, y, eps=0.1, alpha=0.1, steps=1), r"x must lie in \[0, 1\]"),
    (lambda m, x, y: A.pgd(m, (x * 255).to(torch.uint8), y, eps=0.1, alpha=0.1, steps=1), "x must be a floating"),
    (lambda m, x, y: A.pgd(m, x, y.float(), eps=0.1, alpha=0.1, steps=1), "y must have dtype torch.int64"),
    (lambda m, x, y: A.pgd(m, x, y[:2], eps=0.1, alpha=0.1, steps=1), r"y must have shape \(4,\)"),
    (lambda m, x, y: A.pgd(m, x, y + 5, eps=0.1, alpha=0.1, steps=1), "y must hold class indices"),
    (lambda m, x, y: A.pgd(m, x, y, eps=-0.1, alpha=0.1, steps=1), "eps must be a finite number >= 0"),
    (lambda m, x, y: A.pgd(m, x, y, eps=torch.tensor([0.1, -1.0, 0.1, 0.1]), alpha=0.1, steps=1), "eps must be"),
    (lambda m, x, y: A.pgd(m, x, y, eps=torch.ones(3), alpha=0.1, steps=1), "length B=4"),
    (lambda m, x, y: A.pgd(m, x, y, eps=0.1, alpha=0.1, steps=0), "steps must be an integer >= 1"),
    (lambda m, x, y: A.pgd(m, x, y, eps=0.1, alpha=0.1, steps=1, restarts=0), "restarts must be"),
    (lambda m, x, y: A.pgd(m, x, y, eps=0.1, alpha=0.1, steps=1, norm="l1"), "norm must be one of"),
    (lambda m, x, y: A.pgd(m, x, y, eps=0.1, alpha=0.1, steps=1, loss="mse"), "loss must be one of"),
    (lambda m, x, y: A.apgd(m, x, y, eps=0.1, loss="cw"), "loss must be one of"),
    (lambda m, x, y: A.apgd(m, x, y, eps=0.1, loss="dlr-t", n_target_classes=5), "n_target_classes must be <= C - 1"),
    (lambda m, x, y: A.square(m, x.flatten(1), y, eps=0.1), "4-D NCHW"),
    (lambda m, x, y: A.square(m, x, y, eps=0.1, p_init=1.5), "p_init must be"),
    (lambda m, x, y: A.hop_skip_jump(m, x, y, norm="l1"), "norm must be one of"),
    (lambda m, x, y: A.evaluate(m, x, y, eps=0.1, suite="full"), "suite must be one of"),
    (lambda m, x, y: A.evaluate(m, x, y, eps=0.1, batch_size=0), "batch_size must be"),
    (lambda m, x, y: A.accuracy_vs_eps(m, x, y, eps_list=0.1), "eps_list must be"),
    (lambda m, x, y: A.transfer(m, m, x, y, attack="cw"), "attack must be one of"),
    (lambda m, x, y: A.pgd(lambda t: t.flatten(1)[:, 0], x, y, eps=0.1, alpha=0.1, steps=1), "logits of shape"),
])
def test_bad_inputs_raise(call, match):
    model = tiny_model(1, 4, 4, classes=5)
    x = torch.rand(4, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises((ValueError, TypeError), match=match):
        call(model, x, y)


@pytest.mark.parametrize("loss,classes", [("dlr", 2), ("dlr-t", 3)])
def test_dlr_needs_enough_classes(loss, classes):
    model = tiny_model(1, 4, 4, classes=classes)
    with pytest.raises(ValueError, match=f"loss='{loss}' needs a model with at least"):
        A.apgd(model, torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), eps=0.1, loss=loss, n_target_classes=1)


def test_dlr_losses_match_their_definitions():
    z = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.5, 4.0, 1.0, 2.0]])
    y = torch.tensor([0, 0])
    # sample 0 correct: -(3 - 2) / (3 - 1); sample 1 wrong: -(0.5 - 4) / (4 - 1)
    torch.testing.assert_close(A.dlr_loss(z, y), torch.tensor([-0.5, 3.5 / 3.0]))
    t = torch.tensor([2, 3])
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    torch.testing.assert_close(A.dlr_targeted_loss(z, y, t), torch.tensor([-1.0 / 2.5, 1.5 / 3.25]))


def test_apgd_checkpoints_follow_the_paper():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == []
    w = checkpoints(1000)
    gaps = [b - a for a, b in zip([0] + w, w)]
    assert gaps[:3] == [220, 190, 160] and min(gaps) == 60


def test_square_schedule():
    assert window_fraction(0.8, 5, 10000) == 0.8
    assert window_fraction(0.8, 11, 10000) == 0.4
    assert window_fraction(0.8, 9000, 10000) == pytest.approx(0.8 / 512)
    assert window_fraction(0.8, 250, 5000) == 0.8 / 8  # rescaled to 10000: iteration 500


def test_zero_eps_returns_x_and_empty_batches():
    model = tiny_model(1, 4, 4)
    x = torch.rand(3, 1, 4, 4)
    y = torch.tensor([0, 1, 2])
    for f in (lambda: A.pgd(model, x, y, eps=0.0, alpha=0.1, steps=2),
              lambda: A.apgd(model, x, y, eps=0.0, steps=3),
              lambda: A.square(model, x, y, eps=0.0, queries=3)):
        assert torch.equal(f(), x)
    e = torch.empty(0, 1, 4, 4)
    assert A.pgd(model, e, torch.empty(0, dtype=torch.long), eps=0.1, alpha=0.1, steps=1).shape == e.shape
