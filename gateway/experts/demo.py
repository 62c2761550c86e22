"""Tiny demonstration experts, trained locally in about a minute so Octoroute runs with no downloads.

One byte-level BPE tokenizer is trained on the routing data and shared by every expert (identical
vocabularies are what per-token logit fusion needs); then one small Qwen2-architecture causal LM per
domain is trained briefly on that domain's texts. They speak their domain's vocabulary, nothing more.
Qwen2 with head_dim 64 is chosen because vLLM's CPU attention serves it unchanged.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from gateway.config import DEMO_DOMAINS

# Bump when the recipe changes: ensure_demo_experts rebuilds directories with another version.
DEMO_VERSION = 2
MARKER = "octoroute-demo.json"
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared/data/routing/train.jsonl"

VOCAB_SIZE = 4096
EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SEED = 1234
SEQ_LEN, BATCH, STEPS, LR = 128, 8, 140, 5e-3
TOKENIZER_DOCS, TRAIN_DOCS = 1500, 3000  # per domain

MODEL_CARD = """---
license: apache-2.0
library_name: transformers
tags: [octoroute, demo]
---
# Octoroute demo expert: {domain}

A **demonstration-size** Qwen2-architecture causal LM ({params:,} parameters, 2 layers, hidden 128),
trained for {steps} steps on CPU on the `{domain}` texts of Octoroute's routing data. It produces
{domain}-flavoured text so routing and fusion can be seen end to end; it does not answer questions.
All demo experts share one locally trained byte-level BPE tokenizer ({vocab} tokens, ChatML template).
Built by `gateway/experts/demo.py` (recipe version {version}); nothing was downloaded.
"""


def _load(data: Path) -> dict[str, list[str]]:
    texts: dict[str, list[str]] = {d: [] for d in DEMO_DOMAINS}
    with data.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["label"] in texts:
                texts[row["label"]].append(row["text"])
    rng = random.Random(SEED)
    for docs in texts.values():
        rng.shuffle(docs)
    return texts


def _as_chat(text: str) -> str:
    """Turn a query into a ChatML exchange whose 'answer' continues it: the model learns the template,
    the domain's language and when to stop (``<|im_end|>``)."""
    cut = text.find(" ", len(text) // 3)
    user, answer = (text[:cut], text[cut + 1 :]) if cut > 0 else (text, text)
    return f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{answer}{IM_END}\n"


def _train_tokenizer(texts: dict[str, list[str]]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOT, IM_START, IM_END], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(
        (_as_chat(t) for docs in texts.values() for t in docs[:TOKENIZER_DOCS]), trainer
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=EOT, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _save_tokenizer(tok: PreTrainedTokenizerFast, path: Path) -> None:
    """Save, then make sure the chat template sits in tokenizer_config.json, where every transformers
    version (including the one inside the vLLM install) looks for it."""
    tok.save_pretrained(path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (path / "chat_template.jinja").unlink(missing_ok=True)


def _model_config(tok: PreTrainedTokenizerFast) -> Qwen2Config:
    vocab = tok.get_vocab()
    return Qwen2Config.from_dict({
        "vocab_size": VOCAB_SIZE, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 1024,
        "tie_word_embeddings": True, "bos_token_id": vocab[EOT], "eos_token_id": vocab[IM_END],
        "pad_token_id": vocab[EOT], "dtype": "float32",
    })


def _train_model(cfg: Qwen2Config, ids: torch.Tensor, bar: tqdm) -> Qwen2ForCausalLM:
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS, pct_start=0.1)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(STEPS):
        starts = torch.randint(0, len(ids) - SEQ_LEN, (BATCH,), generator=gen)
        batch = torch.stack([ids[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.2f}")
        bar.update()
    return model.eval()


def build_demo_experts(out_dir: Path, data: Path | None = None, progress: bool = True) -> None:
    """Train the shared tokenizer and one model per domain into ``out_dir/<domain>`` (overwrites)."""
    texts = _load(data or DEFAULT_DATA)
    threads, hf_bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()  # transformers' own "Writing model shards" bars
    # One thread: on small shared CI machines two threads ran up to 10x slower when another job ran.
    torch.set_num_threads(1)
    try:
        with tqdm(total=len(DEMO_DOMAINS) * STEPS, desc="demo experts: tokenizer", disable=not progress) as bar:
            tok = _train_tokenizer(texts)
            cfg = _model_config(tok)
            for domain in DEMO_DOMAINS:
                bar.set_description(f"demo experts: {domain}")
                encoded = tok([_as_chat(t) for t in texts[domain][:TRAIN_DOCS]])["input_ids"]
                ids = torch.tensor([i for doc in encoded for i in doc])
                model = _train_model(cfg, ids, bar)
                path = out_dir / domain
                model.save_pretrained(path, safe_serialization=True)
                GenerationConfig(
                    eos_token_id=[cfg.eos_token_id, cfg.pad_token_id], pad_token_id=cfg.pad_token_id
                ).save_pretrained(path)
                _save_tokenizer(tok, path)
                (path / "README.md").write_text(
                    MODEL_CARD.format(domain=domain, params=model.num_parameters(), steps=STEPS,
                                      vocab=VOCAB_SIZE, version=DEMO_VERSION),
                    encoding="utf-8",
                )
    finally:
        torch.set_num_threads(threads)
        if hf_bars:
            hf_logging.enable_progress_bar()
    (out_dir / MARKER).write_text(
        json.dumps({"version": DEMO_VERSION, "domains": list(DEMO_DOMAINS)}) + "\n", encoding="utf-8"
    )


def demo_experts_ready(out_dir: Path) -> bool:
    try:
        marker = json.loads((out_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("version") == DEMO_VERSION and all(
        (out_dir / d / "model.safetensors").is_file() for d in DEMO_DOMAINS
    )


def ensure_demo_experts(out_dir: Path, data: Path | None = None, progress: bool = True) -> Path:
    """Build the demo experts unless a complete build of this version is already there.

    The build goes to a sibling temp directory that is renamed into place, so an interrupted build
    never looks complete and concurrent builders cannot mix files; the marker is written last.
    """
    out_dir = Path(out_dir)
    if demo_experts_ready(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-build-", dir=out_dir.parent))
    try:
        build_demo_experts(tmp, data, progress)
        if demo_experts_ready(out_dir):  # another process finished first
            return out_dir
        if out_dir.exists():  # stale or partial: move aside, then replace
            old = tmp.with_name(tmp.name + "-old")
            out_dir.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(out_dir)
        except OSError:  # lost a race to a concurrent builder
            if not demo_experts_ready(out_dir):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
