"""Leave-one-source-out (LOSO): how the router, and the baselines, do on query sources they never saw.

    python -m router_model.loso [--folds per-source|reduced] [--steps 1200] [--ablations]
        [--device cuda] [--jobs 8] [--set lr=3e-4 ...] [--out router_model/checkpoint/loso.json]

Each fold removes whole source families from training (and from the dev rows used for early stopping);
up to ``--per-source`` rows of each held-out family (train and dev) are then predicted by models that
never saw it. ``per-source`` holds out one family per fold (every family with ≥ ``--min-rows`` rows); ``reduced``
holds out five at once in two folds (cheap enough for CPUs). The router is retrained per fold with the
shipped checkpoint's recipe (``--set`` overrides it; a distilled recipe first retrains its teacher on the
fold's rows); ``--ablations`` adds the same recipe without augmentation/mixing and from random weights.
tf-idf + LR and MiniLM embeddings + LR are refit per fold.
Router folds run as parallel processes (``--jobs``); results, predictions included, are rewritten after every
finished fold, so an interrupted run still reports the folds it completed, and ``--resume`` continues it: the
same command with ``--resume`` reuses every fold already in ``--out`` (same recipe, folds and sample) and runs
only the rest.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from router_model.conversations import evaluation_conversations
from router_model.eval import DEFAULT_CHECKPOINT, classification, read_jsonl
from router_model.train import DEFAULT_DATA, EXTRA_DATA, RECIPE_KEYS, family, stratified

REDUCED_FOLDS = (
    ("banking77", "conditionalqa", "spider", "gsm8k", "nq_open"),
    ("clinc150", "nl2bash", "legalbench", "hendrycks_math", "oasst"),
)
MIN_FAMILY_ROWS = 100
ROUTER = "functional-token router"
ABLATIONS: dict[str, dict[str, Any]] = {f"{ROUTER}, no augmentation/mixing": {"augment": False, "mix": 0.0},
             f"{ROUTER}, from scratch": {"from_scratch": True}}


def per_source_folds(rows: Sequence[dict[str, Any]], min_rows: int = MIN_FAMILY_ROWS) -> list[tuple[str, ...]]:
    counts = Counter(family(r) for r in rows)
    return [(f,) for f, n in sorted(counts.items()) if n >= min_rows]


def grouped_folds(rows: Sequence[dict[str, Any]], k: int, min_rows: int = MIN_FAMILY_ROWS) -> list[tuple[str, ...]]:
    """Every family (≥ ``min_rows`` rows) held out exactly once, in ``k`` folds: k trainings instead of one per
    family. Families go, largest first, to the fold where the worst-hit label loses the smallest share of its
    rows, so every fold still trains on every label."""
    per_label = Counter(r["label"] for r in rows)
    fam_label: dict[str, Counter[str]] = defaultdict(Counter)
    for r in rows:
        fam_label[family(r)][r["label"]] += 1
    held: list[Counter[str]] = [Counter() for _ in range(k)]
    folds: list[list[str]] = [[] for _ in range(k)]
    for fam in sorted((f for f, c in fam_label.items() if sum(c.values()) >= min_rows),
                      key=lambda f: (-sum(fam_label[f].values()), f)):
        def worst(i: int, fam: str = fam) -> tuple[float, int]:
            return max((held[i][lab] + n) / per_label[lab] for lab, n in fam_label[fam].items()), len(folds[i])
        best = min(range(k), key=worst)
        folds[best].append(fam)
        held[best].update(fam_label[fam])
    return [tuple(f) for f in folds if f]


def recipe(checkpoint: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """train.py's defaults, then the shipped checkpoint's recipe, then ``overrides``."""
    from router_model.train import parser

    ns = vars(parser().parse_args([]))
    metrics = checkpoint / "metrics.json"
    if metrics.exists():
        train = json.loads(metrics.read_text())["train"]
        ns.update({k: train["args"][k] for k in RECIPE_KEYS if k in train["args"]})
        if train["args"].get("teacher"):  # distilled: the teacher must not see the held-out sources either
            if not train.get("teacher_recipe"):
                raise SystemExit(f"{checkpoint} was distilled from a teacher whose recipe is unknown (no metrics.json "
                                 "beside it): LOSO cannot retrain that teacher per fold")
            ns["teacher_recipe"] = train["teacher_recipe"]
    ns.update(overrides)
    return ns


def train_and_predict(ns: dict[str, Any], texts: list[str],
                      conversations: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """One router fold, in a worker process: train with ``ns`` into a temporary folder, then route ``texts``
    (top labels and uncalibrated logits) and ``conversations`` (top labels)."""
    from router_model.conversations import as_messages
    from router_model.router import FunctionalTokenRouter
    from router_model.train import train

    with tempfile.TemporaryDirectory() as tmp:
        if ns.get("teacher_recipe"):  # the fold's own teacher, trained on the fold's rows only
            teacher = f"{tmp}/teacher"
            train(argparse.Namespace(**{**ns, **ns["teacher_recipe"], "teacher": None, "out": teacher}))
            ns = {**ns, "teacher": teacher}
        train(argparse.Namespace(**{**ns, "out": f"{tmp}/router"}))
        router = FunctionalTokenRouter.load(f"{tmp}/router", threads=ns["threads"])
        logits = router.logits(texts)  # the top label is the arg-max whatever the temperature
        return {"labels": [router.labels[i] for i in logits.argmax(-1).tolist()], "logits": logits.tolist(),
                "conversations": [r.top[0] for r in router.route_batch([as_messages(c) for c in conversations])]}


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
            "predicted": dict(Counter(pred)), "per_label_f1": {k: v["f1"] for k, v in m["per_label"].items()},
            "per_label_recall": {k: v["recall"] for k, v in m["per_label"].items()}}


def calibration_report(logits: Sequence[Sequence[float]], gold: Sequence[str], fold_sizes: Sequence[int],
                       labels: Sequence[str]) -> dict[str, Any]:
    """The confidence policy fitted on all held-out rows (what ``train.py --calibration`` ships), and its ECE
    measured honestly: each fold's rows scored with a temperature fitted on the other folds' rows only."""
    import torch

    from router_model.eval import ece
    from router_model.train import fit_policy

    x = torch.tensor(logits)
    policy = fit_policy(x, gold, labels)
    conf: list[float] = []
    correct: list[bool] = []
    start = 0
    for n in fold_sizes:
        rest = [i for i in range(len(gold)) if not start <= i < start + n]
        t = fit_policy(x[rest], [gold[i] for i in rest], labels)["temperature"] if len(fold_sizes) > 1 else 1.0
        probs = torch.softmax(x[start:start + n] / t, -1)
        top = probs.max(-1)
        conf += top.values.tolist()
        correct += [labels[int(i)] == g for i, g in zip(top.indices, gold[start:start + n], strict=True)]
        start += n
    raw = torch.softmax(x, -1).max(-1)
    raw_correct = [labels[int(i)] == g for i, g in zip(raw.indices, gold, strict=True)]
    return {**policy, "ece_cross_fitted": ece(conf, correct), "ece_uncalibrated": ece(raw.values.tolist(), raw_correct)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m router_model.loso", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="whose recipe is retrained per fold")
    ap.add_argument("--out", help="result JSON (default CHECKPOINT/loso.json, which the model card shows)")
    ap.add_argument("--folds", choices=["per-source", "grouped", "reduced"], default="grouped",
                    help="per-source: one fold per family; grouped: every family held out once in --groups folds")
    ap.add_argument("--groups", type=int, default=3, help="grouped: number of folds")
    ap.add_argument("--steps", type=int, default=0, help="router steps per fold (0: the recipe's own)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="recipe overrides, e.g. lr=3e-4")
    ap.add_argument("--ablations", action="store_true", help="also without augmentation, and from scratch")
    ap.add_argument("--no-baselines", dest="baselines", action="store_false")
    ap.add_argument("--per-source", type=int, default=300, help="held-out rows sampled per family")
    ap.add_argument("--conversations", type=int, default=200,
                    help="held-out rows per fold turned into a follow-up and a switch conversation")
    ap.add_argument("--min-rows", type=int, default=MIN_FAMILY_ROWS, help="per-source: smallest family held out")
    ap.add_argument("--embed-train", type=int, default=6000, help="stratified train rows for MiniLM + LR (0: all)")
    ap.add_argument("--device", default="cpu", help="router training device (e.g. cuda)")
    ap.add_argument("--jobs", type=int, default=1, help="router folds trained at once")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads per job")
    ap.add_argument("--deadline", type=float, default=0, help="seconds after which no new fold starts (0: none)")
    ap.add_argument("--resume", action="store_true", help="reuse the folds already in --out, run the rest")
    ap.add_argument("--extra", nargs="*", default=[str(p) for p in EXTRA_DATA if p.exists()],
                    help="more training JSONL, held out by family like the rest (default: router_model/data/*.jsonl; "
                    "none: only the shared routing data)")
    args = ap.parse_args(argv)
    t0 = time.time()
    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else ckpt / "loso.json"
    extra_files = args.extra
    train = read_jsonl(Path(args.data) / "train.jsonl") + [r for f in extra_files for r in read_jsonl(f)
                                                          if "text" in r]
    dev = read_jsonl(Path(args.data) / "dev.jsonl")
    allrows = train + dev
    labels = sorted({r["label"] for r in train})
    folds = (list(REDUCED_FOLDS) if args.folds == "reduced" else per_source_folds(allrows, args.min_rows)
             if args.folds == "per-source" else grouped_folds(allrows, args.groups, args.min_rows))
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in allrows:
        by_family[family(r)].append(r)
    rng = random.Random(0)
    tests = [[r for src in fold for r in rng.sample(by_family[src], min(args.per_source, len(by_family[src])))]
             for fold in folds]
    conversations = [evaluation_conversations(t, seed=k, n=args.conversations) for k, t in enumerate(tests)]

    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    base = recipe(ckpt, {**overrides, "data": args.data, "train": None, "dev": None, "latency_n": 0, "limit": 0,
                         "threads": args.threads, "device": args.device, "quiet": True, "calibration": None,
                         "extra": extra_files})
    if args.steps:
        base["max_steps"] = args.steps
    base["eval_every"] = max(1, base["max_steps"] // 4)
    variants: dict[str, dict[str, Any]] = {ROUTER: {}, **(ABLATIONS if args.ablations else {})}

    preds, routed = _resumed(out, base, folds, args.per_source) if args.resume else ({}, {})
    ctx = mp.get_context("spawn")  # CUDA and torch's thread pools do not survive fork
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        pending: dict[Future[dict[str, Any] | None], tuple[str, int]] = {}
        for k, (fold, test) in enumerate(zip(folds, tests, strict=True)):
            for name, change in variants.items():
                if (name, k) in preds:
                    continue
                ns = {**base, **change, "exclude_sources": list(fold)}
                pending[pool.submit(_deadlined, ns, [r["text"] for r in test], conversations[k], t0,
                                    args.deadline)] = (name, k)
        emb_train = stratified(train, args.embed_train, 0) if args.embed_train else train
        if args.baselines and not all((m, k) in preds for m in _baseline_names(emb_train) for k in range(len(folds))):
            _baselines(preds, train, emb_train, folds, tests)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                key = pending.pop(fut)
                result = fut.result()
                if result is not None:
                    preds[key], routed[key] = result.pop("labels"), result
            if pending:  # what has finished so far, so an interrupted run can be resumed
                _write(out, args, base, variants, folds, tests, conversations, labels, preds, routed, time.time() - t0)
    # also when nothing was left
    _write(out, args, base, variants, folds, tests, conversations, labels, preds, routed, time.time() - t0)
    print(out.read_text())
    return 0


def _deadlined(ns: dict[str, Any], texts: list[str], conversations: Sequence[dict[str, Any]], t0: float,
               deadline: float) -> dict[str, Any] | None:
    if deadline and time.time() - t0 > deadline:
        return None
    return train_and_predict(ns, texts, conversations)


def _resumed(out: Path, base: dict[str, Any], folds: Sequence[tuple[str, ...]], per_source: int
             ) -> tuple[dict[tuple[str, int], list[str]], dict[tuple[str, int], dict[str, Any]]]:
    """The predictions (and router logits / conversation labels) a previous run of the same experiment left in
    ``out`` (none if it was another one)."""
    if not out.exists():
        return {}, {}
    old = json.loads(out.read_text())
    if any(old.get(k) != v for k, v in _experiment(base, folds, per_source).items()):
        raise SystemExit(f"--resume: {out} holds another experiment (recipe, folds or sample differ); "
                         "pass another --out or drop --resume")
    preds = {(model, int(k)): labels.split() for model, by_fold in old.get("predictions", {}).items()
             for k, labels in by_fold.items()}
    routed = {(model, int(k)): v for model, by_fold in old.get("routed", {}).items() for k, v in by_fold.items()}
    return preds, routed


def _experiment(base: dict[str, Any], folds: Sequence[tuple[str, ...]], per_source: int) -> dict[str, Any]:
    """What makes two LOSO runs the same experiment: written into every result, compared by ``--resume``."""
    return {"recipe": {k: base[k] for k in RECIPE_KEYS if k in base}, "teacher_recipe": base.get("teacher_recipe"),
            "planned_folds": [list(f) for f in folds], "per_source_rows": per_source}


def _baseline_names(emb_train: Sequence[dict[str, Any]]) -> list[str]:
    return ["tf-idf + LR", f"MiniLM embeddings + LR ({len(emb_train)} train rows)"]


def _baselines(preds: dict[tuple[str, int], list[str]], train: list[dict[str, Any]], emb_train: list[dict[str, Any]],
               folds: Sequence[tuple[str, ...]], tests: Sequence[list[dict[str, Any]]]) -> None:
    """tf-idf + LR on the fold's train rows, MiniLM embeddings + LR on the fold's share of ``emb_train``."""
    from router_model.baselines import embed_lr, minilm_embeddings, tfidf_lr

    todo = {r["id"]: r["text"] for r in [*emb_train, *(r for t in tests for r in t)]}
    emb = dict(zip(todo, minilm_embeddings(list(todo.values())), strict=True))
    tfidf, minilm = _baseline_names(emb_train)
    for k, (fold, test) in enumerate(zip(folds, tests, strict=True)):
        keep = [r for r in train if family(r) not in fold]
        preds[(tfidf, k)] = tfidf_lr(keep, [test])[0]
        preds[(minilm, k)] = embed_lr(emb, [r for r in emb_train if family(r) not in fold], [test])[0]


def _write(out: Path, args: argparse.Namespace, base: dict[str, Any], variants: dict[str, dict[str, Any]],
           folds: Sequence[tuple[str, ...]], tests: Sequence[list[dict[str, Any]]],
           conversations: Sequence[list[dict[str, Any]]], labels: list[str],
           preds: dict[tuple[str, int], list[str]], routed: dict[tuple[str, int], dict[str, Any]],
           seconds: float) -> None:
    """Summaries over the folds every model has finished (so models are compared on the same rows), and the
    router's held-out logits, which ``train.py --calibration`` fits the confidence policy on."""
    models = sorted(set(variants) | {name for name, _ in preds}, key=lambda n: (n.startswith(ROUTER), n))
    done = [k for k in range(len(folds)) if all((m, k) in preds for m in models)]
    held = [r for k in done for r in tests[k]]
    how = {"per-source": "one source family per fold", "reduced": f"{len(folds[0])} source families at once per fold",
           "grouped": "every family held out once, several families per fold"}[args.folds]
    convs = [c for k in done for c in conversations[k]]
    # Logits are comparable across folds only when every fold's router learnt every label (grouped folds keep
    # every label in training; a per-source fold of a toy corpus may not).
    router_done = all((ROUTER, k) in routed and all(len(x) == len(labels) for x in routed[(ROUTER, k)]["logits"])
                      for k in done)
    gold = [r["label"] for r in held] if router_done else []
    logits = [x for k in done for x in routed[(ROUTER, k)]["logits"]] if router_done else []
    conv_acc: dict[str, dict[str, float]] = {}
    for m in models:
        if not all((m, k) in routed for k in done) or not convs:
            continue
        got = [p for k in done for p in routed[(m, k)]["conversations"]]
        conv_acc[m] = {kind: sum(p == c["label"] for p, c in zip(got, convs, strict=True) if c["kind"] == kind)
                       / max(1, sum(c["kind"] == kind for c in convs)) for kind in ("follow_up", "switch")}
    result = {
        "note": f"{args.folds.capitalize()} LOSO: {len(done)} of {len(folds)} folds, {how} (all its train+dev rows "
                f"held out, up to {args.per_source} sampled per family, also removed from the early-stopping dev "
                "rows). The router is retrained per fold with the recipe below; "
                + ("baselines are refit per fold on the same rows." if args.baselines else
                   "no baselines in this run (--no-baselines).")
                + " Conversations: held-out rows as the earlier turn followed by a generic follow-up (phrasings not "
                "used in training), or as a new question after an exchange about another label.",
        **_experiment(base, folds, args.per_source),
        "variants": variants, "device": args.device,
        "seconds": round(seconds), "folds": [list(folds[k]) for k in done],
        "sources": [s for k in done for s in folds[k]], "n": len(held),
        "models": {m: summary(held, [p for k in done for p in preds[(m, k)]], labels) for m in models} if held else {},
        "conversations": conv_acc, "n_conversations": len(convs),
        "heldout_gold": gold,
        "heldout_logits": logits,
        "calibration": calibration_report(logits, gold, [len(tests[k]) for k in done], labels) if logits else {},
        # what --resume reuses: every fold's predictions (space-separated labels, test order)
        "predictions": {m: {str(k): " ".join(preds[(m, k)]) for k in range(len(folds)) if (m, k) in preds}
                        for m in models},
        "routed": {m: {str(k): routed[(m, k)] for k in range(len(folds)) if (m, k) in routed} for m in models},
    }
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
