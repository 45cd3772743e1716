"""`drp eval`: robust accuracy of a trained checkpoint against a list of eps, L-inf or L2.

The classifier comes from `drp_train.checkpoint.load_classifier`, the test points
from the dataset named in the checkpoint's config, and the numbers from
`drp_kernels.attacks.sweep` / `sweep_report` (what `accuracy_vs_eps` runs): the quick or the
standard suite, and for a DRP checkpoint also the paper's own protocol ("paper",
"paper-100"), side by side when several suites are given. For a certifiable checkpoint
(`drp_kernels.certify`) the certified accuracy comes beside the robust one.

This module evaluates: ``evaluate_model`` (the attacks, the certificate and the report of one
process), ``certified_points`` and ``format_eval_table``. The ``drp eval`` command, which runs it
at scale, is ``eval_cli.py``; its partial files are ``eval_partial.py``.
"""
import time

import torch

import drp_kernels
from drp_kernels import attacks, is_certifiable

from ._cli_utils import cli_error as _cli_error, one_line as _one_line
from .data import load_dataset
from .errors import DatasetError

__all__ = [
    "evaluate_model",
    "load_eval_data",
    "format_eval_table",
    "certified_points",
    "certify_eps",
    "suite_result",
    "add_certified",
    "correct_count",
    "frac",
    "SUITES",
    "PAPER_SUITES",
    "DECISIONS",
    "NORM_NAMES",
    "CERTIFICATE_NOTES",
    "CERT_BATCH",
]

SUITES = ("quick", "standard")  # the suites for any classifier
PAPER_SUITES = ("paper", "paper-100")  # the DRP paper's attack: ProtoClassifier checkpoints only
DECISIONS = ("nearest", "paper")
NORM_NAMES = {"linf": "L-inf", "l2": "L2"}
#: What "certified_accuracy" means under each norm (the JSON's "certificate").
CERTIFICATE_NOTES = {
    "linf": "L-inf certificate of the model (drp_kernels.certify)",
    "l2": "implied by the L-inf certificate (drp_kernels.certify): the L2 ball of radius eps lies inside the "
          "L-inf ball of radius eps",
}
CERT_BATCH = 250


def load_eval_data(dataset, *, data_dir=None, limit=None):
    """The first `limit` test points of `dataset` (all of them for None) as float [0, 1] inputs and
    int64 labels."""
    try:
        x, y = load_dataset(dataset, split="test", data_dir=data_dir, limit=limit)
    except DatasetError as exc:
        raise _cli_error(_one_line(exc)) from None
    return x.float().div_(255.0), y.long()


# ------------------------------------------------------------------------ results
def frac(count, n):
    return count / n if n else 0.0


def suite_result(report, *, elapsed):
    """An `attacks.sweep_report` result in the `drp eval` JSON schema."""
    results, timings = [], []
    for r in report["results"]:
        timings.append({str(k): float(v) for k, v in r.get("timings", {}).items()})
        results.append({
            "eps": float(r["eps"]),
            "robust_accuracy": float(r["robust_accuracy"]),
            "robust": int(r["robust_count"]),
            "n": int(r["n"]),
            "per_attack": {str(k): float(v) for k, v in r["per_attack"].items()},
            "per_attack_counts": {str(k): int(v) for k, v in r["per_attack_counts"].items()},
            "flags": [str(f) for f in r.get("flags", [])],
        })
    return {"clean_accuracy": float(report["clean_accuracy"]), "clean": int(report["clean_count"]),
            "n": int(report["n"]), "results": results, "flags": [str(f) for f in report.get("flags", [])],
            "timings": timings, "eval_time_s": float(elapsed)}


def add_certified(result, report, cert, *, suite, cert_time):
    """Put the certified counts (cert: (K, M) bool, the first M test points, eps_list's order) into a
    `_suite_result`. A certified point that the suite broke would be a bug of the certificate:
    RuntimeError (never a certified number above what the attacks leave)."""
    m = int(cert.shape[1])
    n = result["n"]
    both = min(m, n)
    for k, (entry, raw) in enumerate(zip(result["results"], report["results"])):
        c = cert[k]
        broken = c[:both] & ~raw["robust"][:both]
        if bool(broken.any()):
            idx = broken.nonzero().flatten()[:10].tolist()
            raise RuntimeError(f"certificate bug: {int(broken.sum())} point(s) certified at eps {entry['eps']:g} were "
                               f"broken by the {suite} suite (first indices {idx}); please report it")
        count = int(c.sum())
        entry["certified_accuracy"] = frac(count, m)
        entry["certified"] = count
        entry["certified_n"] = m
        if m > n:  # on the attacked points too, to read beside the robust count
            entry["certified_on_suite_points"] = int(c[:n].sum())
        result["timings"][k]["certify"] = float(cert_time[k])


