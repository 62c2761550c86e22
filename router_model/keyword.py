"""The documented fallback router: keyword counts, used only when no checkpoint can be loaded.

It exists so the gateway still routes when the model is missing (e.g. a stripped install); the
gateway logs a warning at start-up and reports ``router: keyword`` on ``/ready`` and ``/v1/route``.
It is far less accurate than the functional-token model and is never chosen silently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from router_model.interface import Message, RouteResult

KEYWORDS: dict[str, tuple[str, ...]] = {
    "legal": ("law", "legal", "court", "statute", "contract", "plaintiff", "defendant", "lawyer", "tenant",
              "liable", "liability", "lawsuit", "attorney", "clause", "judge", "rights", "sue", "jurisdiction"),
    "finance": ("bank", "loan", "interest", "stock", "invest", "tax", "revenue", "profit", "account",
                "credit", "debt", "inflation", "dividend", "portfolio", "balance", "mortgage", "card", "money"),
    "math": ("solve", "equation", "integral", "derivative", "prove", "sum", "probability", "number",
             "triangle", "how many", "calculate", "percent", "fraction", "remainder", "polynomial", "x"),
    "code": ("python", "function", "code", "sql", "query", "bug", "error", "compile", "javascript", "list",
             "array", "string", "class", "api", "regex", "bash", "table", "select"),
}
_WORD = re.compile(r"[a-z]+(?: many)?")


class KeywordRouter:
    """Scores each label by keyword hits in the last user turn; `general` when nothing matches."""

    def __init__(self, labels: Sequence[str] = ("legal", "finance", "math", "code", "general")) -> None:
        self.labels = tuple(labels)
        self.tau = 0.5
        self.mass = 0.8

    def _route(self, messages: Sequence[Message]) -> RouteResult:
        last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
        words = set(_WORD.findall(last_user.lower()))
        scores = {label: float(sum(k in words for k in KEYWORDS.get(label, ()))) for label in self.labels}
        if "general" in scores:
            scores["general"] = 0.5
        z = sum(math.exp(s) for s in scores.values())
        return RouteResult(probs={label: math.exp(s) / z for label, s in scores.items()})

    def route_batch(self, conversations: Sequence[Sequence[Message]]) -> list[RouteResult]:
        return [self._route(c) for c in conversations]
