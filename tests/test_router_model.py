"""Router model units: prompt building, rewrite format, calibration, metrics, and the two training paths.

The training tests use tiny models (a 1-block MiniLM warm start; a 2-layer Qwen2 with a tokenizer
built here) so the file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from router_model.eval import classification, ece
from router_model.interface import Message, select_experts
from router_model.router import Codec, FunctionalTokenRouter, fit_temperature, parse_rewrite, split_conversation
from router_model.train import augment, calibrate_thresholds, expert_counts
from router_model.train import main as train_main

ROWS = [
    {"text": "What is the statute of limitations for breach of contract?", "label": "legal"},
    {"text": "Can my landlord evict me without notice?", "label": "legal"},
    {"text": "How do I compute the present value of an annuity?", "label": "finance"},
    {"text": "My card payment was declined at the shop.", "label": "finance"},
    {"text": "Solve 3x + 5 = 20 for x.", "label": "math"},
    {"text": "What is the integral of x squared?", "label": "math"},
    {"text": "Write a python function that reverses a list.", "label": "code"},
    {"text": "How do I select distinct rows in SQL?", "label": "code"},
    {"text": "Who wrote the novel War and Peace?", "label": "general"},
    {"text": "Set an alarm for seven tomorrow.", "label": "general"},
]


TINY = ["--extra", "--layers", "1", "--freeze-blocks", "0", "--max-steps", "60", "--eval-every", "60",
        "--batch-size", "10", "--lr", "2e-3", "--no-augment", "--mix", "0", "--latency-n", "3", "--threads", "1",
        "--quiet", "--precision", "fp32"]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_split_conversation_keeps_latest_user_turn_system_prompt_and_turn_heads() -> None:
    conv = [Message("system", "be nice"), Message("user", "one"), Message("assistant", "two"),
            Message("user", "three"), Message("assistant", "four"), Message("user", "latest")]
    query, context = split_conversation(conv, max_turns=2)
    assert query == "latest"
    assert context == "system: be nice\nuser: three\nassistant: four"
    assert split_conversation(conv, max_turns=0) == ("latest", "system: be nice")
    # Serving passes no bound (the gateway has applied router.history_turns): every earlier turn is read.
    assert split_conversation(conv)[1] == "system: be nice\nuser: one\nassistant: two\nuser: three\nassistant: four"
    # Each earlier turn contributes its head, an assistant answer less than a question, so a whole exchange fits.
    long = [Message("user", "Is a verbal contract binding? " + "detail " * 200),
            Message("assistant", "It depends on the jurisdiction. " + "more " * 200), Message("user", "why?")]
    query, context = split_conversation(long)
    user_line, assistant_line = context.split("\n")
    assert query == "why?" and user_line.startswith("user: Is a verbal contract binding?")
    # heads end at the first word boundary past their budget (160 / 80 characters)
    assert len(user_line) <= len("user: ") + 160 + 10 and len(assistant_line) <= len("assistant: ") + 80 + 10


def test_context_has_its_own_budget_and_single_turn_prompts_do_not_change() -> None:
    """A long latest turn must not squeeze out the context a follow-up is routed by (it used to: one budget)."""

    class Chars:
        def __call__(self, texts: list[str], add_special_tokens: bool) -> dict[str, list[list[int]]]:
            return {"input_ids": [[ord(ch) for ch in t if not ch.isspace()] for t in texts]}

    plain = Codec(Chars(), [1], [2], [], 0, 0, max_len=10)
    codec = Codec(Chars(), [1], [2], [], 0, 0, max_len=10, context_len=4, sep_ids=[3])
    assert codec.prompts(["abcdefghijkl"]) == plain.prompts(["abcdefghijkl"]) == [[1, *map(ord, "abcdefgh"), 2]]
    prompt = codec.prompts(["abcdefghijkl"], ["uvwxyz"])[0]
    assert prompt == [1, *map(ord, "wxyz"), 3, *map(ord, "abcdefgh"), 2]  # nearest context kept, query from its start
    assert codec.prompts(["ab"], [""])[0] == [1, ord("a"), ord("b"), 2]  # no context: no separator


def test_training_conversations_teach_both_cases() -> None:
    """Follow-ups keep the earlier query's label (it is the row's own), switches put the row last after another
    label's exchange; plain rows stay single-turn. Counts over many draws match the configured shares."""
    from router_model.conversations import EVAL_FOLLOW_UPS, TRAIN_FOLLOW_UPS, by_label
    from router_model.train import training_conversation

    groups = by_label(ROWS)
    others = {lab: [r for r in ROWS if r["label"] != lab] for lab in groups}
    rng = random.Random(0)
    kinds = {"single": 0, "follow_up": 0, "switch_other": 0, "switch_same": 0}
    for _ in range(2000):
        row = rng.choice(ROWS)
        msgs = [m for m in training_conversation(row, groups, others, rng, mix=0.3, follow=0.2) if m.role != "system"]
        users = [m.content for m in msgs if m.role == "user"]
        if len(msgs) == 1:
            kinds["single"] += 1
        elif users[-1] in TRAIN_FOLLOW_UPS:
            assert users[0] == row["text"] and all(u in TRAIN_FOLLOW_UPS for u in users[1:])
            assert not set(users) & set(EVAL_FOLLOW_UPS)
            kinds["follow_up"] += 1
        else:
            assert users[-1] == row["text"]
            earlier = next(r for r in ROWS if r["text"] == users[0])
            kinds["switch_same" if earlier["label"] == row["label"] else "switch_other"] += 1
    assert 0.17 < kinds["follow_up"] / 2000 < 0.23 and 0.27 < kinds["switch_other"] / 2000 < 0.33
    assert 0.03 < kinds["switch_same"] / 2000 < 0.07 and kinds["single"] > 800


