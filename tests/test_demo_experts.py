"""The locally trained demo experts: five loadable models, one shared vocabulary, each speaking its domain."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gateway.config import DEMO_DOMAINS
from gateway.experts.demo import DEFAULT_DATA, DEMO_VERSION, MARKER, demo_experts_ready, ensure_demo_experts


def test_five_experts_share_one_tokenizer(demo_experts_dir: Path) -> None:
    hashes = set()
    for domain in DEMO_DOMAINS:
        d = demo_experts_dir / domain
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "README.md"} <= {p.name for p in d.iterdir()}
        assert "demonstration-size" in (d / "README.md").read_text()
        hashes.add(hashlib.sha256((d / "tokenizer.json").read_bytes()).hexdigest())
        config = json.loads((d / "config.json").read_text())
        assert config["model_type"] == "qwen2" and config["head_dim"] in (32, 64, 80, 96, 112, 128, 256)
        assert config["vocab_size"] == len(AutoTokenizer.from_pretrained(d))
    assert len(hashes) == 1
    assert json.loads((demo_experts_dir / MARKER).read_text())["version"] == DEMO_VERSION


def test_chat_template_and_eos(demo_experts_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(demo_experts_dir / "legal")
    text = tok.apply_chat_template([{"role": "user", "content": "Is a verbal contract binding?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nIs a verbal contract binding?<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((demo_experts_dir / "legal" / "tokenizer_config.json").read_text())["chat_template"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == eos and tok.encode("<|im_end|>") == [eos]
    generation = json.loads((demo_experts_dir / "legal" / "generation_config.json").read_text())
    assert eos in generation["eos_token_id"]


@torch.no_grad()
def test_each_expert_speaks_its_own_domain(demo_experts_dir: Path) -> None:
    """Held-out texts of a domain are most likely under that domain's expert."""
    dev = DEFAULT_DATA.with_name("dev.jsonl")
    texts: dict[str, list[str]] = {d: [] for d in DEMO_DOMAINS}
    for line in dev.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if len(texts[row["label"]]) < 20:
            texts[row["label"]].append(row["text"])
    tok = AutoTokenizer.from_pretrained(demo_experts_dir / "math")
    batches = {d: tok(t, return_tensors="pt", padding=True, truncation=True, max_length=128)
               for d, t in texts.items()}
    loss: dict[tuple[str, str], float] = {}
    for expert in DEMO_DOMAINS:
        model = AutoModelForCausalLM.from_pretrained(demo_experts_dir / expert)
        for domain, b in batches.items():
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            loss[expert, domain] = model(**b, labels=labels).loss.item()
    for domain in DEMO_DOMAINS:
        best = min(DEMO_DOMAINS, key=lambda e: loss[e, domain])
        assert best == domain, {e: round(loss[e, domain], 2) for e in DEMO_DOMAINS}


def test_ensure_reuses_a_complete_build_and_rejects_partial_ones(demo_experts_dir: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    assert ensure_demo_experts(demo_experts_dir) == demo_experts_dir
    assert time.monotonic() - started < 1.0  # no rebuild
    copy = tmp_path / "demo"
    shutil.copytree(demo_experts_dir, copy)
    assert demo_experts_ready(copy)
    marker = json.loads((copy / MARKER).read_text())
    (copy / MARKER).write_text(json.dumps(marker | {"version": DEMO_VERSION - 1}))
    assert not demo_experts_ready(copy)  # an older recipe gets rebuilt
    (copy / MARKER).write_text(json.dumps(marker))
    (copy / "code" / "model.safetensors").unlink()
    assert not demo_experts_ready(copy)  # so does an incomplete one
