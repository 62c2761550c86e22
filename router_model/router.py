"""``FunctionalTokenRouter``: a checkpoint directory behind the gateway's ``Router`` protocol.

A checkpoint is ``config.json`` (labels in order, functional-token ids, prompt ids, max length,
temperature, tau, mass) plus either ``model.safetensors`` + tokenizer (the native MiniLM-warm-started
model) or ``model/`` (any Hugging Face causal LM fine-tuned by the same recipe).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from router_model.interface import Message, RouteResult
from router_model.model import (
    LM,
    CausalLM,
    HFCausalLM,
    ModelConfig,
    logits_for,
    quantize_int8,
    traced_answer_hidden,
)

REWRITE_OPEN, REWRITE_CLOSE = "('", "')"
PRECISIONS = ("auto", "bf16", "int8", "fp32")


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 where the CPU has AMX tiles, else int8 (dynamic, per-channel weight scales).

    Measured at 64 tokens (bench.py): on a Sapphire Rapids core (AMX) bf16 and int8 have the same batch-1
    latency but bf16 routes batches ~2.1x faster; on a Zen 4 core (AVX512-BF16, no AMX) bf16 is ~1.5x slower
    than int8 at batch 1 and ~1.3x slower batched, so AVX512-BF16 alone does not make bf16 worth it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"router precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() else "int8"


# Characters of each earlier turn the router reads (its head: a turn says what it is about first). An assistant
# answer gets fewer than a user question, so a whole exchange fits the context budget; the system prompt is
# oldest, so it is the first to fall out of the budget when the conversation is long.
TURN_HEAD_CHARS = {"system": 120, "user": 160, "assistant": 80}


def split_conversation(messages: Sequence[Message], max_turns: int | None = None) -> tuple[str, str]:
    """(latest user turn, context): the context is the system prompt(s), then up to ``max_turns`` (None: all)
    earlier user/assistant turns, oldest first, each as a ``role: head of its text`` line.

    The gateway bounds the conversation (``router.history_turns``) before it reaches the router, so serving
    passes ``None``; training and evaluation build conversations of the length they mean.
    """
    turns = [m for m in messages if m.role in ("user", "assistant")]
    last = max((i for i, m in enumerate(turns) if m.role == "user"), default=len(turns) - 1)
    if last < 0:
        return "", ""
    earlier = turns[0 if max_turns is None else max(0, last - max_turns) : last]
    system = [Message("system", m.content) for m in messages if m.role in ("system", "developer") and m.content.strip()]
    lines = [f"{m.role}: {_window(' '.join(m.content.split()), TURN_HEAD_CHARS[m.role], False, slack=40)}"
             for m in [*system, *earlier]]
    return turns[last].content, "\n".join(lines)


WINDOW_CHARS_PER_TOKEN = 8  # English word pieces average ~4.5 characters; a short window only costs a retry
_CUT = re.compile(r"(?<=\S)\s")  # a word ends / a whitespace run starts: every pre-tokeniser splits there


def _window(text: str, width: int, keep_end: bool, slack: int = 256) -> str:
    """``text``'s first (last) ~``width`` characters, cut where a whitespace run starts; the whole text where
    there is no such place within ``slack`` characters of the cut."""
    if len(text) <= width:
        return text
    if keep_end:
        lo = len(text) - width
        cuts = [m.start() for m in _CUT.finditer(text, max(1, lo - slack), lo + 1)]
        return text[cuts[-1]:] if cuts else text
    m = _CUT.search(text, width, width + slack)
    return text[: m.start()] if m else text


@dataclass
class Codec:
    """Turns queries into prompt ids and labels into target ids, identically in training and routing.

    Prompt: ``prefix + [context + sep] + query + suffix``. The latest query is kept from its start (questions
    usually come before pasted context) in ``max_len`` tokens with prefix and suffix, so a single-turn prompt is
    the same whatever the conversation settings; the context has a budget of its own, ``context_len`` tokens,
    truncated from the left so the turns nearest the query survive (``split_conversation`` gives each turn's
    head). A follow-up such as "explain step by step" is routed by what came before it, so the context must
    not be squeezed out by a long latest turn.
    """

    tokenizer: Any
    prefix_ids: list[int]
    suffix_ids: list[int]
    fn_ids: list[int]
    end_id: int
    pad_id: int
    max_len: int
    context_len: int = 0
    sep_ids: list[int] = field(default_factory=list)

    def prompts(self, queries: Sequence[str], contexts: Sequence[str] | None = None) -> list[list[int]]:
        """One prompt (token ids) per query; ``contexts[i]`` is query i's earlier conversation ("" for none).

        Length: at most ``max_len + context_len + len(sep_ids)`` ids.
        """
        budget = self.max_len - len(self.prefix_ids) - len(self.suffix_ids)
        qs = self.ids(list(queries), budget, keep_end=False)
        cs: list[list[int]] = [[] for _ in queries]
        if contexts is not None and self.context_len > 0 and any(contexts):
            cs = self.ids([c or "" for c in contexts], self.context_len, keep_end=True)
        return [self.prefix_ids + (c + self.sep_ids if c else []) + q + self.suffix_ids
                for q, c in zip(qs, cs, strict=True)]

    def ids(self, texts: list[str], n: int, keep_end: bool) -> list[list[int]]:
        """Each text's first (``keep_end``: last) ``n`` token ids, tokenising only a window of the text.

        Routing reads 64 tokens, but tokenising a whole 100 KB prompt costs ~30 ms; a window of
        ``n * WINDOW_CHARS_PER_TOKEN`` characters bounds that. The window is cut at a word boundary, where
        word-piece and byte-level BPE pre-tokenisers split anyway, so its tokens are exactly the text's
        first (last) ones; a window that yields fewer than ``n`` tokens is redone on the whole text.
        """
        windows = [_window(t, n * WINDOW_CHARS_PER_TOKEN, keep_end) for t in texts]
        out = self.tokenizer(windows, add_special_tokens=False)["input_ids"] if texts else []
        cut_short = [i for i, (w, t, ids) in enumerate(zip(windows, texts, out, strict=True))
                     if len(w) < len(t) and len(ids) < n]
        if cut_short:
            redo = self.tokenizer([texts[i] for i in cut_short], add_special_tokens=False)["input_ids"]
            for i, ids in zip(cut_short, redo, strict=True):
                out[i] = ids
        return [ids[-n:] if keep_end else ids[:n] for ids in out] if n > 0 else [[] for _ in out]

    def target(self, label_idx: int, rewrite: str | None = None) -> list[int]:
        """``<nexa_i><nexa_end>``, or Octopus v4's ``<nexa_i>('rewrite')<nexa_end>``."""
        body: list[int] = []
        if rewrite is not None:
            text = f"{REWRITE_OPEN}{rewrite}{REWRITE_CLOSE}"
            body = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.fn_ids[label_idx], *body, self.end_id]

    def pad(self, seqs: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to a (B, T) tensor; also returns the attention mask."""
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return ids, mask


def codec_from_config(tokenizer: Any, cfg: dict[str, Any]) -> Codec:
    tokenizer.model_max_length = 1 << 30  # we truncate ourselves; silences the long-input warning
    return Codec(
        tokenizer=tokenizer,
        prefix_ids=list(cfg["prefix_ids"]),
        suffix_ids=list(cfg["suffix_ids"]),
        fn_ids=list(cfg["functional_token_ids"]),
        end_id=int(cfg["end_token_id"]),
        pad_id=int(cfg["pad_id"]),
        max_len=int(cfg["max_len"]),
        context_len=int(cfg.get("context_len", 0)),
        sep_ids=list(cfg.get("sep_ids", [])),
    )


class FunctionalTokenRouter:
    """Routes with one forward pass; probabilities are temperature-calibrated on dev.

    Thread-safe: a lock serialises routing calls, and the torch thread count is set on every call, so
    another library changing it cannot slow us silently. ``threads`` is how many cores a call may use:
    in bf16/fp32 torch's intra-op threads split each batched forward pass; in int8 each prompt has its
    own forward pass (see ``_answer_logits``), so ``threads`` workers with one torch thread each take
    the prompts in parallel (the traced graph releases the GIL: 1.9x on 2 threads, README).
    """

    def __init__(self, lm: LM, codec: Codec, cfg: dict[str, Any], threads: int = 1, precision: str = "fp32",
                 answer_hidden: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.lm = lm
        self.answer_hidden = answer_hidden or lm.answer_hidden  # load() passes a traced graph of the same
        self.precision = precision
        self.codec = codec
        self.config = cfg
        self.labels: tuple[str, ...] = tuple(cfg["labels"])
        self.temperature = float(cfg.get("temperature", 1.0))
        self.tau = float(cfg.get("tau", 0.5))
        self.mass = float(cfg.get("mass", 0.9))
        self.rewrite = bool(cfg.get("rewrite", False))
        self.threads = threads
        self._fn = torch.tensor(codec.fn_ids)
        self._lock = threading.Lock()
        self._rows = ThreadPoolExecutor(threads, "router") if precision == "int8" and threads > 1 else None

    @classmethod
    def load(cls, path: str | Path, threads: int = 1, precision: str | None = None) -> FunctionalTokenRouter:
        """Load a checkpoint directory, served at ``precision`` (default: the checkpoint's, usually ``auto``)."""
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        torch.set_num_threads(threads)
        lm: Any
        if cfg["arch"] == "native":
            tok = AutoTokenizer.from_pretrained(str(path))
            lm = CausalLM(ModelConfig(**cfg["model"]))
            state = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
            lm.load_state_dict(state)
        else:
            tok = AutoTokenizer.from_pretrained(str(path / "model"))
            lm = HFCausalLM(AutoModelForCausalLM.from_pretrained(str(path / "model"), dtype=torch.float32))
        lm.eval()
        served = resolve_precision(precision or cfg.get("precision", "fp32"))
        if served == "int8":
            lm = quantize_int8(lm)
        elif served == "bf16":
            lm = lm.to(torch.bfloat16)
        codec = codec_from_config(tok, cfg)
        traced = None
        if cfg["arch"] == "native":
            traced = traced_answer_hidden(lm, *codec.pad([codec.prompts(["a longer example query"])[0],
                                                          codec.prompts(["short"])[0]]))
        return cls(lm, codec, cfg, threads, served, traced)

    def _threads(self) -> None:
        wanted = 1 if self._rows is not None else self.threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def _encode(self, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
        parts = [split_conversation(c) for c in conversations]  # the gateway has bounded the history
        return self.codec.prompts([q for q, _ in parts], [c for _, c in parts])

    @torch.inference_mode()
    def _answer_logits(self, prompts: Sequence[list[int]]) -> torch.Tensor:
        """Raw functional-token logits (N, K).

        In int8 every prompt gets its own forward pass: dynamic quantisation scales a whole batch's
        activations at once, so a query's probabilities would depend on the queries batched with it (1% of
        dev changed expert set between alone and in batches of 32; README). Alone is also faster on the
        CPU (no padding): 1,094 vs 554 dev queries/s on one Zen 5 thread. bf16 and fp32 rows do not
        depend on each other, and there length-sorted chunks of 64 keep padding small.
        """
        device = self.lm.head_weight().device  # training evaluates on the training device
        fn = self._fn.to(device)

        def forward(batch: list[list[int]]) -> torch.Tensor:
            with torch.inference_mode():  # thread-local: the int8 workers need it too
                ids, mask = (t.to(device) for t in self.codec.pad(batch))
                return logits_for(self.lm, self.answer_hidden(ids, mask), fn).float().cpu()

        if self.precision == "int8":
            alone = [[p] for p in prompts]
            return torch.cat(list(self._rows.map(forward, alone) if self._rows else map(forward, alone)))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = torch.empty(len(prompts), len(self.labels))
        for s in range(0, len(order), 64):
            idx = order[s : s + 64]
            out[idx] = forward([prompts[i] for i in idx])
        return out

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """Uncalibrated logits for single-turn queries (what temperature fitting needs)."""
        with self._lock:
            self._threads()
            return self._answer_logits(self.codec.prompts(list(texts)))

    def route_batch(self, conversations: Sequence[Sequence[Message]]) -> list[RouteResult]:
        if not conversations:
            return []
        with self._lock:  # also around tokenisation: HF fast tokenizers can raise "Already borrowed" concurrently
            prompts = self._encode(conversations)
            self._threads()
            t0 = time.perf_counter()
            logits = self._answer_logits(prompts)
            ms = (time.perf_counter() - t0) * 1000 / len(prompts)
            probs = torch.softmax(logits / self.temperature, dim=-1).tolist()
            rewrites = [self._rewrite(p, max(range(len(pr)), key=pr.__getitem__)) for p, pr in
                        zip(prompts, probs, strict=True)] if self.rewrite else [None] * len(prompts)
        return [
            RouteResult(probs=dict(zip(self.labels, pr, strict=True)), rewrite=rw, extras={"forward_ms": ms})
            for pr, rw in zip(probs, rewrites, strict=True)
        ]

    def route(self, messages: Sequence[Message]) -> RouteResult:
        return self.route_batch([messages])[0]

    @torch.inference_mode()
    def _rewrite(self, prompt: list[int], label_idx: int, max_new: int = 64) -> str | None:
        """Greedy-decode Octopus v4's ``('…')`` after the chosen functional token, up to ``<nexa_end>``."""
        seq = [*prompt, self.codec.fn_ids[label_idx]]
        new: list[int] = []
        for _ in range(max_new):
            h = self.lm.hidden(torch.tensor([seq]))
            nxt = int(logits_for(self.lm, h[0, -1]).argmax())
            if nxt == self.codec.end_id:
                break
            new.append(nxt)
            seq.append(nxt)
        return parse_rewrite(self.codec.tokenizer.decode(new, skip_special_tokens=True))


def parse_rewrite(text: str) -> str | None:
    """The text between ``('`` and ``')``; tolerant of the spaces a word-piece decoder inserts."""
    t = text.strip().replace("( '", "('").replace("' )", "')")
    if t.startswith(REWRITE_OPEN) and t.endswith(REWRITE_CLOSE) and len(t) >= 4:
        return t[2:-2].strip()
    return t or None


def nll(logits: torch.Tensor, y: torch.Tensor, temperature: float) -> float:
    return float(torch.nn.functional.cross_entropy(logits / temperature, y))


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Temperature minimising dev NLL (Guo et al., 2017): a log-spaced grid, then a finer one."""
    grid = [math.exp(x / 20) for x in range(-40, 61)]
    best = min(grid, key=lambda t: nll(logits, y, t))
    fine = [best * math.exp(x / 400) for x in range(-20, 21)]
    return min(fine, key=lambda t: nll(logits, y, t))
