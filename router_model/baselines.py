"""Baselines the router is compared with, on the same held-out rows in the same run (``router_model.loso``):
tf-idf + logistic regression, and MiniLM sentence embeddings + LR.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from router_model.model import minilm_path, quantize_int8


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
