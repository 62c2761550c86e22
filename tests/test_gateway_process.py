"""The gateway as users run it: `octoroute serve` in its own process, then SIGTERM mid-stream."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

from tests.harness import REPO, free_port, scripted_upstream, wait_http


def test_sigterm_drains_in_flight_streams_then_exits_0(tmp_path: Path) -> None:
    with scripted_upstream("general") as up:
        up.control("slow_chunks", delay_s=0.3)
        port = free_port()
        config = {"server": {"port": port, "shutdown_grace_s": 20}, "router": {"kind": "keyword"},
                  "default_expert": "general",
                  "experts": [{"name": "general", "backend": "vllm", "base_url": up.base_url}],
                  "cache": {"backend": "none"}}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(path)], cwd=REPO,
                                stderr=subprocess.PIPE)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", proc=proc, timeout_s=60)
            assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200
            result: dict[str, str] = {}

            def stream() -> None:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, json={
                    "model": "general", "stream": True,
                    "messages": [{"role": "user", "content": "one two three four five six"}]})
                result["text"] = r.text

            client = threading.Thread(target=stream)
            client.start()
            time.sleep(0.5)  # the stream is in flight (about 2 s long)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            refused = False
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            except httpx.HTTPError:
                refused = True
            client.join(timeout=30)
            assert proc.wait(timeout=30) == 0
        finally:
            proc.kill()
        assert refused, "the gateway kept accepting new connections after SIGTERM"
        assert result["text"].rstrip().endswith("data: [DONE]")
        assert "general: one two three four five six" in "".join(
            yaml.safe_load(line[6:])["choices"][0]["delta"].get("content", "")
            for line in result["text"].splitlines() if line.startswith("data: {") and '"choices":[{' in line)
        assert up.stats()["completed"] == 1


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("experts: [{name: x, backend: vllm}]\n")
    out = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "experts.0: a vllm expert needs base_url" in out.stderr


def test_serve_refuses_labels_without_expert(tmp_path: Path) -> None:
    path = tmp_path / "unclaimed.yaml"
    path.write_text(yaml.safe_dump({"router": {"kind": "keyword"},
                                    "experts": [{"name": "math", "backend": "vllm", "base_url": "http://127.0.0.1:9/v1"}]}))
    out = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "router labels ['legal', 'finance', 'code', 'general'] have no expert" in out.stderr
    assert "Traceback" not in out.stderr
