"""The table and the Markdown report of ``drp compare``, and the counts of a committed report."""
import glob
import json
import os

__all__ = ["format_table", "format_report", "fmt_time", "recertify_line", "committed_counts"]


def _pct(v):
    return f"{100 * v:.1f}%"


def fmt_time(s):
    return f"{s:.0f} s" if s < 600 else f"{s / 60:.1f} min"


def _table_rows(rows):
    """(method, attack, eval result, accuracy key, train time) per line: each model under the suite,
    DRP models also under the paper's own attack and certified models with their certificate,
    right below."""
    out = []
    for r in rows:
        out.append((r["name"], f"{r.get('suite', 'standard')} suite", r["eval"], "robust_accuracy", r["train_time_s"]))
        if r.get("paper_eval") is not None:
            out.append((r["name"], "paper's attack", r["paper_eval"], "robust_accuracy", r["train_time_s"]))
        if any("certified_accuracy" in x for x in r["eval"]["results"]):
            out.append((r["name"], "certified", r["eval"], "certified_accuracy", r["train_time_s"]))
    return out


def format_table(rows, eps_list, *, markdown=False):
    """The paper-style table: method, attack, clean, robust at each eps, training and evaluation time."""
    head = ["method", "attack", "clean"] + [f"eps={e:g}" for e in eps_list] + ["train time", "eval time"]
    body = []
    for name, attack, ev, key, train_time in _table_rows(rows):
        by_eps = {float(x["eps"]): x[key] for x in ev["results"] if key in x}
        body.append([name, attack, _pct(ev["clean_accuracy"])]
                    + [_pct(by_eps[e]) if e in by_eps else "-" for e in eps_list]
                    + [fmt_time(train_time), fmt_time(ev["eval_time_s"])])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body])


def committed_counts(resolved, n):
    """(report name, {eps: certified count on the first n test points}) from the report beside a
    checkpoint: eval.json, else the first eval-*.json (such as eval-quick.json)."""
    folder = os.path.dirname(os.path.abspath(resolved))
    names = [f for f in ["eval.json"] + sorted(os.path.basename(p) for p in glob.glob(os.path.join(
        glob.escape(folder), "eval-*.json"))) if os.path.isfile(os.path.join(folder, f))]
    return (names[0], _report_counts(os.path.join(folder, names[0]), n)) if names else (None, {})


def _report_counts(path, n):
    found = {}
    try:
        with open(path) as f:
            doc = json.load(f)
        for r in doc.get("results", []):
            if r.get("certified_n") == n:
                found[float(r["eps"])] = int(r["certified"])
            elif doc.get("n") == n and "certified_on_suite_points" in r:
                found[float(r["eps"])] = int(r["certified_on_suite_points"])
            elif doc.get("n") == n and "certified_n" not in r and "certified_accuracy" in r:  # older reports
                found[float(r["eps"])] = round(float(r["certified_accuracy"]) * n)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return found


def recertify_line(rec):
    """One line: the re-certified counts of --recertify beside its eval.json's."""
    parts = []
    for r in rec["results"]:
        was = "" if r["committed"] is None else f" (its {rec.get('report') or 'eval.json'}: {r['committed']})"
        parts.append(f"{r['certified']}/{rec['n']} at eps {r['eps']:g}{was}")
    return (f"re-certified {rec['checkpoint']} on the first {rec['n']} test points in {rec['time_s']:.1f} s: "
            + ", ".join(parts))


def _final_line(final, train_time_s):
    parts = [f"trained in {fmt_time(train_time_s)}"]
    for key, label in (("epoch", "epochs"), ("test_accuracy", "test accuracy"), ("train_accuracy", "train accuracy"),
                       ("train_loss", "train loss")):
        v = final.get(key)
        if v is None:
            continue
        parts.append(f"{label} {_pct(v)}" if "accuracy" in key else f"{label} {v:.4g}")
    return "Training: " + ", ".join(parts) + "."


def format_report(*, rows, settings, command, total_time_s, files, environment):
    """The Markdown report: table, command line, settings, per-attack numbers and flags."""
    eps_list = settings["eps"]
    n_eval = rows[0]["eval"]["n"] if rows else 0
    others = " but certified" if any(r["name"] == "certified" for r in rows) else ""
    out = [
        f"# drp compare: {settings['dataset']}",
        "",
        f"Robust accuracy under the **{settings['suite']}** attack suite (L-inf), on the first {n_eval} test "
        f"points. Every method{others} trains the same `{settings['model']}` network for {settings['epochs']} "
        f"epoch{'' if settings['epochs'] == 1 else 's'}, batch {settings['batch_size']}, seed {settings['seed']}."
        + "".join(f" {r['name']} trains `{r['training']['network']}` for {r['training']['epochs']} epochs, batch "
                  f"{r['training']['batch_size']}; its certified line is what `drp_kernels.certify` proves."
                  for r in rows if r["name"] == "certified" and "training" in r)
        + (" DRP models are also evaluated under the paper's own attack (PGD on the distance to the true "
           "prototype, step eps/4, 20 steps, no random start): the gap between the two lines of a DRP model is "
           "the robustness that only the weaker attack sees." if any(r.get("paper_eval") for r in rows) else ""),
        "",
        format_table(rows, eps_list, markdown=True),
        "",
        "## Command",
        "",
        "```",
        command,
        "```",
        "",
        "## Settings",
        "",
    ]
    for k in sorted(settings):
        out.append(f"- `{k}`: {settings[k]!r}")
    out += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in environment.items()]
    out += [f"- total wall time: {fmt_time(total_time_s)}", "", "## Per-attack robust accuracy", ""]
    for r in rows:
        out.append(f"### {r['name']}")
        out.append("")
        out.append(_final_line(r.get("final", {}), r["train_time_s"]))
        out.append("")
        for label, ev in (("", r["eval"]), ("paper's attack, ", r.get("paper_eval"))):
            for res in (ev or {}).get("results", []):
                per = ", ".join(f"{k} {_pct(v)}" for k, v in res["per_attack"].items()) or "-"
                out.append(f"- {label}eps {res['eps']:g}: robust {_pct(res['robust_accuracy'])} ({per})")
        out.append("")
    out += ["## Flags", ""]
    any_flag = False
    for r in rows:
        for flag in r["eval"].get("flags", []):
            any_flag = True
            out.append(f"- {r['name']}: {flag}")
        for res in r["eval"]["results"]:
            for flag in res["flags"]:
                any_flag = True
                out.append(f"- {r['name']}, eps {res['eps']:g}: {flag}")
    if not any_flag:
        out.append("No check of the evaluation raised a flag (model sanity, chance at large eps, accuracy "
                   "monotone in eps, single-step vs iterative, black-box vs white-box, more iterations).")
    out += ["", "## Files", ""] + [f"- `{f}`" for f in files] + [""]
    return "\n".join(out)
