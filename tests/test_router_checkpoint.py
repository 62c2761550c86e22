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


def test_reproduces_model_card_dev_figures(router: FunctionalTokenRouter, metrics: dict) -> None:
    card = metrics["dev"]
    rows = read_jsonl(DEV)
    got = evaluate(router, rows, latency_n=0)
    assert got["n"] == card["n"] == len(rows)
    same = sum(a == b for a, b in zip(got["predictions"], card["predictions"], strict=True))
    assert same >= len(rows) - 2, f"{len(rows) - same} dev predictions changed"
    assert abs(got["correct"] - card["correct"]) <= 2
    assert got["macro_f1"] == pytest.approx(card["macro_f1"], abs=0.0015)
    assert f"{card['macro_f1']:.4f}" in (CHECKPOINT / "MODEL_CARD.md").read_text()


def test_routes_conversations_sensibly(router: FunctionalTokenRouter) -> None:
    convs = {
        "code": "How do I reverse a linked list in Python?",
        "math": "What is the derivative of sin(x) * x^2?",
        "legal": "Can my employer fire me for joining a union?",
        "finance": "Should I pay off my mortgage early or invest in index funds?",
        "general": "What is the capital of Australia?",
    }
    res = router.route_batch([[Message("user", q)] for q in convs.values()])
    assert [r.top[0] for r in res] == list(convs)
    for r in res:
        assert sum(r.probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert select_experts(r.probs, router.tau, router.mass)
    # The latest user turn decides, even after an unrelated earlier exchange.
    conv = [Message("user", "Write a SQL query that counts orders per customer."), Message("assistant", "SELECT …"),
            Message("user", "Thanks. Separately, what is the integral of 1/x?")]
    assert router.route(conv).top[0] == "math"


def test_eval_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sample = tmp_path / "few.jsonl"
    sample.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(DEV)[::100]))
    assert eval_main(["--data", str(sample), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"accuracy", "macro_f1", "ece", "p50_ms", "p99_ms", "n"} and out["n"] == 15
