"""Renders ``MODEL_CARD.md`` from the machine-readable JSON files in a checkpoint directory.

``metrics.json`` (train.py), ``baselines.json`` (baselines.py), ``loso*.json`` (loso.py), ``ablation.json``
(recipe variants, see its note) and ``bench.json`` (bench.py) are the source of truth; the card is regenerated
whenever one of them changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPRODUCE = "python -m router_model.train --out router_model/checkpoint"


def reproduce(train: dict[str, Any]) -> str:
    """The command line that rebuilds the checkpoint: a distilled one needs its teacher trained first."""
    teacher = train.get("teacher_recipe")
    if not teacher:
        return REPRODUCE
    return (f"python -m router_model.train --layers {teacher['layers']} --out /tmp/teacher && "
            f"{REPRODUCE} --teacher /tmp/teacher")


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _f(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


# Measured while choosing the depth: BertModel (first line) and router_model.bench on both trained checkpoints.
DEPTH_NOTE = (
    "- Depth: all-MiniLM-L6-v2 at 64 tokens, 1 thread, batch 1: 6 blocks 18.6 / 5.1 ms (fp32 / int8), 3 blocks "
    "9.5 / 2.5 ms, 2 blocks 6.6 / 1.6 ms (an early session's VM). Trained routers, same bench run on a 2-core AMD "
    "EPYC (Zen 4) VM, int8: 3 blocks 3.84 ms batch-1 p50 and 522 queries/s batched (64 tokens), 4 blocks 4.86 ms "
    "and 357 queries/s. 4 blocks scored 0.9827 dev macro-F1 against 0.9780 for 3, and the same on held-out sources "
    "(reduced LOSO 0.8525 vs 0.8546); 3 blocks are shipped because they meet the latency and throughput targets there "
    "(4 blocks miss the throughput one). Distilling the 4-block model into 3 blocks (the shipped recipe, `distil3` "
    "below) closes the dev gap: 0.9827 int8, as the teacher. (Those int8 dev figures were measured with batched "
    "forward passes, whose activation scales depend on the batch; int8 now routes each query alone, reproducibly, "
    "and the shipped model scores 0.9813 that way: see Dev above.)")
# Measured by hand on earlier runs of this recipe while developing it (same dev set, int8 served).
DEV_NOTES = [
    "- int8 weight scales: per-tensor 0.9539 vs per-channel 0.9640 dev macro-F1 (600-step model; fp32 0.9626), "
    "same latency: per-channel is what int8 serving uses.",
    "- Mixing (an unrelated earlier turn before a share of training rows): with mix 0.1 / 600 steps, dev accuracy "
    "after an unrelated turn was 0.939 vs 0.964 without context; mix 0.3 is shipped (see the table for 0.0).",
]
LIMITATIONS = [
    "- Most remaining dev errors are ConditionalQA legal/finance (labels come from the gov.uk page, so",
    "  employment-pay and tax-appeal questions sit on the border) and MMLU legal/general/finance.",
    "- Unseen sources (LOSO) stay well below dev: SQL questions with a pasted schema (Spider), lay UK legal/finance",
    "  scenarios (ConditionalQA), assistant commands (CLINC150) and open chat prompts (OASST) are the weakest",
    "  held-out families. LOSO here is reduced (2 folds x 5 families); `python -m router_model.loso` runs the",
    "  per-source sweep (20 folds), which needs a GPU to finish in reasonable time and has not been run yet.",
    "- From random weights the same 3-block recipe reaches 0.7275 on unseen sources (reduced LOSO,",
    "  `loso_scratch.json`) against 0.8546 warm-started from MiniLM (`loso.json`, same rows): the warm start buys",
    "  12.7 points there, most on ConditionalQA, GSM8K and Banking77; from scratch falls below MiniLM embeddings and",
    "  LR (0.7517). One seed; the from-scratch folds were predicted one int8 pass per query, `loso.json` with",
    "  batched int8 passes.",
    "- The no-augmentation ablation was measured on dev only, not on held-out sources.",
    "- The distilled (shipped) recipe is 1.3 points below the recipe before it on held-out sources (reduced LOSO",
    "  0.8417 vs 0.8546, `loso_distilled.json` vs `loso.json`, same rows), mostly Spider (0.543 vs 0.697): dev",
    "  gained 0.5 points, unseen sources lost some. One seed per recipe; per-family swings of this size occur between",
    "  runs. A distilled fold retrains its teacher first: about 75 min per fold on a 2-core Zen 4 VM.",
    "- The shipped recipe was chosen among three 3-block variants (`distil3`, `distil3_es`, `layers3_4500`) by dev",
    "  macro-F1, one seed each; the margin over the 0.98 target is 2 rows in int8 (one pass per query; 4 when int8",
    "  was batched), 1 in bf16, 0 in fp32 (0.9800).",
    "- Reproducing needs the teacher trained first (about as long again as the student on a CPU).",
    "- Latency depends on the host: a Sapphire Rapids VM (AMX) routes batches fastest in bf16, a Zen 4 VM in int8,",
    "  and the same model's int8 batch-1 p50 differed 5x between this repo's 2-core VMs (1.4 ms on Zen 5, 7.1 ms on",
    "  Cascade Lake, both traced): the latency and throughput targets are met on the AMD VMs, missed on Intel ones.",
    "- Terse imperative calculus ('Integrate x^2 from 0 to 3.', 'integrate e^x cos x dx') goes to code or general",
    "  with this and the two previous checkpoints; short 'Solve ... for x' algebra gets 0.6-0.8 math with code second,",
    "  under tau, so the gateway fuses math and code for it (top-1 stays math).",
    "- Only the first 64 tokens of the latest turn are read: a question placed after a long pasted context is cut.",
    "- Uncased English word pieces; other languages fall back to whatever MiniLM's vocabulary carries.",
    "- Routing-only: the rewrite head is trained only when rows carry a `rewrite` field (the shared data has none).",
]


def _ablation(m: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    out = [DEPTH_NOTE, *DEV_NOTES]
    if base:
        q = {k: v["macro_f1"] for k, v in base.items() if k.startswith("functional-token router")}
        out.append("- Serving precision (dev macro-F1): "
                   + ", ".join(f"{k}: {v:.4f}" for k, v in q.items()))
    out.append(f"- Temperature scaling: dev NLL {_f(m.get('uncalibrated_dev_nll'))} → "
               f"{_f(m.get('calibrated_dev_nll'))}, ECE after: {_f(m.get('dev', {}).get('ece'))}.")
    return out


def _variants(abl: dict[str, Any]) -> list[str]:
    rows = ["", abl.get("note", ""), "",
            "| variant | train flags | dev macro-F1 | dev accuracy after an unrelated turn | best step | "
            "reduced LOSO macro-F1 |", "|---|---|---|---|---|---|"]
    for name, v in abl["variants"].items():
        loso = v.get("reduced_loso_pooled_macro_f1")
        rows.append(f"| {name} | `{v['flags']}` | {v['dev_macro_f1']:.4f} | "
                    f"{v['dev_after_unrelated_turn_accuracy']:.4f} | {v['best_step']} | "
                    f"{'not run' if loso is None else f'{loso:.4f}'} |")
    return rows


def write_model_card(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    m = _load(ckpt / "metrics.json") or {}
    dev, tr = m.get("dev", {}), m.get("train", {})
    args = tr.get("args", {})
    where = tr.get("trained_on") or f"{args.get('threads')} CPU threads"
    lines = [
        "# Octoroute router — functional-token model",
        "",
        f"Routes a conversation to one of {len(cfg['labels'])} experts ({', '.join(cfg['labels'])}) with one forward",
        "pass: the next-token distribution at the answer position restricted to the functional tokens",
        f"`<nexa_0>` … `<nexa_{len(cfg['labels']) - 1}>` (Octopus v2/v4), temperature-calibrated on dev.",
        "",
        "## Model",
        f"- Architecture: `{cfg['arch']}`"
        + (f", {cfg['model']['n_layer']} causal blocks warm-started from all-MiniLM-L6-v2 "
           f"(d={cfg['model']['d_model']}), LM head tied to the embeddings" if cfg["arch"] == "native" else
           f", base `{cfg.get('base')}`"),
        f"- Parameters: {tr.get('params', '?'):,}; stored fp16"
        + f", served `{cfg.get('precision', 'fp32')}` (here: {m.get('served_precision', '?')}; int8 is dynamic with "
        "per-channel weight scales)"
        + f"; checkpoint {m.get('checkpoint_bytes', 0) / 1e6:.1f} MB" if tr else "",
        f"- Prompt: prefix ids {cfg['prefix_ids']} + query (≤ {cfg['max_len']} tokens in all, latest user turn "
        f"kept from its start, up to {cfg['max_turns']} earlier turns truncated from the left) + suffix ids "
        f"{cfg['suffix_ids']}; target `<nexa_i><nexa_end>` or `<nexa_i>('rewrite')<nexa_end>`.",
        f"- Calibration (dev): temperature {cfg['temperature']:.3f}, tau {cfg['tau']}, mass {cfg['mass']}.",
        "",
        "## Data",
        "`shared/data/routing` (see its README: public sources relabelled into 5 classes). "
        f"Train rows: {tr.get('rows')} {tr.get('per_label')}; dev: {dev.get('n')} (300 per label).",
        ("Dev only calibrates (temperature, tau, mass): the last weights are kept, so dev figures are not chosen on "
         "dev; the" if args.get("patience") == 0 else
         "Dev is used for early stopping and calibration, so dev figures are slightly optimistic; the"),
        "leave-one-source-out figures below are the honest estimate for unseen query styles.",
        "",
        "## Reproduce",
        f"`{reproduce(tr)}` (seed {args.get('seed')}; add `--device cuda` on a GPU). The shipped checkpoint was "
        f"trained on {where} in {tr.get('seconds')} s. "
        + (f"Its teacher: {tr['teacher_from']}. " if tr.get("teacher_from") else "") +
        "Then `python -m router_model.baselines`, `python -m router_model.loso --folds reduced` and "
        "`python -m router_model.bench` add the comparison, held-out-source and latency sections.",
        f"Training: {tr.get('steps')} steps (kept: {tr.get('best_step')}; "
        f"{'the last, no early stopping' if args.get('patience') == 0 else 'best on dev'}), batch "
        f"{args.get('batch_size')}, lr {args.get('lr')}, augmentation {args.get('augment')} (mix {args.get('mix')}), "
        f"class-weighted loss, frozen word embeddings {args.get('freeze_embeddings')}"
        + (f"; distilled from a {tr['teacher_recipe']['layers']}-block teacher trained on the same rows (loss "
           f"{1 - args['kd_alpha']:.2f} x cross-entropy + {args['kd_alpha']:.2f} x KL to the teacher's expert "
           f"distribution at temperature {tr['kd_temperature']:g})." if tr.get("teacher_recipe") else "."),
        "",
        "## Dev results (the shipped checkpoint, as served)",
        "| accuracy | macro-F1 | ECE | correct / n | batch-1 p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
        f"| {_f(dev.get('accuracy'))} | {_f(dev.get('macro_f1'))} | {_f(dev.get('ece'))} | "
        f"{dev.get('correct')} / {dev.get('n')} | {_f(dev.get('p50_ms'))} | {_f(dev.get('p99_ms'))} |",
        "",
        "| label | precision | recall | F1 |",
        "|---|---|---|---|",
        *[f"| {lab} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} |"
          for lab, s in dev.get("per_label", {}).items()],
        "",
        "Confusion (rows gold, columns predicted): " + json.dumps(dev.get("confusion")),
        "",
        f"Expert sets on dev (tau {cfg['tau']}, mass {cfg['mass']}): {json.dumps(m.get('experts_on_dev'))}; "
        f"NLL {_f(m.get('uncalibrated_dev_nll'))} → {_f(m.get('calibrated_dev_nll'))} after temperature scaling.",
        "",
        f"Conversations: dev accuracy when each query follows an exchange about another label "
        f"(max_turns {cfg['max_turns']}): {_f(m.get('dev_after_unrelated_turn_accuracy'))}.",
    ]
    base = _load(ckpt / "baselines.json")
    if base:
        lines += ["", "## Baselines (same data, same run)", "| model | dev macro-F1 | dev accuracy |", "|---|---|---|",
                  *[f"| {k} | {v['macro_f1']:.4f} | {v['accuracy']:.4f} |" for k, v in base.items()]]
    losos = [(p.name, json.loads(p.read_text())) for p in sorted(ckpt.glob("loso*.json"))]
    if losos:
        lines += ["", "## Leave-one-source-out (held-out source families)"]
    for name, loso in losos:
        differs = [k for k, v in loso.get("recipe", {}).items() if k in args and args[k] != v]
        distilled = bool(loso.get("teacher_recipe"))
        if distilled != bool(tr.get("teacher_recipe")):
            differs.append("teacher")
        lines += ["", f"### `{name}`", loso.get("note", ""), "",
                  f"Router recipe per fold: `{json.dumps(loso.get('recipe', {}))}`"
                  + (f", teacher per fold: `{json.dumps(loso['teacher_recipe'])}`" if distilled else "")
                  + (f". **Not the shipped recipe**: it differs in {', '.join(differs)}." if differs else "."), "",
                  "| model | pooled macro-F1 | mean per-source accuracy | " + " | ".join(loso["sources"]) + " |",
                  "|---|---|---|" + "---|" * len(loso["sources"])]
        for model, r in loso["models"].items():
            lines.append(f"| {model} | {r['pooled_macro_f1']:.4f} | {r['mean_source_accuracy']:.4f} | "
                         + " | ".join(f"{r['per_source'][s]:.3f}" for s in loso["sources"]) + " |")
    bench = _load(ckpt / "bench.json")
    if bench:
        lines += ["", "## Latency (router_model/bench.py)", "```", json.dumps(bench, indent=1), "```"]
    lines += ["", "## Ablation", *_ablation(m, base)]
    abl = _load(ckpt / "ablation.json")
    if abl:
        lines += _variants(abl)
    lines += ["", "## Limitations", *LIMITATIONS]
    (ckpt / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
