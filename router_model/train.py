"""Train the functional-token router (Octopus v2/v4 recipe) and write a self-describing checkpoint.

The shipped checkpoint is a 3-block model distilled from a 4-block one::

    python -m router_model.train --layers 4 --out /tmp/teacher
    python -m router_model.train --teacher /tmp/teacher --out router_model/checkpoint

Labels come from the data (a sixth expert is new rows + a retrain), one functional token per label plus
``<nexa_end>``; the loss is on the target tokens only. ``--base PATH`` applies the same recipe to any local
Hugging Face causal LM (tokens added, embeddings resized).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from router_model.card import write_model_card
from router_model.conversations import (
    SYSTEM_PROMPTS,
    TRAIN_FOLLOW_UPS,
    as_messages,
    by_label,
    evaluation_conversations,
    follow_up,
    switch,
)
from router_model.eval import classification, evaluate, read_jsonl
from router_model.interface import Message, select_experts
from router_model.model import (
    END_TOKEN,
    FUNCTIONAL_TOKEN,
    CausalLM,
    HFCausalLM,
    ModelConfig,
    init_rows,
    load_minilm,
    logits_for,
    minilm_path,
    param_count,
)
from router_model.router import (
    PRECISIONS,
    Codec,
    FunctionalTokenRouter,
    codec_from_config,
    fit_temperature,
    split_conversation,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/routing"
# Sources added by this repo (router_model/data/README.md): single-turn queries and real conversations.
EXTRA_DATA = tuple(Path(__file__).resolve().parent / "data" / f for f in ("extra_train.jsonl", "conversations.jsonl"))

# Label-neutral chat phrasings: real users wrap questions like this, the training sources rarely do.
WRAPPERS = (
    "Can you help me with this? {q}", "{q} Please explain.", "Quick question: {q}", "hi! {q}",
    "I need some help. {q}", "{q}\nThanks in advance!", "Question: {q}\nAnswer:", "Please answer this: {q}",
    "{q} Be concise.", "Someone asked me this and I'm not sure: {q}", "{q} Explain step by step.",
    "hey, quick one - {q}", "I have a question. {q}", "{q} What do you think?",
)
# Source families built on another family's items: held out together with it, or LOSO would leak it.
SAME_FAMILY = {"sgd_dialogue": "sgd", "mathdial": "gsm8k"}


def family(row: dict[str, Any]) -> str:
    """A row's source family (``source`` up to the first ``/``), the unit leave-one-source-out holds out."""
    fam = str(row.get("source", "")).split("/")[0]
    return SAME_FAMILY.get(fam, fam)


# What defines a recipe (train.py flags), as LOSO retrains it per fold.
RECIPE_KEYS = ("layers", "max_len", "context_len", "max_turns", "follow", "batch_size", "lr", "freeze_blocks",
               "freeze_embeddings", "augment", "mix", "dropout", "weight_decay", "seed", "max_steps", "from_scratch",
               "kd_alpha", "patience", "extra", "family_balance")
OPTIONS = re.compile(r"\n\s*(?:A\.|\(A\)|A\)).*", re.DOTALL)


def augment(text: str, rng: random.Random) -> str:
    """Format noise so the router learns the domain, not the source's format (see data README caveats)."""
    if rng.random() < 0.5:
        text = OPTIONS.sub("", text).strip() or text  # MMLU/AGIEval answer options
    if "\n\n" in text and rng.random() < 0.3:
        text = text.split("\n\n")[0]  # drop the pasted context: schema, table, options, input
    words = text.split(" ")
    if len(words) > 8 and rng.random() < 0.15:
        text = " ".join(words[: max(5, int(len(words) * rng.uniform(0.4, 0.9)))])
    if rng.random() < 0.1:
        text = text.rstrip("?.! ")
    if rng.random() < 0.1:
        text = " ".join(text.split())
    if rng.random() < 0.3:
        text = rng.choice(WRAPPERS).format(q=text)
    r = rng.random()
    return text.lower() if r < 0.1 else text.upper() if r < 0.13 else text


