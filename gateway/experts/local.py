"""In-process expert: a Hugging Face causal LM on CPU, for the demo experts and other small models.

The decode loop is written out (not ``model.generate``) so that tokens stream as they are made, a
client disconnect stops the work at the next token, and fusion can ask the same model for
next-token log-probabilities. One generation runs at a time per model, in a worker thread.
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from gateway.config import ExpertConfig
from gateway.experts.base import JSON, Endpoint, Expert, UpstreamError

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (as vLLM does): logits / 1e-30 overflow to NaN
SEEDS = range(-(2**63), 2**64)  # what torch.Generator.manual_seed accepts
# from_pretrained is not thread-safe: loading several models at once from threads left one with an
# untied, uninitialised lm_head (NaN logits, different answers to the same greedy request).
_LOAD_LOCK = threading.Lock()  # the OpenAI (and vLLM) default for /v1/completions


def _bad_request(message: str, param: str | None = None) -> UpstreamError:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return UpstreamError("http_4xx", message, 400, body=body)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    bias: torch.Tensor | None = None  # logit_bias as a dense vector


@dataclass
class Outcome:
    finish_reason: str = "length"
    completion_tokens: int = 0


class Detokenizer:
    """Turns generated ids into text pieces that never end inside a UTF-8 character.

    Each step decodes a short window (a few earlier tokens plus the new ones), as vLLM does: byte-level
    tokens that are only part of a character decode to U+FFFD and are held back until complete, and
    tokenizers that attach spaces to the following token (SentencePiece) keep their spaces.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_ids[-4:])
        self._prefix = 0
        self._read = len(self._ids)

    def _window(self) -> tuple[str, str]:
        decode = self._tok.decode
        return (decode(self._ids[self._prefix : self._read], skip_special_tokens=True),
                decode(self._ids[self._prefix :], skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before, after = self._window()
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character becomes U+FFFD)."""
        before, after = self._window()
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    return max((k for s in stops for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)


def _text_content(content: Any) -> str:
    if isinstance(content, list):  # content parts; only text parts mean anything to a text model
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


class LocalExpert(Expert):
    """Serves a local Hugging Face model directory (``backend: local``) in this process, float32 on CPU."""

    unsupported = frozenset({"n", "tools", "tool_choice", "parallel_tool_calls", "response_format", "logprobs",
                             "top_logprobs", "echo", "suffix", "presence_penalty", "frequency_penalty",
                             "repetition_penalty", "top_k", "min_p"})

    def __init__(self, config: ExpertConfig) -> None:
        path = Path(config.path or "")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"expert {config.name!r}: no Hugging Face model at {path}")
        self.name, self.served_model = config.name, config.served_model
        # One intra-op thread: several experts and the router share this process and its few cores;
        # tiny matrices gain nothing from more, and oversubscribed OpenMP threads stall each other.
        torch.set_num_threads(1)
        with _LOAD_LOCK:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        out_w = cast(torch.Tensor, self.model.lm_head.weight)
        in_w = cast(torch.Tensor, self.model.get_input_embeddings().weight)
        if self.model.config.tie_word_embeddings and out_w.data_ptr() != in_w.data_ptr():
            raise RuntimeError(f"expert {config.name!r}: tied output embeddings did not load as tied; refusing to "
                               "serve a randomly initialised lm_head")
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id} - {None}
        self.max_len = int(self.model.config.max_position_embeddings)
        # transformers 5.2x renamed ``past_key_values`` to ``cache``; the cache is updated in place either way.
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"local-{self.name}")
        self._closing = threading.Event()

    # ---- fusion hooks -------------------------------------------------------------------------------

    def tokenize_chat(self, messages: list[JSON]) -> list[int]:
        """Prompt ids for a conversation, with the assistant turn opened (same as vLLM's /tokenize)."""
        msgs = [{"role": m["role"], "content": _text_content(m.get("content"))} for m in messages]
        text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @torch.no_grad()  # not inference_mode: callers may edit the returned tensor in place
    def next_token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """Full-vocabulary log-softmax (float32) of the token after ``token_ids``. Blocking: call it
        from a thread. Safe beside a running generation, which keeps its own KV cache."""
        logits = self.model(input_ids=torch.tensor([token_ids])).logits[0, -1]
        return torch.log_softmax(logits.float(), dim=-1)

    # ---- request parsing ----------------------------------------------------------------------------

    def _prompt_ids(self, endpoint: Endpoint, body: JSON) -> list[int]:
        if endpoint == "chat":
            try:
                return self.tokenize_chat(body["messages"])
            except Exception as exc:  # template errors (jinja raises its own types)
                raise _bad_request(f"cannot apply the chat template: {exc}", "messages") from exc
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = list(self.tokenizer.encode(prompt))
            if not ids:  # nothing to condition on (vLLM refuses it the same way)
                raise _bad_request("prompt is empty; send at least one character (or token id)", "prompt")
            return ids
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            if not all(0 <= t < len(self.tokenizer) for t in prompt):
                raise _bad_request("prompt token id out of range", "prompt")
            return prompt
        raise _bad_request("prompt must be a string or a list of token ids (one prompt per request)", "prompt")

    def _sampling(self, endpoint: Endpoint, body: JSON, n_prompt: int) -> Sampling:
        if body.get("n") not in (None, 1):
            raise _bad_request("only n=1 is supported", "n")
        for unsupported in ("logprobs", "echo"):
            if body.get(unsupported):
                raise _bad_request(f"{unsupported} is not supported by local experts", unsupported)
        room = self.max_len - n_prompt
        if room <= 0:
            raise _bad_request(f"prompt has {n_prompt} tokens; this model's context is {self.max_len}",
                               "messages" if endpoint == "chat" else "prompt")
        if endpoint == "chat":
            asked = body.get("max_completion_tokens") or body.get("max_tokens")
        else:
            asked = body.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
        if asked is not None and asked > room:
            raise _bad_request(f"max_tokens {asked} + prompt {n_prompt} tokens exceeds the context "
                               f"of {self.max_len}", "max_tokens")
        stop = body.get("stop") or ()
        bias = None
        if body.get("logit_bias"):
            bias = torch.zeros(self.model.config.vocab_size)
            for key, value in body["logit_bias"].items():
                if not (str(key).isdigit() and int(key) < len(bias)):
                    raise _bad_request(f"logit_bias token id {key} out of range", "logit_bias")
                bias[int(key)] = float(value)
        temperature, top_p, seed = body.get("temperature"), body.get("top_p"), body.get("seed")
        if seed is not None and seed not in SEEDS:
            raise _bad_request(f"seed must be between {SEEDS.start} and {SEEDS.stop - 1}", "seed")
        temperature = 1.0 if temperature is None else float(temperature)
        return Sampling(
            max_tokens=room if asked is None else int(asked),
            temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            top_p=1.0 if top_p is None else float(top_p),
            seed=seed,
            stop=tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s),
            bias=bias,
        )

    # ---- decoding (worker thread) ---------------------------------------------------------------------

    @staticmethod
    def _pick(logits: torch.Tensor, p: Sampling, gen: torch.Generator) -> int:
        logits = logits.float() if p.bias is None else logits.float() + p.bias
        if p.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=gen))

    @torch.inference_mode()
    def _decode(self, prompt_ids: list[int], p: Sampling, cancel: threading.Event, out: Outcome,
                emit: Callable[[str], None]) -> None:
        """Generate until EOS, a stop string, max_tokens or cancellation; ``emit`` text as it is safe
        to show (complete characters, no part of a possible stop string)."""
        gen = torch.Generator().manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
        detok = Detokenizer(self.tokenizer, prompt_ids)
        text, sent, cache = "", 0, DynamicCache()
        inputs = torch.tensor([prompt_ids])
        while out.completion_tokens < p.max_tokens and not cancel.is_set():
            if self._closing.is_set():
                raise UpstreamError("internal", f"expert {self.name} shut down", 503, before_first_byte=False)
            logits = self.model(input_ids=inputs, use_cache=True, **{self._cache_arg: cache}).logits
            token = self._pick(logits[0, -1], p, gen)
            out.completion_tokens += 1
            done = token in self.eos_ids or out.completion_tokens == p.max_tokens
            if token in self.eos_ids:
                out.finish_reason = "stop"
            else:
                text += detok.push(token)
            if done:
                text += detok.flush()
            hits = [i for i in (text.find(s, sent) for s in p.stop) if i >= 0]
            if hits:
                text, out.finish_reason, done = text[: min(hits)], "stop", True
            end = len(text) if done else len(text) - _held_back(text, p.stop)
            if end > sent:
                emit(text[sent:end])
                sent = end
            if done:
                return
            inputs = torch.tensor([[token]])

    async def _pieces(self, endpoint: Endpoint, body: JSON, out: Outcome, usage: JSON,
                      before_first_byte: bool) -> AsyncGenerator[str, None]:
        """Run one generation in the worker thread and yield its text pieces. Closing this generator
        (a client disconnect) sets the cancel flag the worker checks before every token.

        A request the model cannot serve is refused before the thread starts (400 naming the field). An
        exception inside the decode loop becomes ``UpstreamError("internal")`` with a generic message:
        its text (torch internals) stays in the logs (``__cause__``), never reaches the client, and it
        does not count against the breaker (``UpstreamError.expert_fault``)."""
        if self._closing.is_set():
            raise UpstreamError("internal", f"expert {self.name} is shut down", 503)
        prompt_ids = self._prompt_ids(endpoint, body)
        params = self._sampling(endpoint, body, len(prompt_ids))
        usage["prompt_tokens"] = len(prompt_ids)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        cancel = threading.Event()

        def emit(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        def work() -> None:
            end: BaseException | None = None
            try:
                self._decode(prompt_ids, params, cancel, out, emit)
            except Exception as exc:
                end = exc
            loop.call_soon_threadsafe(queue.put_nowait, end)

        self._executor.submit(work)
        try:
            while isinstance(item := await queue.get(), str):
                yield item
            if isinstance(item, UpstreamError):
                raise item
            if item is not None:
                raise UpstreamError("internal", f"expert {self.name} failed on this request", 500,
                                    before_first_byte=before_first_byte) from item
        finally:
            cancel.set()
            usage["completion_tokens"] = out.completion_tokens
            usage["total_tokens"] = usage["prompt_tokens"] + out.completion_tokens

    # ---- Expert interface -----------------------------------------------------------------------------

    def _envelope(self, endpoint: Endpoint, chunk: bool) -> JSON:
        prefix, obj = ("chatcmpl-", "chat.completion") if endpoint == "chat" else ("cmpl-", "text_completion")
        if chunk and endpoint == "chat":
            obj += ".chunk"
        return {"id": prefix + secrets.token_hex(12), "object": obj, "created": int(time.time()),
                "model": self.served_model}

    async def generate(self, endpoint: Endpoint, body: JSON, on_first_byte: Callable[[], None] | None = None) -> JSON:
        out, usage = Outcome(), {"prompt_tokens": 0}
        pieces = self._pieces(endpoint, body, out, usage, before_first_byte=True)
        try:
            first = await anext(pieces, None)  # the model is generating (or already done): a healthy expert
            if on_first_byte is not None:
                on_first_byte()
            text = "".join([first or "", *[piece async for piece in pieces]])
        finally:
            await pieces.aclose()  # a cancelled request (client gone) stops the worker at its next token
        if endpoint == "chat":
            choice: JSON = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": out.finish_reason}
        return self._envelope(endpoint, chunk=False) | {"choices": [choice], "usage": usage}

    async def stream(self, endpoint: Endpoint, body: JSON) -> AsyncIterator[JSON]:
        out, usage = Outcome(), {"prompt_tokens": 0}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        pieces = self._pieces(endpoint, body, out, usage, before_first_byte=False)
        head = self._envelope(endpoint, chunk=True) | ({"usage": None} if include_usage else {})  # as OpenAI

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> JSON:
            if endpoint == "chat":
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                choice: JSON = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            choice |= {"logprobs": None, "finish_reason": finish}
            return head | {"choices": [choice]}

        try:
            first = await anext(pieces, None)  # request errors surface here, before any byte is sent
            if endpoint == "chat":
                yield chunk(None, role=True)
            if first is not None:
                yield chunk(first)
                async for piece in pieces:
                    yield chunk(piece)
        finally:
            await pieces.aclose()
        yield chunk(None, out.finish_reason)
        if include_usage:
            yield head | {"choices": [], "usage": dict(usage)}

    async def healthy(self) -> bool:
        return not self._closing.is_set()

    async def aclose(self) -> None:
        """Running and queued generations end with a 503 at their next token; nothing is left waiting."""
        self._closing.set()
        self._executor.shutdown(wait=False)
