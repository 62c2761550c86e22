"""Next-token log-probabilities from each kind of expert, behind one small interface.

``local`` experts give exact full-vocabulary log-probs from the in-process model (run in a thread).
``vllm`` experts are asked over HTTP: ``/tokenize`` for chat-template ids, ``/v1/completions`` with a
token-id prompt and ``max_tokens: 1`` for the top-k, ``logprob_token_ids`` for exact log-probs of named
ids, greedy multi-token drafts and ``echo`` scoring for speculative fusion.

Vocabulary fingerprint: a hash of how the source tokenises a fixed probe (ASCII, accented and CJK text,
an emoji, digits, code, special-token strings as text) and a fixed two-message chat through its chat
template. Both backends compute it the same way (vLLM via ``/tokenize``), so it proves the things
fusion relies on: same ids for the same text, and the same prompt ids for a conversation.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from weakref import WeakKeyDictionary

import httpx
import numpy as np
import orjson

from gateway.experts.base import JSON, Endpoint, Expert, UpstreamError
from gateway.fusion.math import Array

log = logging.getLogger("octoroute.fusion")

PROBE_TEXT = (
    "Octoroute probe 1: The quick brown fox; naïve café, Übermaß, 東京タワー, 🚀 ±√π.\n"
    "0123456789 3.14159 -42 1e-9 $1,234.56 50%\n"
    "def f(x: int) -> int:\n\treturn x ** 2  # code {}[]()<>\n"
    "<|im_start|><|im_end|><|endoftext|></s><s>[INST]"
)
PROBE_MESSAGES: list[JSON] = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 2? Répondez, s'il vous plaît. 数学"},
]
MAX_NAMED_IDS = 128  # vLLM's cap on logprob_token_ids per request
DEFAULT_VOCAB = 32768  # tail imputation's V when a remote tokenizer cannot be loaded here


class FusionInputError(ValueError):
    """A request fusion cannot serve (the gateway answers 400); ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class TopK:
    """One source's next-token distribution at one position: its top-k, plus the full row if exact."""

    ids: list[int]
    lps: list[float]
    bound: float  # no id outside ``ids`` has a larger log-prob
    full: Array | None = None

    def get(self, token: int) -> float | None:
        if self.full is not None:
            return float(self.full[token])
        try:
            return self.lps[self.ids.index(token)]
        except ValueError:
            return None


