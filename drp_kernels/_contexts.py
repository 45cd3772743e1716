"""Context managers shared by the library: a module's eval mode and torch's thread count.

Neutral ground for the attack engine, the certificate and prototype generation, none of which
imports another's private modules for them.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["eval_mode", "single_thread"]


@contextlib.contextmanager
def eval_mode(model):
    """Put every submodule of ``model`` in eval mode; restore each one's own flag on exit
    (also when the body raises), so mixed train/eval trees come back exactly as they were.
    Anything other than an ``nn.Module`` passes through untouched."""
    if not isinstance(model, nn.Module):
        yield model
        return
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, flag in saved:
            m.training = flag


@contextlib.contextmanager
def single_thread(enabled: bool = True):
    """Run the block with ``torch.set_num_threads(1)`` (when ``enabled``), restoring the previous
    count afterwards. The setting is process-wide: other threads of the process see it too."""
    previous = torch.get_num_threads()
    if not enabled or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