def certified_points(model, x, y, eps, *, batch_size=CERT_BATCH):
    """(N,) bool: `drp_kernels.certify` over `x` in batches, on the model's device."""
    dev = next(iter(model.buffers())).device
    out = [drp_kernels.certify(model, x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev), eps).cpu()
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def certify_eps(model, x, y, eps_list, *, batch_size):
    """((K, len(x)) bool certified per eps, [seconds per eps])."""
    rows, secs = [], []
    for e in eps_list:
        t0 = time.perf_counter()
        rows.append(certified_points(model, x, y, float(e), batch_size=batch_size))
        secs.append(time.perf_counter() - t0)
    if not rows:
        return torch.zeros((0, x.shape[0]), dtype=torch.bool), secs
    return torch.stack(rows), secs


def evaluate_model(model, x, y, *, eps_list, suite="standard", batch_size=None, seed=0, device=None,
                   progress=True, compile=False, checks=True, norm="linf", index=None):
    """Run the attack suite over `eps_list` (monotone in eps; `attacks.sweep` then `sweep_report`) in
    this process and return its result in the `drp eval` JSON schema.

    Each entry of "results" holds eps, robust_accuracy with its count ("robust") and "n",
    per_attack (cumulative robust accuracy after each stage) with per_attack_counts, and flags;
    for a certifiable model (`is_certifiable`) also certified_accuracy, "certified" and
    "certified_n": the points that `drp_kernels.certify` proves at that eps (under norm "l2" the
    L-inf certificate, whose ball holds the L2 ball). A certified point that the suite broke
    would be a bug of the certificate: it raises RuntimeError.
    Also returned: "clean_accuracy" and "clean", "n", "flags" (the run-level checks), "timings"
    (seconds per attack, one dict per eps) and "eval_time_s" (wall time of the whole evaluation).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    model = model.to(device).eval()
    certifiable = is_certifiable(model)
    kwargs = {"eps_list": list(eps_list), "suite": suite, "seed": seed, "norm": norm}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    t0 = time.perf_counter()
    state = attacks.sweep(model, x, y, index=index, progress=progress, compile=bool(compile), **kwargs)
    report = attacks.sweep_report(model, x, y, state, checks=bool(checks), return_points=certifiable,
                                  compile=bool(compile))
    result = suite_result(report, elapsed=time.perf_counter() - t0)
    if certifiable:
        cert, secs = certify_eps(model, x, y, eps_list, batch_size=batch_size or CERT_BATCH)
        add_certified(result, report, cert, suite=suite, cert_time=secs)
    result["eval_time_s"] = time.perf_counter() - t0
    return result


def format_eval_table(result, *, suite=None, norm="linf"):
    """A short plain-text table of one `evaluate_model` result (headed by its suite if given)."""
    lines = [] if suite is None else [f"suite {suite}:"]
    cert = any("certified_accuracy" in r for r in result["results"])
    clean = f"clean accuracy: {100 * result['clean_accuracy']:.2f}%"
    if "clean" in result and "n" in result:
        clean += f" ({result['clean']}/{result['n']})"
    lines.append(clean)
    if cert:
        m = next(r["certified_n"] for r in result["results"] if "certified_n" in r)
        if m != result.get("n"):
            lines.append(f"certified on the first {m} test points, attacked on the first {result.get('n')}")
    head = f"eps ({NORM_NAMES.get(norm, norm)})"
    lines.append(f"{head:>10}  {'robust':>8}  " + (f"{'certified':>9}  " if cert else "")
                 + "after each attack (cumulative)")
    for r in result["results"]:
        stages = " -> ".join(f"{k} {100 * v:.1f}%" for k, v in r["per_attack"].items()) or "-"
        c = f"{100 * r['certified_accuracy']:>8.2f}%  " if "certified_accuracy" in r else ""
        lines.append(f"{r['eps']:>10.4g}  {100 * r['robust_accuracy']:>7.2f}%  {c}{stages}")
        for flag in r["flags"]:
            lines.append(f"{'':>10}  flag: {flag}")
    for flag in result.get("flags", []):
        lines.append(f"flag: {flag}")
    return "\n".join(lines)


def correct_count(model, x, y, *, batch_size):
    dev = next(iter(model.buffers())).device
    return sum(int((model(x[i:i + batch_size].to(dev)).argmax(1).cpu() == y[i:i + batch_size]).sum())
               for i in range(0, x.shape[0], batch_size))
