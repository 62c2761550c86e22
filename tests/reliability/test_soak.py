"""Soak, scaled for CI: the mixed workload of ``tests/benchmarks/soak.py`` for 30 s instead of 5 minutes.

Streams, JSON completions, cache hits, mid-stream expert deaths, expert 5xx and open breakers, bad
requests and hang-ups, from 16 concurrent clients. No request may fail outside the expected kinds, and
the gateway's memory must level off: RSS at the end within a few MiB of RSS a third of the way in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks.soak import run


@pytest.mark.reliability
def test_soak_mixed_workload_bounded_memory(tmp_path: Path) -> None:
    result = run(seconds=30, workers=16, workdir=tmp_path)
    print(f"\nsoak: {result}")
    assert result["errors"] == {}, result["error_examples"]
    outcomes = result["outcomes"]
    for kind in ("ok", "upstream_error", "refused", "client_error", "hung_up"):
        assert outcomes.get(kind, 0) > 0, f"the mix produced no {kind!r}: {outcomes}"
    assert result["requests"] >= 1000, result
    assert result["gateway"]["cache_hits"] > 0 and result["gateway"]["status_499"] > 0
    assert result["gateway"]["exit_code"] == 0
    rss = result["rss_mib"]
    assert rss["end"] - rss["at_one_third"] < 16, rss
    assert rss["peak"] - rss["start"] < 64, rss