def test_family_balance_weights_draw_families_as_asked() -> None:
    from router_model.train import family_weights

    rows = [{"source": "big/x"}] * 90 + [{"source": "small/y"}] * 10
    for alpha, big_share in [(1.0, 0.9), (0.5, 0.75), (0.0, 0.5)]:
        w = family_weights(rows, alpha)
        assert sum(w[:90]) / sum(w) == pytest.approx(big_share)
    # sgd_dialogue conversations count as the sgd family they come from
    assert family_weights([{"source": "sgd/a"}, {"source": "sgd_dialogue/b"}], 0.0) == [0.5, 0.5]


def test_select_experts_and_threshold_calibration() -> None:
    probs = [{"a": 0.95, "b": 0.05}, {"a": 0.55, "b": 0.45}, {"a": 0.9, "b": 0.1}]
    tau, mass = calibrate_thresholds(probs, ["a", "b", "a"])
    assert tau == 0.56  # the 0.55 decision is wrong, so single-expert routing starts above it
    assert select_experts(probs[1], tau, mass) == ["a", "b"]
    assert select_experts(probs[0], tau, mass) == ["a"]
    # The targets are what the policy is fitted to: a looser single-expert precision lowers tau.
    assert calibrate_thresholds(probs, ["a", "b", "a"], precision=0.6)[0] == 0.5


def test_mass_is_calibrated_on_the_rows_the_set_rule_decides() -> None:
    """A confidently wrong row cannot be fixed by a bigger set; it must not push mass to the fallback."""
    probs = [{"a": 0.99, "b": 0.01, "c": 0.0}] * 197 + [{"a": 0.6, "b": 0.3, "c": 0.1},
                                                        {"a": 0.995, "b": 0.005, "c": 0.0}]
    tau, mass = calibrate_thresholds(probs, ["a"] * 197 + ["b", "b"], precision=0.99, coverage=0.995)
    assert tau == 0.61
    assert mass == 0.61  # {a, b} holds the unsure row's gold; 0.999 would also take c
    assert select_experts(probs[197], tau, mass) == ["a", "b"]
    counts = expert_counts(probs, ["a"] * 197 + ["b", "b"], tau, mass)
    assert counts["multi"] == 1 / 199 and counts["mean_experts_when_multi"] == 2
    assert counts["set_contains_gold"] == 198 / 199


def test_fit_temperature_recovers_a_known_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    true = torch.randn(4000, 5, generator=g)
    y = torch.multinomial(torch.softmax(true, -1), 1, generator=g).squeeze(1)
    assert fit_temperature(true * 3.0, y) == pytest.approx(3.0, rel=0.1)