def build_lm(args: argparse.Namespace, labels: list[str]) -> tuple[Any, Any, dict[str, Any]]:
    """The model, its tokenizer with functional tokens added, and the checkpoint config fields they fix."""
    new_tokens = [FUNCTIONAL_TOKEN.format(i) for i in range(len(labels))] + [END_TOKEN]
    names = [*labels, "end"]
    lm: Any
    if args.base is None:
        tok = AutoTokenizer.from_pretrained(str(minilm_path()))
        n_orig = len(tok)
        tok.add_tokens(new_tokens, special_tokens=True)
        from safetensors import safe_open

        with safe_open(str(minilm_path() / "model.safetensors"), "pt") as f:
            emb = f.get_tensor("embeddings.word_embeddings.weight")
        pieces = [tok(n, add_special_tokens=False)["input_ids"] for n in names]
        if args.from_scratch:  # ablation: same tokenizer and shape, random weights (BERT's init)
            lm = CausalLM(ModelConfig(vocab_size=len(tok), n_layer=args.layers, dropout=args.dropout))
            for mod in lm.modules():
                if isinstance(mod, nn.Linear | nn.Embedding):
                    nn.init.normal_(mod.weight, std=0.02)
                if isinstance(mod, nn.Linear):
                    nn.init.zeros_(mod.bias)
        else:
            lm = load_minilm(args.layers, init_rows(emb, pieces), dropout=args.dropout)
        fields = {"arch": "native", "model": lm.cfg.to_dict(), "prefix_ids": [tok.cls_token_id],
                  "suffix_ids": [tok.sep_token_id], "sep_ids": [tok.sep_token_id], "pad_id": tok.pad_token_id,
                  "n_orig_vocab": n_orig}
    else:
        tok = AutoTokenizer.from_pretrained(args.base)
        hf: Any = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
        n_orig = len(tok)
        tok.add_tokens(new_tokens, special_tokens=True)
        hf.resize_token_embeddings(len(tok))
        pieces = [tok(n, add_special_tokens=False)["input_ids"] for n in names]
        with torch.no_grad():
            emb = hf.get_input_embeddings().weight
            emb[n_orig:] = init_rows(emb[:n_orig], pieces)
            out = hf.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != emb.data_ptr():
                out.weight[n_orig:] = init_rows(out.weight[:n_orig], pieces)
        lm = HFCausalLM(hf)
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        fields = {"arch": "hf", "base": str(args.base),
                  "prefix_ids": bos + tok("Query: ", add_special_tokens=False)["input_ids"],
                  "suffix_ids": tok("\nResponse:", add_special_tokens=False)["input_ids"],
                  "sep_ids": tok("\nQuery: ", add_special_tokens=False)["input_ids"],
                  "pad_id": pad, "n_orig_vocab": n_orig}
    fields["functional_token_ids"] = tok.convert_tokens_to_ids(new_tokens[:-1])
    fields["end_token_id"] = tok.convert_tokens_to_ids(END_TOKEN)
    return lm, tok, fields


