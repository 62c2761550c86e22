"""The shipped checkpoint: loads through ``load_router(None, …)`` and reproduces its model card on dev."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router_model import CHECKPOINT, Message, load_router, select_experts
from router_model.eval import evaluate, read_jsonl
from router_model.eval import main as eval_main
from router_model.router import FunctionalTokenRouter
from router_model.train import DEFAULT_DATA

DEV = DEFAULT_DATA / "dev.jsonl"

HAND_WRITTEN = {
    "math": [
        "What is the derivative of sin(x) * x^2?", "Solve for x: 2x^2 - 8 = 0", "What is 17% of 240?",
        "Prove that the square root of 2 is irrational.", "How many ways can I arrange 5 books on a shelf?",
        "Find the eigenvalues of [[2,1],[1,2]].", "If a train travels 60 miles in 1.5 hours, what is its speed?",
        "What's the probability of rolling two sixes?", "integrate e^x cos x dx", "Is 221 a prime number?",
    ],
    "code": [
        "How do I reverse a linked list in Python?", "Why does my React component re-render twice?",
        "Write a bash one-liner to count lines in all .py files",
        "What's the difference between a mutex and a semaphore?",
        "Fix this: TypeError: 'NoneType' object is not subscriptable", "How do I center a div with CSS?",
        "Write a SQL query to find the second highest salary", "Explain Rust's borrow checker",
        "git rebase vs merge?", "How to read a JSON file in Go",
    ],
    "legal": [
        "Can my employer fire me for joining a union?", "Is a verbal contract legally binding?",
        "What is the difference between a felony and a misdemeanor?",
        "My landlord won't return my security deposit, what can I do?", "Do I need a lawyer to write a will?",
        "What does 'habeas corpus' mean?", "Can I copyright a recipe?",
        "Is it legal to record a phone call without consent?", "How does fair use work for YouTube videos?",
        "What are my rights if I'm arrested?",
    ],
    "finance": [
        "Should I pay off my mortgage early or invest in index funds?", "What is a Roth IRA?",
        "How do I calculate compound interest on my savings?", "Is it a good time to refinance my car loan?",
        "What does EBITDA mean?", "How are capital gains taxed?", "My card was charged twice for the same purchase",
        "What's the difference between a stock and a bond?", "How much should I keep in an emergency fund?",
        "Explain dollar-cost averaging",
    ],
    "general": [
        "What is the capital of Australia?", "Who painted the Mona Lisa?", "Give me a recipe for banana bread",
        "What's a good name for a golden retriever?", "Write a haiku about autumn", "How tall is Mount Everest?",
        "Recommend a good sci-fi novel", "Why is the sky blue?", "Tell me a joke", "What time zone is Tokyo in?",
    ],
}


@pytest.fixture(scope="module")
def router() -> FunctionalTokenRouter:
    r = load_router(None, threads=1)
    assert isinstance(r, FunctionalTokenRouter)
    return r


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((CHECKPOINT / "metrics.json").read_text())


def test_checkpoint_is_small_and_self_describing(router: FunctionalTokenRouter) -> None:
    size = sum(p.stat().st_size for p in CHECKPOINT.rglob("*") if p.is_file())
    assert size <= 100e6
    cfg = json.loads((CHECKPOINT / "config.json").read_text())
    assert router.labels == tuple(cfg["labels"]) == ("code", "finance", "general", "legal", "math")
    assert 0.5 <= router.tau < 1 and 0.5 <= router.mass < 1 and router.temperature > 0
    assert len(set(cfg["functional_token_ids"])) == len(cfg["labels"])


def test_reproduces_model_card_dev_figures(metrics: dict) -> None:
    """At the precision the card was measured in: ``auto`` picks bf16 or int8 by CPU, and they differ on a few rows."""
    card = metrics["dev"]
    rows = read_jsonl(DEV)
    router = FunctionalTokenRouter.load(CHECKPOINT, threads=1, precision=metrics["served_precision"])
    got = evaluate(router, rows, latency_n=0)
    assert got["n"] == card["n"] == len(rows)
    same = sum(a == b for a, b in zip(got["predictions"], card["predictions"], strict=True))
    assert same >= len(rows) - 2, f"{len(rows) - same} dev predictions changed"
    assert abs(got["correct"] - card["correct"]) <= 2
    assert got["macro_f1"] == pytest.approx(card["macro_f1"], abs=0.0015)
    assert f"{card['macro_f1']:.4f}" in (CHECKPOINT / "MODEL_CARD.md").read_text()


def test_routes_hand_written_queries_from_no_dataset(router: FunctionalTokenRouter) -> None:
    """Queries written for this test, in styles the training sources rarely use: a small unseen-source check.

    The shipped checkpoint gets 44/50 (its misses are mostly `general` for short conceptual questions; see the
    model card's limitations); the floor catches a retrain that generalises worse.
    """
    convs = [(label, q) for label, qs in HAND_WRITTEN.items() for q in qs]
    res = router.route_batch([[Message("user", q)] for _, q in convs])
    right = sum(r.top[0] == label for r, (label, _) in zip(res, convs, strict=True))
    assert right >= 40, f"{right}/50 hand-written queries routed right"
    for r in res:
        assert sum(r.probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert select_experts(r.probs, router.tau, router.mass)


FOLLOW_UPS = ["Can you explain that in more detail?", "why is that?", "ok, walk me through it step by step",
              "Thanks! What should I do next?"]
EARLIER = {  # a question, and an answer in the words an assistant would use
    "math": ("What is the derivative of x^3 + 2x?", "Using the power rule, the derivative is 3x^2 + 2."),
    "code": ("How do I remove duplicates from a list in Python?", "Convert it to a set, or use dict.fromkeys(lst)."),
    "legal": ("Can my landlord keep my deposit if I leave early?",
              "It depends on your lease and your state's tenancy laws on deposits and early termination."),
    "finance": ("Should I put my savings in a Roth IRA or a 401k?",
                "A 401k with an employer match usually comes first; a Roth IRA grows tax-free."),
    "general": ("Who wrote Pride and Prejudice?", "Jane Austen, in 1813."),
}
SWITCHES = {label: q for label, (q, _) in EARLIER.items()}


def test_follow_ups_inherit_the_conversation_and_new_questions_switch(router: FunctionalTokenRouter) -> None:
    """The two conversation cases (issue 15): a generic follow-up goes to the conversation's expert, even after
    a system prompt and with the domain question two exchanges back; a self-contained question about another
    domain goes to that domain."""
    wrong = []
    for label, (question, answer) in EARLIER.items():
        for follow in FOLLOW_UPS:
            conv = [Message("system", "You are a helpful assistant."), Message("user", question),
                    Message("assistant", answer), Message("user", follow)]
            if router.route(conv).top[0] != label:
                wrong.append(("follow-up", label, follow))
        deep = [Message("user", question), Message("assistant", answer), Message("user", "hmm, are you sure?"),
                Message("assistant", "Yes."), Message("user", "ok, then explain it simply")]
        if router.route(deep).top[0] != label:
            wrong.append(("two exchanges back", label, ""))
        for other, new_question in SWITCHES.items():
            if other == label:
                continue
            conv = [Message("user", question), Message("assistant", answer),
                    Message("user", f"Thanks. Different topic: {new_question}")]
            if router.route(conv).top[0] != other:
                wrong.append(("switch", label, other))
    # 25 follow-ups and 20 switches: at most 10 % wrong
    assert len(wrong) <= 4, wrong
    # With no conversation, a generic follow-up is not pulled to any domain expert with confidence.
    alone = router.route([Message("user", "Can you explain that in more detail?")])
    assert alone.top[0] == "general" or alone.top[1] < router.tau


def test_eval_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sample = tmp_path / "few.jsonl"
    sample.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(DEV)[::100]))
    assert eval_main(["--data", str(sample), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"accuracy", "macro_f1", "ece", "p50_ms", "p99_ms", "n"} and out["n"] == 15


def test_eval_cli_scores_both_conversation_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sample = tmp_path / "few.jsonl"
    rows = read_jsonl(DEV)[::150]
    sample.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert eval_main(["--data", str(sample), "--conversations", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 2 * len(rows) and set(out["per_kind"]) == {"follow_up", "switch"}
    # A conversation file is read as it is, kinds included.
    convs = tmp_path / "convs.jsonl"
    convs.write_text(json.dumps({"messages": [{"role": "user", "content": "Integrate x^2 from 0 to 3."},
                                              {"role": "assistant", "content": "It is 9."},
                                              {"role": "user", "content": "Show me how you got that."}],
                                 "label": "math", "kind": "follow_up"}) + "\n")
    assert eval_main(["--data", str(convs), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 1 and set(out["per_kind"]) == {"follow_up"} and "p50_ms" not in out
