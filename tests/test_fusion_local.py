"""Fusion over real local demo experts, checked against a brute-force reference built from the models directly."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from gateway.config import ExpertConfig, FusionConfig
from gateway.experts.demo import CHAT_TEMPLATE, EOT, IM_END, IM_START
from gateway.experts.local import LocalExpert
from gateway.fusion import FusionHooks, FusionInputError, FusionRefused, check_fusable, fused_generate, fused_stream
from gateway.fusion import math as fm

CFG = FusionConfig()
PROMPTS = [
    [{"role": "user", "content": "How do I compute the derivative of a polynomial"}],
    [{"role": "user", "content": "Write a function that parses a CSV file"}],
    [{"role": "user", "content": "What are the tax consequences of selling shares"}],
]


@pytest.fixture(scope="module")
def experts(demo_experts_dir: Path) -> dict[str, LocalExpert]:
    return {d: LocalExpert(ExpertConfig(name=d, backend="local", path=str(demo_experts_dir / d)))
            for d in ("math", "code", "finance", "general", "legal")}


def reference(chosen: list[tuple[LocalExpert, float]], ids: list[int], max_tokens: int) -> list[int]:
    """Greedy weighted fusion written out from the models' own logits (full vocabulary, no fusion code)."""
    total = sum(w for _, w in chosen)
    eos = set().union(*(e.eos_ids for e, _ in chosen))
    out: list[int] = []
    with torch.inference_mode():
        while len(out) < max_tokens:
            x = torch.tensor([ids + out])
            fused = sum((w / total) * torch.log_softmax(e.model(input_ids=x).logits[0, -1].double(), -1)
                        for e, w in chosen)
            token = int(torch.as_tensor(fused).argmax())
            if token in eos:
                break
            out.append(token)
    return out


