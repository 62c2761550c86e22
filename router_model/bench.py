"""Latency benchmark: batch-1 p50/p99 on 1 thread at 64 tokens, batched throughput on 2 threads.

Batch-1 is also timed through the eager model, in the same run, to show what the traced graph that
``FunctionalTokenRouter.load`` serves buys.

``python -m router_model.bench [--checkpoint DIR]`` prints JSON and stores it as ``bench.json`` in the
checkpoint (the model card shows it). The load average is recorded because the cores may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from router_model.card import write_model_card
from router_model.eval import DEFAULT_CHECKPOINT, read_jsonl
from router_model.interface import Message
from router_model.router import FunctionalTokenRouter
from router_model.train import DEFAULT_DATA


def batch1(router: FunctionalTokenRouter, convs: Sequence[list[Message]], n: int) -> dict[str, float]:
    for c in convs[:20]:
        router.route_batch([c])
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        router.route_batch([convs[i % len(convs)]])
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 3), "p99_ms": round(times[int(0.99 * (len(times) - 1))], 3)}


def throughput(router: FunctionalTokenRouter, convs: Sequence[list[Message]], repeat: int = 2) -> float:
    router.route_batch(convs[:64])
    t0 = time.perf_counter()
    for _ in range(repeat):
        router.route_batch(convs)
    return round(repeat * len(convs) / (time.perf_counter() - t0), 1)


def _cpu_model() -> str:
    """Model name plus family/model numbers: VMs often say only "AMD EPYC" (family 25 is Zen 4, 26 Zen 5)."""
    info = Path("/proc/cpuinfo")
    first = info.read_text().split("\n\n")[0] if info.exists() else ""
    fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in first.splitlines())}
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ("amx_tile", "avx512_bf16", "avx512_vnni") if f in flags]
    return (f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')}; {' '.join(isa) or 'no AMX/AVX512-BF16/VNNI'})")


def run(ckpt: Path, data: Path, n: int = 300) -> dict[str, Any]:
    rows = read_jsonl(data / "dev.jsonl")
    probe = FunctionalTokenRouter.load(ckpt, threads=1)
    room = probe.codec.max_len - len(probe.codec.prefix_ids) - len(probe.codec.suffix_ids)
    lens = probe.codec.tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]
    full = [[Message("user", r["text"])] for r, ids in zip(rows, lens, strict=True) if len(ids) >= room]
    real = [[Message("user", r["text"])] for r in rows]
    out: dict[str, Any] = {"prompt_tokens": probe.codec.max_len, "served_precision": probe.precision,
                           "cpu": _cpu_model(), "load_avg_before": os.getloadavg()[0]}
    for name in ("bf16", "int8", "fp32"):
        one = FunctionalTokenRouter.load(ckpt, threads=1, precision=name)
        two = FunctionalTokenRouter.load(ckpt, threads=2, precision=name)
        eager = FunctionalTokenRouter(one.lm, one.codec, one.config, 1, name)  # without the traced graph
        out[name] = {
            "batch1_1thread_64tok": batch1(one, full, n),
            "batch1_1thread_64tok_eager": batch1(eager, full, n),
            "batched_2threads_64tok_qps": throughput(two, full[:512]),
            "batched_2threads_dev_qps": throughput(two, real[:1024]),
        }
    out["load_avg_after"] = os.getloadavg()[0]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m router_model.bench", description=__doc__)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--n", type=int, default=300, help="batch-1 calls timed")
    args = ap.parse_args(argv)
    ckpt = Path(args.checkpoint)
    res = run(ckpt, Path(args.data), args.n)
    (ckpt / "bench.json").write_text(json.dumps(res, indent=1) + "\n")
    write_model_card(ckpt)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
