"""Conversations for training and judging the router on its two multi-turn cases.

* **follow-up**: the latest user turn is generic ("explain step by step", "why?") and only makes sense after
  the earlier exchange; the conversation's domain must win.
* **switch**: the latest user turn is a self-contained question about another domain ("thanks — and who
  wrote Hamlet?" after a math exchange); the latest turn must win.

The routing data has single-turn queries only, so conversations are built from them: an earlier user turn
(a labelled query), an assistant turn (a neutral reply, or the head of another query of the same domain
standing in for an answer in that domain's words), then the latest turn. Training and evaluation draw their
generic follow-ups from two disjoint lists, so an evaluation never sees a phrasing the router trained on.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from router_model.interface import Message

TRAIN_FOLLOW_UPS = (
    "Can you explain that step by step?", "why?", "Give me an example.", "Can you elaborate?",
    "I don't understand, can you simplify?", "What about the second part?", "Are you sure?", "continue",
    "Explain it like I'm five.", "can you make it shorter", "What does that mean?", "ok and then?",
    "Could you go into more detail?", "Thanks! Can you summarize the key points?", "Is there another way?",
    "What would you recommend?", "hmm, that doesn't look right", "Can you double-check that?",
    "Show me how you got that.", "and if it were the other way around?", "What are the exceptions?",
    "more", "Go on.", "Can you rewrite that more formally?", "What's the first step?", "So what should I do?",
    "Please clarify the last point.", "Can you give a real-world example?", "wait, what?", "Why is that?",
    "Could you list the steps?", "And what happens next?", "Try again please.", "Can you put that in a table?",
    "What are the pros and cons?", "ok thanks, anything else I should know?", "Explain the reasoning.",
    "How would that change if the numbers were bigger?", "What did you assume there?", "Can you be more precise?",
)
# Held out from training: the phrasings the conversation evaluation uses.
EVAL_FOLLOW_UPS = (
    "Could you walk me through it in detail?", "I'm confused. Say it differently?", "Why does that work?",
    "Can you show another example?", "What's the catch?", "Expand on that, please.", "Is that always true?",
    "Keep going.", "Summarize that in one sentence.", "How did you get there?", "What would you do next?",
    "Explain step by step.", "Can you check your answer?", "And in simpler terms?", "What if I change one detail?",
)
ASSISTANT_REPLIES = (
    "Sure.", "Here is how it works.", "Good question. Let me explain.", "Certainly, here's an overview.",
    "Happy to help.", "Let's go through it.", "The short answer is: it depends.", "Here's what I found.",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant.", "You are a helpful, concise assistant. Answer clearly.",
    "You are ChatGPT, a large language model. Be helpful and honest.", "Answer the user's questions accurately.",
)


def assistant_turn(same_label: Sequence[dict[str, Any]], rng: random.Random) -> str:
    """A neutral reply, or the head of a same-domain query standing in for an answer in that domain's words."""
    if same_label and rng.random() < 0.5:
        return " ".join(rng.choice(same_label)["text"].split()[:20])
    return rng.choice(ASSISTANT_REPLIES)


def follow_up(row: dict[str, Any], same_label: Sequence[dict[str, Any]], phrasings: Sequence[str],
              rng: random.Random, exchanges: int = 1) -> list[Message]:
    """``row`` asked first; then ``exchanges`` generic follow-ups (the last one is the turn to route)."""
    msgs = [Message("user", row["text"]), Message("assistant", assistant_turn(same_label, rng))]
    for _ in range(exchanges - 1):
        msgs += [Message("user", rng.choice(phrasings)), Message("assistant", assistant_turn(same_label, rng))]
    return [*msgs, Message("user", rng.choice(phrasings))]


def switch(row: dict[str, Any], earlier: dict[str, Any], earlier_same: Sequence[dict[str, Any]],
           rng: random.Random) -> list[Message]:
    """An exchange about ``earlier`` (another domain), then ``row`` as a self-contained new question."""
    return [Message("user", earlier["text"]), Message("assistant", assistant_turn(earlier_same, rng)),
            Message("user", row["text"])]


def by_label(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["label"], []).append(r)
    return out


def evaluation_conversations(rows: Sequence[dict[str, Any]], seed: int = 0,
                             n: int | None = None) -> list[dict[str, Any]]:
    """Both cases built from ``rows`` (queries the router never trained on) with held-out follow-up phrasings:
    ``{"messages": [{"role", "content"}, …], "label", "kind": "follow_up" | "switch"}``, one of each per row
    (of the first ``n`` rows, when given)."""
    rng = random.Random(seed)
    groups = by_label(rows)
    out: list[dict[str, Any]] = []
    for row in list(rows)[:n]:
        others = [r for lab, rs in groups.items() if lab != row["label"] for r in rs]
        cases = [("follow_up", follow_up(row, groups[row["label"]], EVAL_FOLLOW_UPS, rng, rng.choice((1, 1, 2))))]
        if others:
            earlier = rng.choice(others)
            cases.append(("switch", switch(row, earlier, groups[earlier["label"]], rng)))
        for kind, msgs in cases:
            out.append({"messages": [{"role": m.role, "content": m.content} for m in msgs], "label": row["label"],
                        "kind": kind})
    return out


def as_messages(row: dict[str, Any]) -> list[Message]:
    """A ``{"messages": [...]}`` row (OpenAI chat shape; text parts joined) as router messages."""
    out = []
    for m in row["messages"]:
        content = m.get("content") or ""
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append(Message(m["role"], content))
    return out
