"""The prototypes of a training run: DRP's (generated, from a file, or the checkpoint's) and the
starting prototypes of a certified network's head."""
import torch

import drp_kernels

from .errors import ConfigError

__all__ = ["drp_prototypes", "init_linf_dist_prototypes"]


def drp_prototypes(cfg, num_classes: int, resume_ckpt=None):
    """The (C, D) float32 CPU prototypes a DRP run trains with (None for other methods): the checkpoint's
    when resuming, else a ``--prototypes`` file's, else generated with ``--proto-method``."""
    if cfg.method != "drp":
        return None
    if resume_ckpt is not None:
        return resume_ckpt["prototypes"].float()
    if cfg.prototypes is not None:
        return _from_file(cfg, num_classes)
    try:
        p = drp_kernels.repulsive_prototypes(num_classes, cfg.proto_dim, metric=cfg.metric,
                                             method=cfg.proto_method, seed=cfg.seed)
    except ValueError as e:  # e.g. a --proto-method made for another geometry than --metric
        raise ConfigError(f"--proto-method {cfg.proto_method} with --metric {cfg.metric}, "
                          f"--proto-dim {cfg.proto_dim}: {e}") from None
    return torch.as_tensor(p, dtype=torch.float32).cpu()

def _from_file(cfg, num_classes: int):
    try:
        p, info = drp_kernels.load_prototypes(cfg.prototypes, with_info=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise ConfigError(f"--prototypes {cfg.prototypes} cannot be loaded: {e}") from None
    made_for = info.get("metric")
    if made_for is not None and made_for != cfg.metric:
        raise ConfigError(f"--prototypes {cfg.prototypes} holds {made_for} prototypes but --metric is "
                          f"{cfg.metric}: pass --metric {made_for}, or prototypes made for {cfg.metric}")
    p = torch.as_tensor(p, dtype=torch.float32)
    if p.ndim != 2 or p.shape[0] != num_classes:
        raise ConfigError(f"--prototypes {cfg.prototypes} holds a tensor of shape {tuple(p.shape)}, "
                          f"expected ({num_classes}, D) for {cfg.dataset}")
    if cfg.proto_dim is not None and cfg.proto_dim != p.shape[1]:
        raise ConfigError(f"--proto-dim {cfg.proto_dim} disagrees with --prototypes {cfg.prototypes}, "
                          f"whose dimension is {p.shape[1]}; leave --proto-dim out")
    if not torch.isfinite(p).all():
        raise ConfigError(f"--prototypes {cfg.prototypes} holds NaN or Inf values")
    return p.cpu()


def init_linf_dist_prototypes(net, cfg, num_classes: int) -> None:
    """Set a LinfDistNet head's starting (learnable) or fixed (drp) prototypes: DRP's box prototypes."""
    p = drp_kernels.repulsive_prototypes(num_classes, cfg.width, metric="linf", method="box", seed=cfg.seed)
    with torch.no_grad():
        net.prototypes.copy_(torch.as_tensor(p, dtype=torch.float32))
