"""The gateway as users run it: `octoroute serve` in its own process, then SIGTERM mid-stream."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
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


def _serve(args: list[str], port: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port), *args], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return err


def test_first_contact_on_the_embedded_default(demo_experts_dir: Path) -> None:
    """What a new user meets (issue 17 #2, #10, #12, #14): the start-up log says where it listens and that it
    is ready; an empty prompt is a 400 naming ``prompt`` (it was a 500 with a torch error); a conversation of
    one system message is served; a field no local expert honours is refused without pointing at a vllm
    expert the embedded default does not have."""
    port = free_port()
    proc = _serve([], port)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc, timeout_s=120)
        base = f"http://127.0.0.1:{port}"
        for _ in range(6):  # more than the breaker's threshold: client errors never open it
            r = httpx.post(f"{base}/v1/completions", json={"model": "general", "prompt": "", "max_tokens": 3})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": "general", "max_tokens": 3, "messages": [{"role": "system", "content": "Be brief."}]})
        assert r.status_code == 200, r.text
        r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": "general", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "tools" and "vllm" not in err["message"], err
        assert "no expert of this gateway can honour it" in err["message"]
    finally:
        log = _stop(proc)
    assert f"listening on http://127.0.0.1:{port}" in log
    assert "gateway ready" in log and "NOT ready" not in log


def test_start_up_log_says_which_experts_are_down_and_why(tmp_path: Path) -> None:
    """/ready answered 503 while the log said "gateway ready" (issue 17 #12)."""
    port = free_port()
    path = tmp_path / "down.yaml"
    path.write_text(yaml.safe_dump({"router": {"kind": "keyword"}, "default_expert": "general", "experts": [
        {"name": "general", "backend": "vllm", "base_url": "http://127.0.0.1:9/v1",
         "timeouts": {"connect_s": 0.5}},
        {"name": "code", "backend": "vllm", "base_url": "http://no-such-host.invalid:8000/v1",
         "timeouts": {"connect_s": 0.5}}]}))
    proc = _serve(["--config", str(path)], port)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc, timeout_s=60)
        assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 503
    finally:
        log = _stop(proc)
    assert "gateway ready" not in log
    # The real cause, per expert (issue 17 #12, #13): nothing listens on port 9; the .invalid host never resolves.
    assert "NOT ready" in log and "general: cannot reach expert general: connection refused by 127.0.0.1:9" in log
    assert "code: cannot reach expert code: the host name in no-such-host.invalid:8000 does not resolve" in log
    assert f"listening on http://127.0.0.1:{port}" in log


def test_cli_version_and_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    """issue 17 #14: --version; no reST backticks; router train's example commands on lines of their own;
    build-demo's --out explained."""
    from gateway.cli import main

    def run(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        assert exit_.value.code == 0
        return capsys.readouterr().out

    from gateway import __version__

    assert run("--version").strip() == f"octoroute {__version__}"
    texts = {args: run(*args.split(), "--help") for args in ("", "serve", "experts build-demo", "router train",
                                                              "router eval", "config check")}
    for args, text in texts.items():
        assert "``" not in text and "`" not in text, args
    train = texts["router train"].splitlines()
    assert sum(line.strip().startswith("python -m router_model.train") for line in train) == 2
    assert "--out OUT" in texts["experts build-demo"] and "directory to write the five experts" in texts[
        "experts build-demo"]
