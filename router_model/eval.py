"""Routing metrics for a checkpoint on a JSONL file: accuracy, macro-F1, per-label P/R, confusion, ECE, latency.

``python -m router_model.eval --data FILE [--conversations] [--json] [--checkpoint DIR]``

Rows are ``{"text", "label"}`` (one user turn) or ``{"messages": [{"role", "content"}, …], "label"[, "kind"]}``
(a conversation, routed on its last user turn with what came before); rows with a ``kind`` also get accuracy
per kind. ``--conversations`` turns each single-turn row into the two conversation cases (``kind`` follow_up:
the row, an answer, then a generic follow-up; ``kind`` switch: an exchange about another label, then the row)
with follow-up phrasings the router never trained on. ``--json`` prints one object with ``accuracy, macro_f1,
ece, p50_ms, p99_ms, n`` (and ``per_kind``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from router_model.conversations import as_messages, evaluation_conversations
from router_model.interface import Message, Router

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def ece(confidence: Sequence[float], correct: Sequence[bool], bins: int = 15) -> float:
    """Expected calibration error of the top-label confidence, equal-width bins."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidence) if lo < c <= hi]
        if idx:
            acc = sum(correct[i] for i in idx) / len(idx)
            conf = sum(confidence[i] for i in idx) / len(idx)
            total += len(idx) / len(confidence) * abs(acc - conf)
    return total


def classification(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over ``labels``, per-label precision/recall/F1, confusion[gold][pred]."""
    confusion = {g: {p: 0 for p in labels} for g in labels}
    for g, p in zip(gold, pred, strict=True):
        confusion.setdefault(g, {q: 0 for q in labels})[p] += 1
    per_label: dict[str, dict[str, float]] = {}
    for lab in labels:
        tp = confusion.get(lab, {}).get(lab, 0)
        n_pred = sum(row.get(lab, 0) for row in confusion.values())
        n_gold = sum(confusion.get(lab, {}).values())
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_gold if n_gold else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_label[lab] = {"precision": prec, "recall": rec, "f1": f1, "support": n_gold}
    present = [lab for lab in labels if per_label[lab]["support"] or any(p == lab for p in pred)]
    return {
        "accuracy": sum(g == p for g, p in zip(gold, pred, strict=True)) / max(1, len(gold)),
        "macro_f1": sum(per_label[lab]["f1"] for lab in present) / max(1, len(present)),
        "per_label": per_label,
        "confusion": confusion,
    }


def latency(router: Router, texts: Sequence[str], n: int = 200) -> tuple[float, float]:
    """Batch-1 p50/p99 in ms over the first ``n`` texts, after a short warm-up."""
    convs = [[Message("user", t)] for t in texts[:n]]
    for c in convs[:10]:
        router.route_batch([c])
    times = []
    for c in convs:
        t0 = time.perf_counter()
        router.route_batch([c])
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))]


def evaluate(router: Router, rows: Sequence[dict[str, Any]], latency_n: int = 200) -> dict[str, Any]:
    """Every figure the model card reports for one data file, predictions included (for exact re-checks)."""
    results = router.route_batch([as_messages(r) if "messages" in r else [Message("user", r["text"])] for r in rows])
    pred = [r.top[0] for r in results]
    conf = [r.top[1] for r in results]
    gold = [r["label"] for r in rows]
    out = classification(gold, pred, router.labels)
    out["ece"] = ece(conf, [g == p for g, p in zip(gold, pred, strict=True)])
    out["n"] = len(rows)
    out["correct"] = sum(g == p for g, p in zip(gold, pred, strict=True))
    out["predictions"] = pred
    kinds = sorted({r["kind"] for r in rows if "kind" in r})
    if kinds:
        out["per_kind"] = {k: sum(g == p for g, p, r in zip(gold, pred, rows, strict=True) if r.get("kind") == k)
                           / sum(r.get("kind") == k for r in rows) for k in kinds}
    texts = [r["text"] for r in rows if "text" in r]
    if latency_n and texts:
        out["p50_ms"], out["p99_ms"] = latency(router, texts, latency_n)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="octoroute router eval", formatter_class=argparse.RawDescriptionHelpFormatter,  # examples keep their lines
        description=(__doc__ or "").replace("``", "").replace("::\n", ":\n"))
    ap.add_argument("--data", required=True, help="JSONL rows with text (or messages) and label")
    ap.add_argument("--conversations", action="store_true",
                    help="score the follow-up and switch conversations built from the file's single-turn rows")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    from router_model.router import FunctionalTokenRouter

    router = FunctionalTokenRouter.load(args.checkpoint, threads=args.threads)
    rows = read_jsonl(args.data)
    m = evaluate(router, evaluation_conversations(rows) if args.conversations else rows)
    keys = [k for k in ("accuracy", "macro_f1", "ece", "p50_ms", "p99_ms", "n", "per_kind") if k in m]
    if args.json:
        print(json.dumps({k: m[k] for k in keys}))
        return 0
    for k in keys:
        print(f"{k:10s} {m[k]:.4f}" if isinstance(m[k], float) else f"{k:10s} {m[k]}")
    print("\nlabel      precision recall  f1     support")
    for lab, s in m["per_label"].items():
        print(f"{lab:10s} {s['precision']:.4f}    {s['recall']:.4f}  {s['f1']:.4f} {s['support']}")
    labels = list(m["per_label"])
    print("\nconfusion (rows gold, columns predicted)\n" + " " * 10 + "".join(f"{lab[:8]:>9s}" for lab in labels))
    for g in labels:
        print(f"{g:10s}" + "".join(f"{m['confusion'][g][p]:9d}" for p in labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