def test_metrics_on_a_known_example() -> None:
    m = classification(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert m["accuracy"] == 0.75
    assert m["per_label"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["confusion"]["a"]["b"] == 1
    assert ece([1.0, 1.0], [True, False]) == pytest.approx(0.5)


def test_augment_strips_options_and_is_seeded() -> None:
    import random

    text = "Which clause applies?\n\nA. one\nB. two\nC. three\nD. four"
    outs = {augment(text, random.Random(s)) for s in range(40)}
    assert any("A. one" not in o for o in outs) and any("A. one" in o for o in outs)
    assert augment(text, random.Random(1)) == augment(text, random.Random(1))


def test_parse_rewrite() -> None:
    assert parse_rewrite("( ' tenant rights on eviction ' )") == "tenant rights on eviction"
    assert parse_rewrite("('x')") == "x"


def test_native_training_with_rewrites_end_to_end(tmp_path: Path) -> None:
    """Octopus v4 format: the router must decode ``<nexa_i>('rewrite')<nexa_end>`` it was trained on."""
    rows = [{**r, "rewrite": f"{r['label']} question"} for r in ROWS]
    data = write_jsonl(tmp_path / "rw.jsonl", rows)
    out = tmp_path / "ckpt"
    train_main(["--train", str(data), "--dev", str(data), "--out", str(out), *TINY])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rewrite"] is True and cfg["labels"] == ["code", "finance", "general", "legal", "math"]
    router = FunctionalTokenRouter.load(out, threads=1)
    target = router.codec.target(cfg["labels"].index("legal"), "legal question")
    tokens = router.codec.tokenizer.convert_ids_to_tokens(target)
    assert tokens[0] == "<nexa_3>" and tokens[-1] == "<nexa_end>"
    assert parse_rewrite(router.codec.tokenizer.decode(target[1:-1])) == "legal question"
    res = router.route([Message("user", ROWS[0]["text"])])
    assert res.top[0] == "legal"
    assert res.rewrite == "legal question"
    assert abs(sum(res.probs.values()) - 1) < 1e-5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dev"]["accuracy"] == 1.0
    assert (out / "MODEL_CARD.md").read_text().startswith("# Octoroute router")


def test_patience_zero_trains_every_step_and_keeps_the_last_weights(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "ckpt"
    train_main(["--train", str(data), "--dev", str(data), "--out", str(out), *TINY, "--eval-every", "20",
                "--patience", "0"])
    train = json.loads((out / "metrics.json").read_text())["train"]
    assert [h["step"] for h in train["history"]] == [20, 40, 60]
    assert train["steps"] == train["best_step"] == 60


def test_distillation_follows_the_teacher_and_refuses_a_mismatched_one(tmp_path: Path) -> None:
    """With --kd-alpha 1 only the teacher's expert distribution is learnt: a teacher trained on permuted labels
    must win over the rows' own labels. A teacher with other labels is refused with a clear message."""
    perm = {"legal": "finance", "finance": "math", "math": "code", "code": "general", "general": "legal"}
    permuted = write_jsonl(tmp_path / "permuted.jsonl", [{**r, "label": perm[r["label"]]} for r in ROWS])
    true = write_jsonl(tmp_path / "true.jsonl", ROWS)
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    train_main(["--train", str(permuted), "--dev", str(permuted), "--out", str(teacher), *TINY])
    train_main(["--train", str(true), "--dev", str(true), "--out", str(student), "--teacher", str(teacher),
                "--kd-alpha", "1", *TINY])
    router = FunctionalTokenRouter.load(student, threads=1)
    routed = [router.route([Message("user", r["text"])]).top[0] for r in ROWS]
    assert sum(p == perm[r["label"]] for p, r in zip(routed, ROWS, strict=True)) >= 9

    cfg = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**cfg, "labels": [*cfg["labels"][:4], "medical"]}))
    with pytest.raises(SystemExit, match="labels differ"):
        train_main(["--train", str(true), "--dev", str(true), "--out", str(tmp_path / "x"), "--teacher",
                    str(teacher), *TINY])


def _byte_bpe(texts: list[str]) -> Any:
    """A byte-level BPE tokenizer (the GPT-2 / Qwen family) trained on ``texts``: no hub access needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def _tiny_hf_model(path: Path, texts: list[str]) -> None:
    """A 2-layer Qwen2 and a byte-level BPE tokenizer trained on ``texts``: no hub access needed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _byte_bpe(texts)
    tok.save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=1, eos_token_id=2, bos_token_id=None)
    Qwen2ForCausalLM(cfg).save_pretrained(str(path))


