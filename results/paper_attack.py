"""The paper's own attack against a DRP checkpoint, beside our standard suite.

The authors' attack is L-inf PGD that ascends the model's own distance to the true
prototype (for a ProtoClassifier, -logits[y]), step eps/4, 20 iterations, no random
start. This script runs it over the first N test points and writes a JSON report.

    python results/paper_attack.py --checkpoint runs/drp --eps 0.05 0.1 --limit 1000 --json out.json
"""
import argparse
import json

import torch

from drp_kernels import attacks
from drp_train.checkpoint import load_checkpoint, load_classifier
from drp_train.data import load_dataset


def own_distance_loss(logits, y):
    # ProtoClassifier logits are -d(z, P_c); the paper ascends d(z, P_y).
    return -logits.gather(1, y.view(-1, 1)).squeeze(1)


def accuracy(model, x, y, batch=500):
    with torch.no_grad():
        return sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
                   for i in range(0, len(y), batch)) / len(y)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    cfg = load_checkpoint(args.checkpoint)["config"]
    model = load_classifier(args.checkpoint)
    x, y = load_dataset(cfg["dataset"], split="test", data_dir=cfg.get("data_dir"), limit=args.limit)
    x = x.float() / 255.0
    out = {"checkpoint": args.checkpoint, "n": len(y), "steps": args.steps,
           "clean_accuracy": accuracy(model, x, y), "results": []}
    for eps in args.eps:
        advs = [attacks.pgd(model, x[i:i + 250], y[i:i + 250], eps=eps, alpha=eps / 4, steps=args.steps,
                            loss=own_distance_loss, random_start=False) for i in range(0, len(y), 250)]
        acc = accuracy(model, torch.cat(advs), y)
        out["results"].append({"eps": eps, "paper_attack_accuracy": acc})
        print(f"eps {eps}: paper's attack (PGD-{args.steps} on own L-inf loss) leaves {100 * acc:.1f}%")
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
