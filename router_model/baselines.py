"""Baselines and leave-one-source-out (LOSO) estimates, on the same data in the same run.

Dev: tf-idf + logistic regression, MiniLM sentence embeddings + LR, and the shipped functional-token
router. ``--loso``: whole source families are held out of training (and of the dev set used for early
stopping); each held-out family is then predicted by models that never saw it. The router is retrained
per fold with a shorter schedule (``--loso-steps``), so its LOSO figures are, if anything, pessimistic.
Results go to ``baselines.json`` / ``loso.json`` in the checkpoint and into its model card.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from router_model.card import write_model_card
from router_model.eval import DEFAULT_CHECKPOINT, classification, read_jsonl
from router_model.interface import Message
from router_model.model import minilm_path, quantize_int8
from router_model.train import DEFAULT_DATA, stratified
from router_model.train import train as train_router

FOLDS = (
    ("banking77", "conditionalqa", "spider", "gsm8k", "nq_open"),
    ("clinc150", "nl2bash", "legalbench", "hendrycks_math", "oasst"),
)


RECIPE_KEYS = ("layers", "max_len", "batch_size", "lr", "freeze_blocks", "freeze_embeddings", "augment", "mix",
               "dropout", "weight_decay", "seed")


def family(row: dict[str, Any]) -> str:
    return str(row.get("source", "")).split("/")[0]


@torch.inference_mode()
def minilm_embeddings(texts: Sequence[str], max_len: int = 64, batch: int = 64) -> np.ndarray:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 sentence embeddings (int8 Linear layers, for CPU time)."""
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    model = quantize_int8(BertModel.from_pretrained(str(minilm_path())).eval())
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), 384), dtype=np.float32)
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        enc = tok([texts[i] for i in idx], truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        out[idx] = e.numpy()
    return out


def tfidf_lr(train: Sequence[dict[str, Any]], tests: Sequence[Sequence[dict[str, Any]]]) -> list[list[str]]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x = vec.fit_transform([r["text"] for r in train])
    clf = LogisticRegression(max_iter=2000, C=10.0, class_weight="balanced").fit(x, [r["label"] for r in train])
    return [list(clf.predict(vec.transform([r["text"] for r in t]))) for t in tests]


def embed_lr(emb: dict[str, np.ndarray], train: Sequence[dict[str, Any]],
             tests: Sequence[Sequence[dict[str, Any]]]) -> list[list[str]]:
    from sklearn.linear_model import LogisticRegression

    x = np.stack([emb[r["id"]] for r in train])
    clf = LogisticRegression(max_iter=2000, C=10.0, class_weight="balanced").fit(x, [r["label"] for r in train])
    return [list(clf.predict(np.stack([emb[r["id"]] for r in t]))) for t in tests]


def sample(rows: list[dict[str, Any]], n: int, rng: random.Random) -> list[dict[str, Any]]:
    return rng.sample(rows, min(n, len(rows)))


def router_predict(router: Any, rows: Sequence[dict[str, Any]]) -> list[str]:
    return [r.top[0] for r in router.route_batch([[Message("user", x["text"])] for x in rows])]


def summary(rows: Sequence[dict[str, Any]], pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Pooled macro-F1 over every held-out row, accuracy per held-out family, and what was predicted."""
    gold = [r["label"] for r in rows]
    by_src: dict[str, list[bool]] = defaultdict(list)
    for r, p in zip(rows, pred, strict=True):
        by_src[family(r)].append(r["label"] == p)
    per_source = {s: sum(v) / len(v) for s, v in by_src.items()}
    m = classification(gold, pred, labels)
    return {"pooled_macro_f1": m["macro_f1"], "pooled_accuracy": m["accuracy"],
            "mean_source_accuracy": sum(per_source.values()) / len(per_source), "per_source": per_source,
            "predicted": dict(Counter(pred)), "per_label_f1": {k: v["f1"] for k, v in m["per_label"].items()}}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m router_model.baselines", description=__doc__)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--loso", action="store_true", help="also run leave-one-source-out folds")
    ap.add_argument("--loso-steps", type=int, default=250)
    ap.add_argument("--per-source", type=int, default=300, help="held-out rows sampled per family")
    ap.add_argument("--embed-train", type=int, default=6000, help="stratified train rows for MiniLM + LR (0: all)")
    ap.add_argument("--loso-ablation", action="store_true",
                    help="also retrain each fold without augmentation/mixing (doubles LOSO time)")
    ap.add_argument("--router-only", action="store_true",
                    help="refresh only the router rows of an existing baselines.json (after retraining)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from router_model.router import FunctionalTokenRouter

    ckpt = Path(args.checkpoint)
    train = read_jsonl(Path(args.data) / "train.jsonl")
    dev = read_jsonl(Path(args.data) / "dev.jsonl")
    router = FunctionalTokenRouter.load(ckpt, threads=args.threads)
    labels = router.labels
    if args.router_only:
        base = json.loads((ckpt / "baselines.json").read_text())
        gold = [r["label"] for r in dev]
        for name, quant in (("functional-token router (shipped)", True),
                            ("functional-token router, fp32 (not shipped)", False)):
            p = router_predict(FunctionalTokenRouter.load(ckpt, threads=args.threads, quantize=quant), dev)
            base[name] = {x: classification(gold, p, labels)[x] for x in ("accuracy", "macro_f1")}
        (ckpt / "baselines.json").write_text(json.dumps(base, indent=1) + "\n")
        write_model_card(ckpt)
        print(json.dumps(base, indent=1))
        return 0
    allrows = train + dev
    # Embedding every row costs more CPU than a router fold; LR on 384-d embeddings saturates long before.
    emb_train = stratified(train, args.embed_train, 0) if args.embed_train else train
    rng = random.Random(0)
    tests = [[r for src in fold for r in sample([r for r in allrows if family(r) == src], args.per_source, rng)]
             for fold in FOLDS] if args.loso else []
    todo = {r["id"]: r["text"] for r in [*emb_train, *dev, *(r for t in tests for r in t)]}
    emb = dict(zip(todo, minilm_embeddings(list(todo.values())), strict=True))

    minilm = f"MiniLM embeddings + LR ({len(emb_train)} train rows)"
    preds = {"tf-idf + LR": tfidf_lr(train, [dev])[0], minilm: embed_lr(emb, emb_train, [dev])[0],
             "functional-token router (shipped)": router_predict(router, dev)}
    fp32 = FunctionalTokenRouter.load(ckpt, threads=args.threads, quantize=False)
    preds["functional-token router, fp32 (not shipped)"] = router_predict(fp32, dev)
    gold = [r["label"] for r in dev]
    base = {k: {x: classification(gold, p, labels)[x] for x in ("accuracy", "macro_f1")} for k, p in preds.items()}
    (ckpt / "baselines.json").write_text(json.dumps(base, indent=1) + "\n")
    print(json.dumps(base, indent=1))

    if args.loso:
        # The shipped checkpoint's own recipe, shortened: LOSO measures the recipe, not one lucky run.
        recipe = json.loads((ckpt / "metrics.json").read_text())["train"]["args"]
        variants: dict[str, dict[str, Any]] = {"functional-token router": {}}
        if args.loso_ablation:
            variants["functional-token router, no augmentation/mixing"] = {"augment": False, "mix": 0.0}
        held: list[dict[str, Any]] = []
        fold_preds: dict[str, list[str]] = defaultdict(list)
        for k, (fold, test) in enumerate(zip(FOLDS, tests, strict=True)):
            keep = [r for r in train if family(r) not in fold]
            held += test
            fold_preds["tf-idf + LR"] += tfidf_lr(keep, [test])[0]
            fold_preds[minilm] += embed_lr(emb, [r for r in emb_train if family(r) not in fold],
                                                             [test])[0]
            for name, change in variants.items():
                with tempfile.TemporaryDirectory() as tmp:
                    ns = argparse.Namespace(**{**recipe, **change, "data": args.data, "train": None, "dev": None,
                                               "out": tmp, "max_steps": args.loso_steps, "latency_n": 0,
                                               "eval_every": max(1, args.loso_steps // 2), "exclude_sources": fold,
                                               "threads": args.threads, "limit": 0})
                    train_router(ns)
                    fold_preds[name] += router_predict(FunctionalTokenRouter.load(tmp, threads=args.threads), test)
            sources = [s for f in FOLDS[: k + 1] for s in f]
            loso = {
                "note": f"Reduced LOSO: {k + 1} of {len(FOLDS)} folds, each holding out {len(fold)} source families "
                        f"at once (all their train+dev rows, {args.per_source} sampled per family; held-out families "
                        "also removed from the early-stopping dev rows). The router is retrained per fold with the "
                        "recipe below; baselines are refit per fold on the same rows.",
                "recipe": {**{key: recipe[key] for key in RECIPE_KEYS}, "max_steps": args.loso_steps},
                "folds": [list(f) for f in FOLDS[: k + 1]], "sources": sources, "n": len(held),
                "models": {name: summary(held, p, labels) for name, p in fold_preds.items()},
            }
            (ckpt / "loso.json").write_text(json.dumps(loso, indent=1) + "\n")
            write_model_card(ckpt)
            print(json.dumps(loso, indent=1))
    write_model_card(ckpt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
