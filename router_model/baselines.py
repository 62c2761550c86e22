"""Dev baselines, on the same data in the same run: tf-idf + logistic regression, MiniLM sentence embeddings
+ LR, and the shipped functional-token router at each serving precision (bf16, int8, fp32). Results go to
``baselines.json`` in the checkpoint and into its model card; ``router_model.loso`` compares the same models
on unseen sources.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def router_predict(router: Any, rows: Sequence[dict[str, Any]]) -> list[str]:
    return [r.top[0] for r in router.route_batch([[Message("user", x["text"])] for x in rows])]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m router_model.baselines", description=__doc__)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--embed-train", type=int, default=6000, help="stratified train rows for MiniLM + LR (0: all)")
    ap.add_argument("--router-only", action="store_true",
                    help="refresh only the router rows of an existing baselines.json (after retraining)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from router_model.router import FunctionalTokenRouter

    ckpt = Path(args.checkpoint)
    train = read_jsonl(Path(args.data) / "train.jsonl")
    dev = read_jsonl(Path(args.data) / "dev.jsonl")
    labels = FunctionalTokenRouter.load(ckpt, threads=args.threads).labels
    gold = [r["label"] for r in dev]
    preds = {f"functional-token router, {p}": router_predict(FunctionalTokenRouter.load(ckpt, args.threads, p), dev)
             for p in ("bf16", "int8", "fp32")}
    if args.router_only:
        base = {k: v for k, v in json.loads((ckpt / "baselines.json").read_text()).items()
                if not k.startswith("functional-token router")}
    else:
        base = {}
        emb_train = stratified(train, args.embed_train, 0) if args.embed_train else train
        todo = {r["id"]: r["text"] for r in [*emb_train, *dev]}
        emb = dict(zip(todo, minilm_embeddings(list(todo.values())), strict=True))
        minilm = f"MiniLM embeddings + LR ({len(emb_train)} train rows)"
        preds = {"tf-idf + LR": tfidf_lr(train, [dev])[0], minilm: embed_lr(emb, emb_train, [dev])[0], **preds}
    base.update({k: {x: classification(gold, p, labels)[x] for x in ("accuracy", "macro_f1")}
                 for k, p in preds.items()})
    (ckpt / "baselines.json").write_text(json.dumps(base, indent=1) + "\n")
    print(json.dumps(base, indent=1))
    write_model_card(ckpt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