def test_hf_base_path_learns_labels_from_data_including_a_sixth_expert(tmp_path: Path) -> None:
    """``--base`` fine-tunes any local causal LM; a new label in the data is a new functional token."""
    rows = [*ROWS, {"text": "What are the side effects of ibuprofen?", "label": "medical"},
            {"text": "Is a fever of 39 degrees dangerous for a child?", "label": "medical"}]
    data = write_jsonl(tmp_path / "six.jsonl", rows)
    base = tmp_path / "base"
    _tiny_hf_model(base, [r["text"] for r in rows] * 3)
    out = tmp_path / "ckpt"
    train_main(["--base", str(base), "--train", str(data), "--dev", str(data), "--extra", "--out", str(out),
                "--max-steps", "80", "--eval-every", "40", "--patience", "5", "--batch-size", "12", "--lr", "3e-3",
                "--no-augment", "--mix", "0", "--latency-n", "3", "--threads", "1", "--quiet"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"] == "hf" and len(cfg["labels"]) == 6 and "medical" in cfg["labels"]
    assert len(set(cfg["functional_token_ids"])) == 6 and cfg["end_token_id"] not in cfg["functional_token_ids"]
    router = FunctionalTokenRouter.load(out, threads=1)
    res = router.route_batch([[Message("user", r["text"])] for r in rows])
    acc = sum(r.top[0] == row["label"] for r, row in zip(res, rows, strict=True)) / len(rows)
    assert acc >= 0.9, acc
    assert all(abs(sum(r.probs.values()) - 1) < 1e-5 for r in res)


def test_route_batch_is_thread_safe(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "ckpt"
    train_main(["--train", str(data), "--dev", str(data), "--out", str(out), "--extra", "--layers", "1",
                "--max-steps", "2", "--latency-n", "0", "--threads", "1", "--quiet"])
    router = FunctionalTokenRouter.load(out, threads=1)
    convs = [[Message("user", "earlier question"), Message("assistant", "ok"), Message("user", r["text"])]
             for r in ROWS]
    expected = [r.probs for r in router.route_batch(convs)]
    results: list[list[dict[str, float]]] = []

    def work() -> None:
        for _ in range(3):
            results.append([r.probs for r in router.route_batch(convs)])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12
    for got in results:
        for g, e in zip(got, expected, strict=True):
            assert g == pytest.approx(e, abs=1e-5)


def _two_family_corpus(tmp_path: Path) -> Path:
    """A toy data folder for LOSO: ROWS split into source families alpha and beta, each row twice."""
    families = {"alpha": ROWS[:5], "beta": ROWS[5:]}
    rows = [{**r, "id": f"{fam}-{i}-{k}", "source": f"{fam}/x", "text": f"{r['text']} ({k})"}
            for fam, rs in families.items() for i, r in enumerate(rs) for k in range(2)]
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "dev.jsonl", rows)
    return data


def test_loso_holds_out_whole_sources_and_reports_only_finished_folds(tmp_path: Path) -> None:
    """Per-source LOSO on a toy corpus: every family is a fold, all models are scored on the same held-out rows."""
    from router_model.loso import main as loso_main

    data = _two_family_corpus(tmp_path)
    args = ["--data", str(data), "--extra", "--checkpoint", str(tmp_path / "none"), "--folds", "per-source",
            "--min-rows", "5", "--per-source", "4", "--embed-train", "0", "--threads", "1", "--set", "layers=1",
            "max_steps=2", "es_dev=10", "latency_n=0"]
    out = tmp_path / "loso.json"
    assert loso_main([*args, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["folds"] == [["alpha"], ["beta"]] and res["n"] == 8
    assert set(res["models"]) == {"functional-token router", "tf-idf + LR", "MiniLM embeddings + LR (20 train rows)"}
    for summary in res["models"].values():
        assert set(summary["per_source"]) == {"alpha", "beta"}
        assert sum(summary["predicted"].values()) == 8
    assert res["recipe"]["layers"] == 1 and res["recipe"]["max_steps"] == 2

    # A deadline that has already passed starts no router fold: nothing is reported as done.
    late = tmp_path / "late.json"
    assert loso_main([*args, "--no-baselines", "--deadline", "1e-9", "--out", str(late)]) == 0
    res = json.loads(late.read_text())
    assert res["folds"] == [] and res["models"] == {} and res["note"].startswith("Per-source LOSO: 0 of 2 folds")


def test_grouped_folds_hold_every_family_out_once_and_keep_every_label_in_training() -> None:
    from router_model.loso import grouped_folds

    sizes = {"big": {"legal": 50, "general": 50}, "law": {"legal": 40}, "tax": {"finance": 30, "legal": 5},
             "bank": {"finance": 30}, "qa": {"general": 20}, "tiny": {"math": 3}}
    rows = [{"label": lab, "source": f"{fam}/x"} for fam, per in sizes.items() for lab, n in per.items()
            for _ in range(n)]
    folds = grouped_folds(rows, 3, min_rows=10)
    held = [fam for fold in folds for fam in fold]
    assert sorted(held) == sorted(set(held)) == ["bank", "big", "law", "qa", "tax"]  # once each; tiny is too small
    assert len(folds) == 3
    for fold in folds:  # no fold takes away all of a label's rows
        assert {"legal", "general", "finance"} <= {r["label"] for r in rows if r["source"].split("/")[0] not in fold}
    assert not {"big", "law"} <= set(next(f for f in folds if "big" in f))  # the two legal families split


def test_loso_resume_reuses_finished_folds_and_runs_only_the_rest(tmp_path: Path) -> None:
    from router_model.loso import main as loso_main

    data = _two_family_corpus(tmp_path)
    out = tmp_path / "loso.json"
    args = ["--data", str(data), "--extra", "--checkpoint", str(tmp_path / "none"), "--folds", "per-source",
            "--min-rows", "5", "--per-source", "4", "--no-baselines", "--threads", "1", "--set", "layers=1",
            "max_steps=2", "latency_n=0", "--out", str(out)]
    # An interrupted run: fold 0 finished (its predictions planted, so reuse is visible), fold 1 never ran.
    assert loso_main([*args, "--deadline", "1e-9"]) == 0
    planted = json.loads(out.read_text())
    assert planted["planned_folds"] == [["alpha"], ["beta"]]
    assert planted["predictions"] == {"functional-token router": {}}
    labels = sorted({r["label"] for r in ROWS})
    pattern = " ".join([labels[1], labels[0], labels[0], labels[1]])  # not what a 2-step model would say
    planted["predictions"] = {"functional-token router": {"0": pattern}}
    out.write_text(json.dumps(planted))

    assert loso_main([*args, "--resume"]) == 0
    res = json.loads(out.read_text())
    router = res["predictions"]["functional-token router"]
    assert router["0"] == pattern, "fold 0 was retrained instead of reused"
    assert len(router["1"].split()) == 4 and res["folds"] == [["alpha"], ["beta"]] and res["n"] == 8
    assert res["models"]["functional-token router"]["predicted"].get(labels[1], 0) >= 2

    # Another experiment in the same file is refused rather than mixed in.
    with pytest.raises(SystemExit, match="another experiment"):
        loso_main([*args, "--resume", "--per-source", "3"])


def test_from_scratch_ablation_replaces_the_warm_start() -> None:
    from router_model.model import minilm_path
    from router_model.train import build_lm, parser

    words = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(minilm_path() / "model.safetensors"))["embeddings.word_embeddings.weight"]
    labels = ["a", "b"]
    warm, _, _ = build_lm(parser().parse_args(["--layers", "1"]), labels)
    cold, _, _ = build_lm(parser().parse_args(["--layers", "1", "--from-scratch"]), labels)
    assert warm.cfg == cold.cfg
    warm_row, cold_row = warm.wte.weight[1000].detach(), cold.wte.weight[1000].detach()
    # The warm start folds the token-type row into the word vectors; from scratch shares nothing with MiniLM.
    assert float(torch.corrcoef(torch.stack([warm_row, words[1000]]))[0, 1]) > 0.8
    assert abs(float(torch.corrcoef(torch.stack([cold_row, words[1000]]))[0, 1])) < 0.3
    assert float(cold.wte.weight.detach().std()) == pytest.approx(0.02, rel=0.05)


def test_serving_precision_is_explicit_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    from router_model.router import resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto") == "int8"  # AVX512-BF16 alone is slower than int8 (measured on Zen 4)
    assert resolve_precision("fp32") == "fp32"
    with pytest.raises(ValueError, match="one of auto, bf16, int8, fp32"):
        resolve_precision("fp8")


EDGE_TEXTS = ["x" * 5000, "a   " * 900, "word\n\n\t " * 400, ("é" * 30 + " ") * 100, "  lead" + " z" * 2000,
              "日本語のテキスト" * 200, "short", "", "ends with spaces " * 80 + "     "]


@pytest.mark.parametrize("kind", ["shipped word pieces", "byte-level BPE"])
def test_prompt_windows_tokenise_exactly_like_whole_texts(kind: str) -> None:
    """Only a window of each text is tokenised; its first (last) tokens must be the whole text's."""
    from transformers import AutoTokenizer

    from router_model import CHECKPOINT
    from router_model.eval import read_jsonl
    from router_model.train import DEFAULT_DATA

    texts = [r["text"] for r in read_jsonl(DEFAULT_DATA / "dev.jsonl")] + EDGE_TEXTS
    tok = AutoTokenizer.from_pretrained(str(CHECKPOINT)) if kind.startswith("shipped") else _byte_bpe(texts[:500])
    codec = Codec(tok, [], [], [], 0, 0, max_len=62)
    whole = tok(texts, add_special_tokens=False)["input_ids"]
    for n in (62, 7):
        heads, tails = codec.ids(texts, n, keep_end=False), codec.ids(texts, n, keep_end=True)
        assert heads == [w[:n] for w in whole]
        assert tails == [w[-n:] for w in whole]


def test_a_huge_prompt_is_not_tokenised_whole() -> None:
    """A 100 KB prompt costs the router a window, not a full tokenisation (~30 ms on these machines)."""
    seen: list[int] = []

    class Counting:
        def __call__(self, texts: list[str], add_special_tokens: bool) -> dict[str, list[list[int]]]:
            seen.extend(len(t) for t in texts)
            return {"input_ids": [[ord(ch) for ch in t if not ch.isspace()] for t in texts]}

    codec = Codec(Counting(), [1], [2], [], 0, 0, max_len=64)
    huge = "lorem ipsum dolor " * 6000
    prompt = codec.prompts([huge], [huge])[0]
    assert len(prompt) == 64 and prompt[1:-1] == [ord(ch) for ch in huge if not ch.isspace()][:62]
    assert max(seen) < 62 * 8 + 256, seen


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_traced_serving_graph_equals_the_eager_model_for_any_batch_and_length(precision: str) -> None:
    from router_model.model import CausalLM, ModelConfig, quantize_int8, traced_answer_hidden

    torch.manual_seed(0)
    lm: Any = CausalLM(ModelConfig(vocab_size=60, n_layer=2, n_head=2, d_model=16, d_ff=32, max_pos=64)).eval()
    if precision == "int8":
        lm = quantize_int8(lm)
    codec = Codec(tokenizer=None, prefix_ids=[], suffix_ids=[], fn_ids=[], end_id=1, pad_id=0, max_len=64)
    traced = traced_answer_hidden(lm, *codec.pad([[5, 6, 7, 8, 9], [5, 6]]))
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for batch, longest in [(1, 1), (1, 40), (3, 12), (7, 33), (2, 64)]:
            lengths = [longest, *torch.randint(1, longest + 1, (batch - 1,), generator=g).tolist()]
            ids, mask = codec.pad([torch.randint(1, 60, (n,), generator=g).tolist() for n in lengths])
            eager = lm.answer_hidden(ids, mask)
            assert eager.shape == (batch, 16)
            assert torch.equal(traced(ids, mask), eager), (batch, longest)


def test_the_shipped_router_serves_through_the_traced_graph() -> None:
    from router_model.eval import DEFAULT_CHECKPOINT

    router = FunctionalTokenRouter.load(DEFAULT_CHECKPOINT, precision="int8")
    assert isinstance(router.answer_hidden, torch.jit.ScriptModule)
    texts = ["Integrate x^2 from 0 to 3.", "Who may terminate a lease early?", "fix my segfault in C", "hi"]
    with torch.inference_mode():
        ids, mask = router.codec.pad(router.codec.prompts(texts))
        assert torch.equal(router.answer_hidden(ids, mask), router.lm.answer_hidden(ids, mask))


def test_int8_routing_of_a_query_does_not_depend_on_the_queries_routed_with_it() -> None:
    """Dynamic int8 scales a batch's activations together; the router must give each query its own pass."""
    from router_model.eval import DEFAULT_CHECKPOINT, read_jsonl
    from router_model.train import DEFAULT_DATA

    texts = [r["text"] for r in read_jsonl(DEFAULT_DATA / "dev.jsonl")[:96]]
    alone_router = FunctionalTokenRouter.load(DEFAULT_CHECKPOINT, threads=1, precision="int8")
    pooled_router = FunctionalTokenRouter.load(DEFAULT_CHECKPOINT, threads=2, precision="int8")
    alone = torch.cat([alone_router.logits([t]) for t in texts])
    for router in (alone_router, pooled_router):
        together = router.logits(texts)
        assert torch.equal(together, alone)
        assert torch.equal(router.logits(texts[::-1]), alone.flip(0))
