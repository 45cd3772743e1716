"""Helpers shared by the ``drp`` subcommands: the device picker, eps lists (numbers or
fractions such as ``8/255``), output-path checks, the JSON writer, the error line and whether
stderr is a terminal (progress bars there, plain log lines elsewhere)."""
import argparse
import json
import math
import os
import sys
from fractions import Fraction

import torch

from drp_kernels import atomic_write

from .errors import CLIError, ConfigError

#: Extensions `--plot` accepts; the figure is written in the format the extension names.
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")

__all__ = [
    "PLOT_SUFFIXES",
    "cli_error",
    "one_line",
    "pick_device",
    "parse_eps",
    "check_eps_list",
    "check_at_least",
    "check_output_path",
    "write_json_atomic",
    "atomic_write",
    "stderr_is_terminal",
]


def cli_error(message) -> CLIError:
    """The error a subcommand raises for misuse: one line on stderr, exit code 2."""
    return CLIError(message)


def one_line(exc) -> str:
    """``exc``'s message collapsed onto one line (its type name when it has none)."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def pick_device(name, option="--device") -> torch.device:
    """``name`` as a torch.device; ``None`` means cuda when available, else cpu.

    The one device picker of ``drp train``, ``drp eval`` and ``drp compare``; a bad name
    raises ConfigError (one line, exit 2)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{option}: expected a torch device such as cpu or cuda, got {name!r} "
                          f"({one_line(exc)})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}: {name!r} was asked for but CUDA is not available on this machine")
    return dev


def parse_eps(text) -> float:
    """argparse ``type=`` for an L-inf radius: a number (``0.1``) or a fraction (``8/255``)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip()
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            value = float(Fraction(num.strip()) / Fraction(den.strip()))
        else:
            value = float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected a number such as 0.1 or a fraction such as 8/255, got {text!r}") from None
    return value


def check_eps_list(eps, option="--eps"):
    """Validate a list of L-inf radii for [0, 1] inputs; returns them as floats."""
    if not eps:
        raise cli_error(f"{option}: expected at least one eps")
    out = []
    for e in eps:
        e = float(e)
        if not math.isfinite(e) or e < 0 or e > 1:
            raise cli_error(f"{option}: expected eps in [0, 1] (inputs live in [0, 1]), got {e:g}")
        out.append(e)
    return out


def check_at_least(option, value, low):
    """Refuse an integer option below ``low`` (None passes: the option was not given)."""
    if value is not None and value < low:
        raise cli_error(f"{option} must be >= {low}, got {value}")
    return value


def check_output_path(path, option, *, suffixes=None):
    """Refuse an output file that cannot be written: a folder, a missing or unwritable
    parent, a parent that is a file, or (with ``suffixes``) a wrong file extension."""
    path = os.fspath(path)
    if suffixes is not None:
        ext = os.path.splitext(path)[1].lower()
        if ext not in suffixes:
            raise cli_error(f"{option}: expected a file name ending in {' or '.join(suffixes)}, got {path!r}")
    if os.path.isdir(path):
        raise cli_error(f"{option}: {path!r} is a folder; expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    # the nearest part of the parent path that exists tells what is wrong with it
    probe = folder
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise cli_error(f"{option}: {probe!r} is a file, so {path!r} cannot be created under it")
    if not os.path.isdir(folder):
        raise cli_error(f"{option}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise cli_error(f"{option}: folder {folder!r} is not writable")


def write_json_atomic(obj, path):
    """Write ``obj`` as indented JSON to ``path`` atomically (see ``drp_kernels.io.atomic_write``)."""
    text = json.dumps(obj, indent=2) + "\n"
    return atomic_write(path, lambda f: f.write(text), binary=False)


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal: progress bars there; a log file gets the plain lines alone."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False