async def collect(chosen: list[tuple[Any, float]], endpoint: Any, body: dict[str, Any],
                  **kw: Any) -> tuple[str, str | None, dict[str, Any], list[dict[str, Any]]]:
    chunks = [c async for c in fused_stream(chosen, endpoint, body, config=CFG, **kw)]
    key = "delta" if endpoint == "chat" else "text"
    parts = [(c["choices"][0][key].get("content") if endpoint == "chat" else c["choices"][0][key]) or ""
             for c in chunks if c["choices"]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    return "".join(parts), finish, chunks[-1], chunks


@pytest.mark.parametrize("names", [("math", "code"), ("math", "code", "finance")])
async def test_greedy_fusion_matches_brute_force(experts: dict[str, LocalExpert], names: tuple[str, ...]) -> None:
    weights = [0.5, 0.3, 0.2][: len(names)]
    chosen = [(experts[n], w) for n, w in zip(names, weights, strict=True)]
    tok = experts["math"].tokenizer
    differs_from_leader = 0
    for messages in PROMPTS:
        ids = experts["math"].tokenize_chat(messages)
        want = reference(chosen, ids, 24)
        text, finish, last, _ = await collect(chosen, "chat", {"messages": messages, "temperature": 0,
                                                              "max_tokens": 24})
        assert text == tok.decode(want, skip_special_tokens=True)
        assert finish == ("length" if len(want) == 24 else "stop")
        assert last["usage"]["prompt_tokens"] == len(ids)
        assert last["usage"]["completion_tokens"] == min(len(want) + 1, 24)
        assert last["octoroute_fusion"] == {"experts": list(names), "dropped": []}
        differs_from_leader += want != reference(chosen[:1], ids, 24)
    assert differs_from_leader > 0, "fusion never changed the leading expert's answer: the test proves nothing"


async def test_completions_prompt_and_max_tokens(experts: dict[str, LocalExpert]) -> None:
    chosen = [(experts["math"], 0.6), (experts["general"], 0.4)]
    tok = experts["math"].tokenizer
    # a prompt whose fused greedy answer runs to max_tokens (which one depends on the demo experts' weights,
    # trained on each machine): the point is finish_reason "length" and the usage count
    prompts = ["The integral of a function", "The derivative of x squared is", "Prime numbers are", "Add two and"]
    prompt, want = next(((p, w) for p in prompts if len(w := reference(chosen, list(tok.encode(p)), 5)) == 5),
                        (prompts[0], []))
    body = {"prompt": prompt, "temperature": 0, "max_tokens": 5}
    text, finish, last, chunks = await collect(chosen, "completions", body)
    assert len(want) == 5 and finish == "length"
    assert text == tok.decode(want, skip_special_tokens=True)
    assert last["usage"]["completion_tokens"] == 5
    assert all(c["object"] == "text_completion" for c in chunks)
    whole = await fused_generate(chosen, "completions", body, config=CFG)
    assert whole["choices"][0]["text"] == text and whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"] == last["usage"]


async def test_stop_strings_cut_the_text(experts: dict[str, LocalExpert]) -> None:
    chosen = [(experts["math"], 0.5), (experts["code"], 0.5)]
    body = {"messages": PROMPTS[0], "temperature": 0, "max_tokens": 24}
    full, _, _, _ = await collect(chosen, "chat", body)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    text, finish, last, _ = await collect(chosen, "chat", body | {"stop": [stop, "never-there"]})
    assert finish == "stop"
    assert text == full[: full.index(stop)]
    ids = reference(chosen, experts["math"].tokenize_chat(PROMPTS[0]), 24)
    through_stop = next(n for n in range(1, 25) if stop in experts["math"].tokenizer.decode(ids[:n]))
    assert last["usage"]["completion_tokens"] == through_stop


async def test_seeded_sampling_is_reproducible(experts: dict[str, LocalExpert]) -> None:
    chosen = [(experts["math"], 0.5), (experts["code"], 0.5)]
    body = {"prompt": "Let x be", "temperature": 1.0, "max_tokens": 16}
    runs = [(await collect(chosen, "completions", body | {"seed": s}))[0] for s in (7, 7, 8, 9)]
    assert runs[0] == runs[1]
    assert len(set(runs[1:])) > 1


async def test_dlf_mode_follows_the_dlf_rule(experts: dict[str, LocalExpert]) -> None:
    large, small = experts["general"], experts["legal"]
    chosen = [(experts["math"], 0.5), (experts["code"], 0.5)]
    ids = experts["math"].tokenize_chat(PROMPTS[0])
    want: list[int] = []
    with torch.inference_mode():
        for _ in range(10):
            rows = [torch.log_softmax(m.model(input_ids=torch.tensor([ids + want])).logits[0, -1].double(), -1)
                    .numpy() for m in (large, small, experts["math"], experts["code"])]
            token = int(np.argmax(fm.dlf_fuse(rows[0], rows[1], np.stack(rows[2:])).fused))
            if token in large.eos_ids:
                break
            want.append(token)
    steps: list[str] = []
    text, _, _, _ = await collect(chosen, "chat", {"messages": PROMPTS[0], "temperature": 0, "max_tokens": 10},
                                  mode="dlf", bases=(large, small),
                                  hooks=FusionHooks(on_step=lambda mode, s: steps.append(mode)))
    assert text == large.tokenizer.decode(want, skip_special_tokens=True)
    assert steps == ["dlf"] * min(len(want) + 1, 10)
    with pytest.raises(FusionRefused, match="large_base"):
        await collect(chosen, "chat", {"messages": PROMPTS[0]}, mode="dlf")


async def test_unsupported_fields_are_refused(experts: dict[str, LocalExpert]) -> None:
    chosen = [(experts["math"], 0.5), (experts["code"], 0.5)]
    with pytest.raises(FusionInputError) as err:
        await collect(chosen, "chat", {"messages": PROMPTS[0], "tools": [{"type": "function"}]})
    assert err.value.param == "tools"
    with pytest.raises(FusionInputError):
        await collect(chosen, "chat", {"messages": PROMPTS[0], "n": 2})


def _other_tokenizer_expert(src: Path, dst: Path) -> LocalExpert:
    """The math expert's weights with a different tokenizer (trained here on other text, same specials)."""
    shutil.copytree(src, dst)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[EOT, IM_START, IM_END], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["zebra quantum lattice " * 50, "unrelated words to merge differently " * 50], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=EOT)
    fast.chat_template = CHAT_TEMPLATE
    for f in dst.glob("tokenizer*"):
        f.unlink()
    fast.save_pretrained(dst)
    return LocalExpert(ExpertConfig(name="odd", backend="local", path=str(dst)))


async def test_mismatched_tokenizers_are_refused(experts: dict[str, LocalExpert], demo_experts_dir: Path,
                                                 tmp_path: Path) -> None:
    odd = _other_tokenizer_expert(demo_experts_dir / "math", tmp_path / "odd")
    assert await check_fusable([experts["math"], experts["code"], experts["finance"]]) is None
    reason = await check_fusable([experts["math"], odd])
    assert reason is not None and "different tokenizers" in reason and "odd" in reason
    with pytest.raises(FusionRefused, match="different tokenizers"):
        await collect([(experts["math"], 0.5), (odd, 0.5)], "chat", {"messages": PROMPTS[0]})