def eos_from_dir(path: Path) -> set[int]:
    """EOS ids a model directory declares (config.json and generation_config.json)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        try:
            value = json.loads((path / name).read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError):
            continue
        ids.update(value if isinstance(value, list) else [value] if isinstance(value, int) else [])
    return ids


def _hash(text_ids: Sequence[int], chat_ids: Sequence[int]) -> str:
    return hashlib.sha256(orjson.dumps({"text": list(text_ids), "chat": list(chat_ids)})).hexdigest()[:16]


class LogprobSource(ABC):
    """One expert seen as a next-token distribution oracle."""

    def __init__(self, expert: Expert) -> None:
        self.expert = expert
        self.name = expert.name
        self.eos_ids: set[int] = set()
        self._fingerprint: str | None = None

    async def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = await self._compute_fingerprint()
        return self._fingerprint

    @abstractmethod
    async def _compute_fingerprint(self) -> str: ...

    @abstractmethod
    async def prompt_ids(self, endpoint: Endpoint, body: JSON) -> list[int]:
        """The prompt as token ids (chat: through the chat template, generation prompt added)."""

    @abstractmethod
    async def top(self, ids: Sequence[int], k: int) -> TopK:
        """Top-k (or the full row) of the next-token distribution after ``ids``."""

    @abstractmethod
    async def exact(self, ids: Sequence[int], candidates: Sequence[int]) -> Array:
        """Exact log-probs of ``candidates`` after ``ids``; NaN where the server gave none (tail imputed)."""

    @abstractmethod
    async def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids (special tokens skipped), for incremental detokenisation."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...


def _completion_prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1:
        return _completion_prompt(prompt[0])
    raise FusionInputError("fusion serves one prompt per request (a string or a list of token ids)", "prompt")


@runtime_checkable
class LocalModel(Protocol):
    """What a ``local`` expert (``gateway/experts/local.py``) offers fusion."""

    tokenizer: Any
    eos_ids: set[int]

    def next_token_logprobs(self, token_ids: list[int]) -> Any: ...

    def tokenize_chat(self, messages: list[JSON]) -> list[int]: ...


class LocalSource(LogprobSource):
    """Exact full-vocabulary log-probs from an in-process model; forward passes run in a worker thread."""

    def __init__(self, expert: Expert) -> None:
        super().__init__(expert)
        assert isinstance(expert, LocalModel)
        self.model: LocalModel = expert
        self.tokenizer = expert.tokenizer
        self.eos_ids = set(expert.eos_ids)

    async def _compute_fingerprint(self) -> str:
        text_ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        chat_ids = await asyncio.to_thread(self.model.tokenize_chat, PROBE_MESSAGES)
        return _hash(text_ids, chat_ids)

    async def prompt_ids(self, endpoint: Endpoint, body: JSON) -> list[int]:
        if endpoint == "chat":
            return list(await asyncio.to_thread(self.model.tokenize_chat, body["messages"]))
        prompt = _completion_prompt(body.get("prompt"))
        return prompt if isinstance(prompt, list) else list(self.tokenizer(prompt)["input_ids"])

    async def top(self, ids: Sequence[int], k: int) -> TopK:
        raw = await asyncio.to_thread(self.model.next_token_logprobs, list(ids))
        full = np.asarray(raw.float().numpy() if hasattr(raw, "numpy") else raw, dtype=np.float64).reshape(-1)
        best = np.argsort(-full, kind="stable")[:k]
        return TopK([int(i) for i in best], [float(full[i]) for i in best], float(full[best[-1]]), full)

    async def exact(self, ids: Sequence[int], candidates: Sequence[int]) -> Array:
        row = await self.top(ids, 1)
        assert row.full is not None
        return row.full[np.asarray(candidates, dtype=np.int64)]

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    async def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


def _token_id(key: str) -> int:
    return int(key.rsplit(":", 1)[1])


def _as_topk(entry: dict[str, float] | None, k: int) -> TopK:
    """Parse one position; vLLM adds the chosen/prompt token to the top-k, so the bound is the k-th value."""
    if not entry:
        raise UpstreamError("protocol", "vLLM returned no log-probs for a position", 502)
    lps = [float(v) for v in entry.values()]
    return TopK([_token_id(key) for key in entry], lps, sorted(lps, reverse=True)[min(k, len(lps)) - 1])


class VllmSource(LogprobSource):
    """Log-probs from a vLLM server over its OpenAI API (the expert's pooled client and headers)."""

    def __init__(self, expert: Expert) -> None:
        super().__init__(expert)
        from gateway.experts.vllm import VllmExpert

        assert isinstance(expert, VllmExpert)
        self.client = expert.client
        self.timeout_s = expert.config.timeouts.idle_s
        self.root = str(self.client.base_url).rstrip("/").removesuffix("/v1")
        self._tokenizer: Any = None
        self._local_chat = False
        self._setup: asyncio.Task[None] | None = None

    async def _post(self, url: str, payload: JSON) -> JSON:
        from gateway.experts.vllm import _error_from_response

        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self.client.post(url, content=orjson.dumps(payload))
        except TimeoutError:
            raise UpstreamError("timeout", f"expert {self.name} did not answer in {self.timeout_s:g}s", 504) from None
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise UpstreamError("connect", f"cannot reach expert {self.name}: {exc!r}", 502) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError("protocol", f"expert {self.name}: {exc!r}", 502) from exc
        if response.status_code >= 400:
            raise _error_from_response(response.status_code, response.content)
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError("protocol", f"expert {self.name} sent invalid JSON", 502) from exc
        if not isinstance(data, dict):
            raise UpstreamError("protocol", f"expert {self.name} sent a non-object response", 502)
        return data

    async def ensure_ready(self) -> None:
        """Once: find the served model's directory; if readable here, take EOS ids and a local tokenizer."""
        if self._setup is None:
            self._setup = asyncio.ensure_future(self._load_model_info())
        await asyncio.shield(self._setup)

    async def _load_model_info(self) -> None:
        try:
            response = await self.client.get("/models", timeout=self.timeout_s)
            models = response.json().get("data", [])
        except (httpx.HTTPError, ValueError):
            return
        root = next((m.get("root") for m in models if m.get("id") == self.expert.served_model), None)
        path = Path(root) if isinstance(root, str) else None
        if path is not None and (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            self.eos_ids |= eos_from_dir(path)
            self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
            if self._tokenizer.eos_token_id is not None:
                self.eos_ids.add(self._tokenizer.eos_token_id)

    async def _complete(self, payload: JSON) -> JSON:
        body = {"model": self.expert.served_model, "return_tokens_as_token_ids": True, "temperature": 0.0,
                "skip_special_tokens": False, **payload}
        data = await self._post("/completions", body)
        try:
            choice: JSON = data["choices"][0]
            if not choice["logprobs"]["top_logprobs"]:
                raise KeyError("top_logprobs")
        except (KeyError, IndexError, TypeError) as exc:
            raise UpstreamError("protocol", f"expert {self.name} answered without log-probs", 502) from exc
        if choice.get("finish_reason") == "stop" and choice.get("stop_reason") is None:
            self.eos_ids.add(_token_id(choice["logprobs"]["tokens"][-1]))  # it stopped on an EOS id
        return choice

    async def _compute_fingerprint(self) -> str:
        await self.ensure_ready()
        model = self.expert.served_model
        text, chat = await asyncio.gather(
            self._post(f"{self.root}/tokenize", {"model": model, "prompt": PROBE_TEXT, "add_special_tokens": False}),
            self._post(f"{self.root}/tokenize", {"model": model, "messages": PROBE_MESSAGES,
                                                 "add_generation_prompt": True}),
        )
        # The server's own tokenizer files are readable here and template the probe identically: chat prompts
        # of plain-text messages can be tokenised in-process, one round trip fewer per request.
        self._local_chat = self._tokenizer is not None and self._template(PROBE_MESSAGES) == chat["tokens"]
        return _hash(text["tokens"], chat["tokens"])

    def _template(self, messages: list[JSON]) -> list[int]:
        text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    async def prompt_ids(self, endpoint: Endpoint, body: JSON) -> list[int]:
        await self.ensure_ready()
        model = self.expert.served_model
        if endpoint == "chat":
            if self._local_chat and all(isinstance(m.get("content"), str) for m in body["messages"]):
                return self._template(body["messages"])
            data = await self._post(f"{self.root}/tokenize", {"model": model, "messages": body["messages"],
                                                               "add_generation_prompt": True})
            return [int(t) for t in data["tokens"]]
        prompt = _completion_prompt(body.get("prompt"))
        if isinstance(prompt, list):
            return prompt
        data = await self._post(f"{self.root}/tokenize", {"model": model, "prompt": prompt})
        return [int(t) for t in data["tokens"]]

    async def top(self, ids: Sequence[int], k: int) -> TopK:
        choice = await self._complete({"prompt": list(ids), "max_tokens": 1, "logprobs": k})
        return _as_topk(choice["logprobs"]["top_logprobs"][0], k)

    async def exact(self, ids: Sequence[int], candidates: Sequence[int]) -> Array:
        chunks = [list(candidates[i : i + MAX_NAMED_IDS]) for i in range(0, len(candidates), MAX_NAMED_IDS)]
        choices = await asyncio.gather(*(
            self._complete({"prompt": list(ids), "max_tokens": 1, "logprobs": len(c), "logprob_token_ids": c})
            for c in chunks))
        values: dict[int, float] = {}
        for choice in choices:
            row = _as_topk(choice["logprobs"]["top_logprobs"][0], 1)
            values.update(zip(row.ids, row.lps, strict=True))
        return np.array([values.get(c, np.nan) for c in candidates], dtype=np.float64)

    async def draft(self, ids: Sequence[int], n: int, k: int) -> tuple[list[int], list[TopK]]:
        """Up to ``n`` greedy tokens in one call, each with the top-k it was chosen from."""
        choice = await self._complete({"prompt": list(ids), "max_tokens": n, "logprobs": k})
        lp = choice["logprobs"]
        return [_token_id(t) for t in lp["tokens"]], [_as_topk(e, k) for e in lp["top_logprobs"]]

    async def score(self, ids: Sequence[int], tail: Sequence[int], k: int) -> list[TopK]:
        """Top-k at each position of ``tail``, each with the tail token's exact log-prob (prompt scoring)."""
        choice = await self._complete({"prompt": [*ids, *tail], "max_tokens": 1, "logprobs": k, "echo": True})
        rows = choice["logprobs"]["top_logprobs"]
        return [_as_topk(e, k) for e in rows[len(ids) : len(ids) + len(tail)]]

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer) if self._tokenizer is not None else DEFAULT_VOCAB

    async def decode(self, ids: Sequence[int]) -> str:
        await self.ensure_ready()
        if self._tokenizer is not None:
            return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))
        data = await self._post(f"{self.root}/detokenize", {"model": self.expert.served_model, "tokens": list(ids)})
        return str(data["prompt"])


_SOURCES: WeakKeyDictionary[Expert, LogprobSource] = WeakKeyDictionary()


def source_for(expert: Expert) -> LogprobSource | None:
    """The (cached) log-prob source of an expert, or None when its backend cannot take part in fusion."""
    source = _SOURCES.get(expert)
    if source is None:
        from gateway.experts.vllm import VllmExpert

        if isinstance(expert, VllmExpert):
            source = VllmSource(expert)
        elif isinstance(expert, LocalModel):
            source = LocalSource(expert)
        else:
            return None
        _SOURCES[expert] = source
    return source
