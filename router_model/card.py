"""Renders ``MODEL_CARD.md`` from the machine-readable JSON files in a checkpoint directory.

``metrics.json`` (train.py), ``loso.json`` (loso.py: the estimate on unseen sources, which every recipe, data
and calibration decision is made on) and ``bench.json`` (bench.py) are the source of truth; the card is
regenerated whenever one of them changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOSO_COMMAND = "python -m router_model.loso --out router_model/checkpoint/loso.json"
TRAIN_COMMAND = "python -m router_model.train --calibration router_model/checkpoint/loso.json"

LIMITATIONS = [
    "- The leave-families-out estimate holds out several families per fold (5 folds), so each fold trains on ~4/5 of",
    "  the families: one fold per family (`--folds per-source`) would train on more and score a little higher; it",
    "  needs ~20 trainings and was not run on this CPU-only machine.",
    "- Conversations are built from single-turn queries (an earlier query, a reply, a generic follow-up or a new",
    "  question); the real multi-turn data in `router_model/data` covers code (IRC), math (tutoring), finance and",
    "  general (assistant dialogues) only. Follow-up phrasings in the evaluation are disjoint from training's.",
    "- A follow-up that is itself domain-specific but short (\"and for a Roth?\") is routed on the context and the",
    "  turn together; a very long earlier exchange only contributes the heads of its turns (160 characters of a",
    "  user turn, 80 of an answer, within 64 tokens), and the latest turn's first 64 tokens.",
    "- Uncased English word pieces; other languages fall back to whatever MiniLM's vocabulary carries.",
    "- Routing-only: the rewrite head is trained only when rows carry a `rewrite` field (the data has none).",
]


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _f(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _loso_section(loso: dict[str, Any], args: dict[str, Any]) -> list[str]:
    differs = [k for k, v in loso.get("recipe", {}).items() if k in args and args[k] != v and k != "extra"]
    lines = ["## Unseen sources (leave-families-out: the figures decisions are made on)", loso.get("note", ""),
             *([loso["data_note"]] if loso.get("data_note") else []), "",
             f"Recipe per fold: `{json.dumps({k: v for k, v in loso.get('recipe', {}).items() if k != 'extra'})}`"
             + (f". **Not the shipped recipe**: it differs in {', '.join(differs)}." if differs else
                " (the shipped recipe)."), "",
             "| model | pooled macro-F1 | accuracy | mean per-family accuracy | "
             + " | ".join(f"{lab} recall" for lab in next(iter(loso["models"].values()))["per_label_recall"]) + " |",
             "|---|---|---|---|" + "---|" * len(next(iter(loso["models"].values()))["per_label_recall"])]
    for model, r in loso["models"].items():
        lines.append(f"| {model} | {r['pooled_macro_f1']:.4f} | {r['pooled_accuracy']:.4f} | "
                     f"{r['mean_source_accuracy']:.4f} | "
                     + " | ".join(f"{v:.3f}" for v in r["per_label_recall"].values()) + " |")
    router = loso["models"].get("functional-token router")
    if router:
        lines += ["", "Per held-out family (router accuracy): "
                  + ", ".join(f"{s} {router['per_source'][s]:.3f}" for s in loso["sources"]) + "."]
    convs = loso.get("conversations", {})
    if convs:
        lines += ["", f"Conversations built from held-out rows ({loso.get('n_conversations')} in all), top-1: the "
                  "conversation's expert after a generic follow-up / the new domain after a self-contained question "
                  "about another one: " + "; ".join(f"{m} **{c['follow_up']:.3f}** / **{c['switch']:.3f}**"
                                                     for m, c in convs.items()) + "."]
    cal = loso.get("calibration")
    if cal:
        lines += ["", f"Calibration fitted on these held-out logits: temperature {cal['temperature']:.3f}, tau "
                  f"{cal['tau']}, mass {cal['mass']}; ECE on held-out families {cal['ece_uncalibrated']:.4f} "
                  f"uncalibrated, {cal['ece_cross_fitted']:.4f} with a temperature fitted on the other folds only."]
    return lines


def write_model_card(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    m = _load(ckpt / "metrics.json") or {}
    dev, tr = m.get("dev", {}), m.get("train", {})
    args = tr.get("args", {})
    where = tr.get("trained_on") or f"{args.get('threads')} CPU threads"
    conv = m.get("dev_conversations", {})
    lines = [
        "# Octoroute router — functional-token model",
        "",
        f"Routes a conversation to one of {len(cfg['labels'])} experts ({', '.join(cfg['labels'])}) with one forward",
        "pass: the next-token distribution at the answer position restricted to the functional tokens",
        f"`<nexa_0>` … `<nexa_{len(cfg['labels']) - 1}>` (Octopus v2/v4), temperature-calibrated on "
        f"{cfg.get('calibrated_on', 'dev')}.",
        "",
        "## Model",
        f"- Architecture: `{cfg['arch']}`"
        + (f", {cfg['model']['n_layer']} causal blocks warm-started from all-MiniLM-L6-v2 "
           f"(d={cfg['model']['d_model']}), LM head tied to the embeddings" if cfg["arch"] == "native" else
           f", base `{cfg.get('base')}`"),
        (f"- Parameters: {tr.get('params', '?'):,}; stored fp16, served `{cfg.get('precision', 'fp32')}` (here: "
         f"{m.get('served_precision', '?')}; int8 is dynamic with per-channel weight scales); checkpoint "
         f"{m.get('checkpoint_bytes', 0) / 1e6:.1f} MB") if tr else "",
        f"- Prompt: prefix ids {cfg['prefix_ids']} + [earlier conversation, ≤ {cfg.get('context_len', 0)} tokens: the "
        "system prompt and earlier turns as `role: head of the turn` lines, truncated from the left, then separator "
        f"ids {cfg.get('sep_ids', [])}] + the latest user turn (its first tokens, ≤ {cfg['max_len']} with prefix and "
        f"suffix) + suffix ids {cfg['suffix_ids']}; target `<nexa_i><nexa_end>` or `<nexa_i>('rewrite')<nexa_end>`. "
        "How many earlier turns the gateway passes is `router.history_turns`.",
        f"- Confidence policy: temperature {cfg['temperature']:.3f}, one expert when the top probability reaches tau "
        f"{cfg['tau']}, else the smallest set with mass {cfg['mass']} (fused); fitted on "
        f"{cfg.get('calibrated_on', 'dev')}.",
        "",
        "## Data",
        "`shared/data/routing` (public sources relabelled into 5 classes, see its README) plus this repo's "
        "`router_model/data` (more public sources in other formats, and real conversations; see its README). "
        f"Train rows: {tr.get('rows')} {tr.get('per_label')}. Dev (shared, {dev.get('n')} rows) is not used to "
        "choose anything: the last weights are kept and the confidence policy is fitted on held-out families.",
        "",
        "## Reproduce",
        f"`{LOSO_COMMAND}` (the estimate below and the held-out logits), then `{TRAIN_COMMAND}` (seed "
        f"{args.get('seed')}; add `--device cuda` on a GPU), then `python -m router_model.bench`. The shipped "
        f"checkpoint was trained on {where} in {tr.get('seconds')} s: {tr.get('steps')} steps, batch "
        f"{args.get('batch_size')}, lr {args.get('lr')}, frozen word embeddings {args.get('freeze_embeddings')}, "
        f"augmentation {args.get('augment')}, conversations: follow-ups {args.get('follow')}, switches "
        f"{args.get('mix')}, class-weighted loss.",
        "",
    ]
    loso = _load(ckpt / "loso.json")
    if loso and loso.get("models"):
        lines += [*_loso_section(loso, args), ""]
    lines += [
        "## Dev (in-distribution: the same sources as training, so optimistic)",
        "| accuracy | macro-F1 | ECE | correct / n | follow-up conversations | switch conversations |",
        "|---|---|---|---|---|---|",
        f"| {_f(dev.get('accuracy'))} | {_f(dev.get('macro_f1'))} | {_f(dev.get('ece'))} | "
        f"{dev.get('correct')} / {dev.get('n')} | {_f(conv.get('follow_up'))} | {_f(conv.get('switch'))} |",
        "",
        "Confusion (rows gold, columns predicted): " + json.dumps(dev.get("confusion")),
    ]
    bench = _load(ckpt / "bench.json")
    if bench:
        lines += ["", "## Latency (`python -m router_model.bench`)", "```", json.dumps(bench, indent=1), "```"]
    lines += ["", "## Limitations", *LIMITATIONS]
    (ckpt / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
