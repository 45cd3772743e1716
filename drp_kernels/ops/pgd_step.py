"""Batched PGD step. PROVISIONAL: calls the reference until the _C extension lands."""
from .. import reference


def pgd_step_(x_adv, x, grad, eps, alpha, *, norm="linf", lower=0.0, upper=1.0, active=None):
    x_adv.copy_(reference.pgd_step(x_adv, x, grad, eps, alpha, norm=norm, lower=lower, upper=upper, active=active))
    return x_adv


def random_init(x, eps, *, norm="linf", lower=0.0, upper=1.0, generator=None):
    return reference.random_init(x, eps, norm=norm, lower=lower, upper=upper, generator=generator)