def batches(lengths: Sequence[int], size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length (less padding, same expected gradient)."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    out: list[list[int]] = []
    for s in range(0, len(idx), size * 50):
        pool = sorted(idx[s : s + size * 50], key=lengths.__getitem__)
        out += [pool[i : i + size] for i in range(0, len(pool), size)]
    rng.shuffle(out)
    return out


def family_weights(rows: Sequence[dict[str, Any]], alpha: float) -> list[float]:
    """Per-row sampling weight ``n_family ** (alpha - 1)``: 1 keeps the data as it is, 0 draws every source
    family equally often. A few big sources (GSM8K, TAT-QA, MMLU) otherwise teach their format as the label."""
    sizes = Counter(family(r) for r in rows)
    return [sizes[family(r)] ** (alpha - 1) for r in rows]


def training_conversation(row: dict[str, Any], groups: dict[str, list[dict[str, Any]]],
                          others: dict[str, list[dict[str, Any]]], rng: random.Random, mix: float = 0.3,
                          follow: float = 0.2) -> list[Message]:
    """``row`` (already augmented) as the turn to route, or inside a conversation whose answer is still its label.

    A share ``mix`` follows an exchange about another domain (*switch*: the latest turn decides), a share
    ``follow`` is asked first and followed by one or two generic follow-ups (*follow-up*: the conversation's
    domain decides), and a few follow an exchange in their own domain; a fifth of those conversations open with
    a generic system prompt. Training on both cases is what makes the router read the context without being
    ruled by it (training on switches alone taught it to ignore the context).
    """
    msgs = [Message("user", row["text"])]
    u = rng.random()
    if u < follow:
        msgs = follow_up(row, groups[row["label"]], TRAIN_FOLLOW_UPS, rng, rng.choice((1, 1, 2)))
    elif u < follow + mix and others[row["label"]]:
        earlier = rng.choice(others[row["label"]])
        msgs = switch(row, earlier, groups[earlier["label"]], rng)
    elif u < follow + mix + 0.05:
        msgs = switch(row, rng.choice(groups[row["label"]]), groups[row["label"]], rng)
    if len(msgs) > 1 and rng.random() < 0.2:
        msgs = [Message("system", rng.choice(SYSTEM_PROMPTS)), *msgs]
    return msgs


def make_examples(rows: Sequence[dict[str, Any]], codec: Codec, label_idx: dict[str, int],
                  rng: random.Random | None, mix: float = 0.3, follow: float = 0.2,
                  max_turns: int = 4) -> list[tuple[list[int], int]]:
    """(prompt + target ids, prompt length) per row; with ``rng``, augmented and in training conversations
    (``training_conversation``). Rows with ``messages`` (real conversations) are used as they are."""
    single = [r for r in rows if "text" in r]
    groups = by_label(single)
    others = {lab: [r for r in single if r["label"] != lab] for lab in groups}
    parts: list[tuple[str, str]] = []
    for r in rows:
        if "messages" in r:
            msgs = as_messages(r)
        elif rng:
            msgs = training_conversation({**r, "text": augment(r["text"], rng)}, groups, others, rng, mix, follow)
        else:
            msgs = [Message("user", r["text"])]
        parts.append(split_conversation(msgs, max_turns))
    prompts = codec.prompts([q for q, _ in parts], [c for _, c in parts])
    return [(p + codec.target(label_idx[r["label"]], r.get("rewrite")), len(p))
            for p, r in zip(prompts, rows, strict=True)]


KD_TEMPERATURE = 2.0


def step_loss(lm: Any, codec: Codec, batch: list[tuple[list[int], int]], weights: torch.Tensor,
              device: torch.device, teacher: Any = None, kd_alpha: float = 0.0) -> torch.Tensor:
    """Class-weighted cross-entropy over the full vocabulary, on target tokens only.

    With a ``teacher``, ``kd_alpha`` of the loss is instead the KL divergence from the teacher's expert
    distribution at the functional-token position (Hinton et al., temperature ``KD_TEMPERATURE``): soft
    targets carry what the teacher learnt about borderline queries, which hard labels cannot.
    """
    ids, mask = (t.to(device) for t in codec.pad([s for s, _ in batch]))
    h = lm.hidden(ids, mask)
    rows, cols, tgt, w = [], [], [], []
    for b, (seq, n_prompt) in enumerate(batch):
        for t in range(n_prompt - 1, len(seq) - 1):
            rows.append(b)
            cols.append(t)
            tgt.append(seq[t + 1])
            w.append(float(weights[b]))
    logits = logits_for(lm, h[rows, cols])
    ce = nn.functional.cross_entropy(logits.float(), torch.tensor(tgt, device=device), reduction="none")
    wt = torch.tensor(w, device=device)
    loss = (ce * wt).sum() / wt.sum()
    if teacher is None:
        return loss
    expert_ids = torch.tensor(codec.fn_ids, device=device)
    first = torch.arange(len(batch), device=device), torch.tensor([n - 1 for _, n in batch], device=device)
    with torch.no_grad():
        soft = torch.log_softmax(logits_for(teacher, teacher.hidden(ids, mask)[first], expert_ids).float()
                                 / KD_TEMPERATURE, -1)
    student = torch.log_softmax(logits_for(lm, h[first], expert_ids).float() / KD_TEMPERATURE, -1)
    kl = nn.functional.kl_div(student, soft, log_target=True, reduction="none").sum(-1)
    bw = weights.to(device)
    kd = (kl * bw).sum() / bw.sum() * KD_TEMPERATURE**2
    return (1 - kd_alpha) * loss + kd_alpha * kd


def load_teacher(path: str, cfg: dict[str, Any], device: torch.device, threads: int) -> Any:
    """A trained checkpoint's model, fp32, checked to read the same prompts and emit the same expert tokens."""
    teacher = FunctionalTokenRouter.load(path, threads=threads, precision="fp32")
    same = ("labels", "prefix_ids", "suffix_ids", "functional_token_ids", "max_len", "context_len")
    wrong = [k for k in same if teacher.config.get(k) != cfg.get(k)]
    if wrong:
        raise SystemExit(f"--teacher {path}: its {', '.join(wrong)} differ from this run's; distil only from a "
                         "checkpoint trained on the same labels with the same tokenizer and prompt settings")
    lm: Any = teacher.lm
    return lm.to(device).eval().requires_grad_(False)


def stratified(rows: Sequence[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """About ``n`` rows with every label equally represented: cheap, unbiased early-stopping checks."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    rng = random.Random(seed)
    k = max(1, n // max(1, len(by)))
    return [r for lab in sorted(by) for r in rng.sample(by[lab], min(k, len(by[lab])))]


def macro_f1(router: FunctionalTokenRouter, rows: Sequence[dict[str, Any]]) -> float:
    pred = router.logits([r["text"] for r in rows]).argmax(-1).tolist()
    return float(classification([r["label"] for r in rows], [router.labels[p] for p in pred],
                                router.labels)["macro_f1"])


# What the confidence policy is fitted to (on held-out sources): a single expert answers when its decisions are
# this precise; otherwise the fused set holds the right expert this often. Stricter targets fuse far more on
# unseen sources (precision 0.99 fused 98 % of held-out rows, 4 experts each; see docs/router.md).
SINGLE_PRECISION = 0.95
SET_COVERAGE = 0.95


def calibrate_thresholds(probs: list[dict[str, float]], gold: Sequence[str], precision: float = SINGLE_PRECISION,
                         coverage: float = SET_COVERAGE) -> tuple[float, float]:
    """tau: the lowest top-probability whose single-expert decisions are ``precision`` right on dev;
    mass: the lowest cumulative mass whose expert sets contain the gold label ``coverage`` of the time on the
    rows under tau, the only rows the set rule decides (confidently wrong rows above tau would otherwise
    cap coverage below the target and push mass to its 0.999 fallback: every expert fused whenever unsure)."""
    grid = [round(0.5 + i / 100, 2) for i in range(50)]
    tau = grid[-1]
    for t in grid:
        single = [max(p, key=p.__getitem__) == g for p, g in zip(probs, gold, strict=True) if max(p.values()) >= t]
        if single and sum(single) / len(single) >= precision:
            tau = t
            break
    unsure = [(p, g) for p, g in zip(probs, gold, strict=True) if max(p.values()) < tau]
    mass = 0.999
    for m in grid:
        hits = [g in select_experts(p, tau, m) for p, g in unsure]
        if hits and sum(hits) / len(hits) >= coverage:
            mass = m
            break
    return tau, mass


def expert_counts(probs: list[dict[str, float]], gold: Sequence[str], tau: float, mass: float) -> dict[str, float]:
    sets = [select_experts(p, tau, mass) for p in probs]
    n = len(sets)
    multi = [len(s) for s in sets if len(s) > 1]
    return {
        "single": sum(len(s) == 1 for s in sets) / n,
        "multi": len(multi) / n,
        "mean_experts": sum(map(len, sets)) / n,
        "mean_experts_when_multi": sum(multi) / len(multi) if multi else 0.0,
        "set_contains_gold": sum(g in s for s, g in zip(sets, gold, strict=True)) / n,
    }


def save_checkpoint(out: Path, lm: Any, tok: Any, cfg: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if cfg["arch"] == "native":
        # fp16 storage halves the file; routing runs fp32 or int8 after loading.
        save_file({k: v.detach().half().contiguous() for k, v in lm.state_dict().items()},
                  str(out / "model.safetensors"))
        tok.save_pretrained(str(out))
    else:
        lm.lm.save_pretrained(str(out / "model"))
        tok.save_pretrained(str(out / "model"))
    (out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train (keeping the last weights, or the best dev check with ``--patience``), save, then calibrate."""
    t_start = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    train_rows = read_jsonl(args.train or data / "train.jsonl") + [r for f in args.extra for r in read_jsonl(f)]
    dev_rows = read_jsonl(args.dev or data / "dev.jsonl")
    if args.exclude_sources:
        drop = set(args.exclude_sources)
        train_rows = [r for r in train_rows if family(r) not in drop]
        dev_rows = [r for r in dev_rows if family(r) not in drop]
    if args.limit:
        train_rows = random.Random(args.seed).sample(train_rows, min(args.limit, len(train_rows)))
    labels = sorted({r["label"] for r in train_rows})
    label_idx = {lab: i for i, lab in enumerate(labels)}
    sample_w = family_weights(train_rows, args.family_balance)
    mass: dict[str, float] = dict.fromkeys(labels, 0.0)
    for r, sw in zip(train_rows, sample_w, strict=True):
        mass[r["label"]] += sw
    counts = Counter(r["label"] for r in train_rows)
    class_w = {lab: sum(mass.values()) / (len(labels) * mass[lab]) for lab in labels}

    lm, tok, fields = build_lm(args, labels)
    device = torch.device(args.device)
    lm.to(device)
    cfg: dict[str, Any] = {
        **fields, "labels": labels, "max_len": args.max_len, "context_len": args.context_len,
        "max_turns": args.max_turns,
        "rewrite": any("rewrite" in r for r in train_rows),
        "precision": args.precision if fields["arch"] == "native" else "fp32",
        "temperature": 1.0, "tau": 0.5, "mass": 0.9,
    }
    codec = codec_from_config(tok, cfg)
    teacher = load_teacher(args.teacher, cfg, device, args.threads) if args.teacher else None
    if args.freeze_embeddings and cfg["arch"] == "native" and not args.from_scratch:
        # Pretrained word vectors stay put (unseen domains keep their meaning); only the new rows learn,
        # through the tied head. Frozen lower blocks also skip their backward pass: ~1/3 less compute.
        n_orig = cfg["n_orig_vocab"]
        lm.wte.weight.register_hook(lambda g: torch.cat([torch.zeros_like(g[:n_orig]), g[n_orig:]]))
        lm.freeze_input = True
        for mod in [lm.wpe, lm.ln_emb, *lm.blocks[: args.freeze_blocks]]:
            mod.requires_grad_(False)
    params = [(n, p) for n, p in lm.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "wte" not in n and "embed" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "wte" not in n and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr)
    rng = random.Random(args.seed)
    steps_per_epoch = -(-len(train_rows) // args.batch_size)
    total = args.max_steps or steps_per_epoch * args.epochs  # --max-steps overrides --epochs
    warmup = min(100, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (warmup + 1)) * max(0.0, (total - s) / max(1, total - warmup)))
    eval_every = args.eval_every or max(1, steps_per_epoch // 2)
    es_rows = stratified(dev_rows, args.es_dev, args.seed) if args.es_dev else dev_rows
    dev_router = FunctionalTokenRouter(lm, codec, cfg, threads=args.threads)
    best = (-1.0, 0)
    best_state: dict[str, torch.Tensor] = {}
    history: list[dict[str, float]] = []
    bad, step = 0, 0
    bar = tqdm(total=total, desc="train", unit="step", disable=args.quiet)
    lm.train()
    keep_last = args.patience == 0  # no early stopping: the last weights are kept, dev only calibrates
    while step < total and (keep_last or bad < args.patience):
        epoch = train_rows if args.family_balance == 1 else rng.choices(train_rows, sample_w, k=len(train_rows))
        examples = make_examples(epoch, codec, label_idx, rng if args.augment else None, args.mix,
                                 args.follow, args.max_turns)
        for b in batches([len(s) for s, _ in examples], args.batch_size, rng):
            batch = [examples[i] for i in b]
            w = torch.tensor([class_w[epoch[i]["label"]] for i in b])
            loss = step_loss(lm, codec, batch, w, device, teacher, args.kd_alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % eval_every == 0 or step == total:
                lm.eval()
                f1 = macro_f1(dev_router, es_rows)
                lm.train()
                history.append({"step": step, "dev_macro_f1": f1, "loss": loss.item()})
                bar.write(f"step {step}: dev macro-F1 {f1:.4f}")
                if keep_last or f1 > best[0]:
                    best, bad = (f1, step), 0
                    if not keep_last:
                        best_state = copy.deepcopy(lm.state_dict())
                else:
                    bad += 1
            if step >= total or (not keep_last and bad >= args.patience):
                break
    bar.close()
    if not keep_last:
        lm.load_state_dict(best_state)
    lm.to("cpu").eval()
    out = Path(args.out)
    save_checkpoint(out, lm, tok, cfg)

    train_info = {"rows": len(train_rows), "per_label": dict(counts), "steps": step, "best_step": best[1],
                  "best_dev_macro_f1_fp32": best[0], "history": history, "seconds": round(time.time() - t_start),
                  "params": param_count(lm), "args": vars(args), "teacher_recipe": teacher_recipe(args.teacher),
                  "kd_temperature": KD_TEMPERATURE if args.teacher else None}
    return calibrate(out, dev_rows, train_info, args.threads, args.latency_n, args.calibration)


def teacher_recipe(teacher: str | None) -> dict[str, Any] | None:
    """The teacher checkpoint's own recipe, so that LOSO can retrain the teacher without the held-out sources."""
    metrics = Path(teacher) / "metrics.json" if teacher else None
    if metrics is None or not metrics.exists():
        return None
    args = json.loads(metrics.read_text())["train"]["args"]
    return {k: args[k] for k in RECIPE_KEYS if k in args}


def conversation_accuracy(router: FunctionalTokenRouter, rows: Sequence[dict[str, Any]],
                          seed: int = 0) -> dict[str, float]:
    """Top-1 accuracy on both conversation cases built from ``rows`` (``conversations.py``): after a generic
    follow-up the conversation's label must win, after a self-contained question about another label that one."""
    convs = evaluation_conversations(rows, seed)
    results = router.route_batch([as_messages(c) for c in convs])
    out: dict[str, float] = {}
    for kind in ("follow_up", "switch"):
        hits = [res.top[0] == c["label"] for res, c in zip(results, convs, strict=True) if c["kind"] == kind]
        out[kind] = sum(hits) / len(hits) if hits else float("nan")
    return out


def fit_policy(logits: torch.Tensor, gold: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Temperature (NLL), then tau and mass (``calibrate_thresholds``) on (N, K) uncalibrated logits."""
    gold_idx = torch.tensor([list(labels).index(g) for g in gold])
    temperature = fit_temperature(logits, gold_idx)
    probs = [dict(zip(labels, p, strict=True)) for p in torch.softmax(logits / temperature, -1).tolist()]
    tau, mass = calibrate_thresholds(probs, gold)
    return {"temperature": temperature, "tau": tau, "mass": mass}


def heldout_logits(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """The router's uncalibrated logits on every held-out row of a LOSO result (``loso.py``), with gold labels:
    what the router does on sources it never saw, the only fair ground for its confidence policy."""
    res = json.loads(Path(path).read_text())
    if not res.get("heldout_logits"):
        raise SystemExit(f"--calibration {path}: no held-out logits in it (run router_model.loso first)")
    return torch.tensor(res["heldout_logits"]), list(res["heldout_gold"])


def calibrate(out: Path, dev_rows: Sequence[dict[str, Any]], train_info: dict[str, Any], threads: int = 2,
              latency_n: int = 200, calibration: str | None = None) -> dict[str, Any]:
    """Fit temperature, tau and mass, then write ``metrics.json`` and the model card.

    With ``calibration`` (a LOSO result) they are fitted on the held-out predictions of routers that never saw
    those sources; otherwise on dev with the model exactly as served (in-distribution: over-confident on new
    sources, so only for quick runs and LOSO folds)."""
    cfg = json.loads((out / "config.json").read_text())
    labels = cfg["labels"]
    router = FunctionalTokenRouter.load(out, threads=threads)
    dev_logits = router.logits([r["text"] for r in dev_rows])
    dev_gold = [r["label"] for r in dev_rows]
    logits, gold = heldout_logits(calibration) if calibration else (dev_logits, dev_gold)
    cfg.update(fit_policy(logits, gold, labels))
    cfg["calibrated_on"] = f"held-out sources ({calibration})" if calibration else "dev"
    (out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")

    probs = [dict(zip(labels, p, strict=True)) for p in torch.softmax(logits / cfg["temperature"], -1).tolist()]
    gold_idx = torch.tensor([labels.index(g) for g in gold])
    router = FunctionalTokenRouter.load(out, threads=1)
    metrics = {
        "served_precision": router.precision,
        "calibrated_on": cfg["calibrated_on"],
        "dev": evaluate(router, dev_rows, latency_n=latency_n),
        "experts_on_calibration_rows": expert_counts(probs, gold, cfg["tau"], cfg["mass"]),
        "dev_conversations": conversation_accuracy(router, dev_rows),
        "uncalibrated_nll": float(nn.functional.cross_entropy(logits, gold_idx)),
        "calibrated_nll": float(nn.functional.cross_entropy(logits / cfg["temperature"], gold_idx)),
        "train": train_info,
        "checkpoint_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_model_card(out)
    return metrics


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="octoroute router train", formatter_class=argparse.RawDescriptionHelpFormatter,  # examples: own lines
        description=(__doc__ or "").replace("``", "").replace("::\n", ":\n"))
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder with train.jsonl and dev.jsonl")
    ap.add_argument("--train", help="training JSONL (default DATA/train.jsonl)")
    ap.add_argument("--dev", help="dev JSONL for early stopping and calibration (default DATA/dev.jsonl)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "checkpoint"))
    ap.add_argument("--base", help="local Hugging Face causal LM folder; default: MiniLM warm start")
    ap.add_argument("--layers", type=int, default=3, help="MiniLM blocks kept (native model)")
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--extra", nargs="*", default=[str(p) for p in EXTRA_DATA if p.exists()],
                    help="more training JSONL files: rows with text or messages (default: router_model/data/*.jsonl)")
    ap.add_argument("--context-len", type=int, default=64,
                    help="tokens of earlier conversation the router reads besides the latest turn's --max-len")
    ap.add_argument("--max-turns", type=int, default=4, help="earlier turns in training conversations")
    ap.add_argument("--follow", type=float, default=0.2,
                    help="share of rows asked first and followed by a generic follow-up, which inherits their label")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=600, help="optimizer steps; 0: use --epochs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--patience", type=int, default=0,
                    help="evaluations without dev gain before stopping and keeping the best one (0: train every "
                         "step and keep the last weights; dev then only calibrates)")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between dev checks (0: half an epoch)")
    ap.add_argument("--mix", type=float, default=0.3, help="share of rows given an unrelated earlier turn")
    ap.add_argument("--family-balance", type=float, default=1.0,
                    help="rows drawn with weight family_size ** (x - 1): 1 = as the data is, 0 = every family alike")
    ap.add_argument("--no-augment", dest="augment", action="store_false")
    ap.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True,
                    help="keep MiniLM's word vectors (and the lowest --freeze-blocks blocks) fixed, so words the "
                         "training data never shows keep their pretrained meaning; less compute per step")
    ap.add_argument("--freeze-blocks", type=int, default=1, help="with --freeze-embeddings: lowest blocks kept frozen")
    ap.add_argument("--es-dev", type=int, default=300, help="dev rows (stratified) checked during training")
    ap.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="how the checkpoint is served on CPU (auto: bf16 where the CPU has AMX, else int8)")
    ap.add_argument("--exclude-sources", nargs="*", default=[], help="source families left out (LOSO)")
    ap.add_argument("--limit", type=int, default=0, help="random subset of training rows (smoke tests)")
    ap.add_argument("--latency-n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="training device, e.g. cuda; routing is always benchmarked on CPU")
    ap.add_argument("--from-scratch", action="store_true",
                    help="ablation: random initial weights instead of the MiniLM warm start (native model only)")
    ap.add_argument("--teacher",
                    help="checkpoint to distil from (same labels, tokenizer and prompt settings): a --layers 4 run")
    ap.add_argument("--kd-alpha", type=float, default=0.5, help="with --teacher: weight of the distillation loss")
    ap.add_argument("--calibration", help="LOSO result whose held-out logits fit temperature, tau and mass "
                    "(default: dev, which is in-distribution and over-confident on new sources)")
    ap.add_argument("--recalibrate", action="store_true",
                    help="no training: refit the confidence policy of the checkpoint in --out (with --calibration)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.recalibrate:  # the trained weights stay; only the confidence policy, metrics and card are redone
        out = Path(args.out)
        if not (out / "metrics.json").exists():
            raise SystemExit(f"--recalibrate: {out} has no metrics.json (train it with this script first)")
        train_info = json.loads((out / "metrics.json").read_text())["train"]
        m = calibrate(out, read_jsonl(args.dev or Path(args.data) / "dev.jsonl"), train_info, args.threads,
                      args.latency_n, args.calibration)
    else:
        m = train(args)
    d = m["dev"]
    print(json.dumps({k: d[k] for k in ("accuracy", "macro_f1", "ece", "p50_ms", "p99_ms", "n") if k in d}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
