"""Start a real vLLM OpenAI server on CPU for tests, with the settings measured to work on small machines
(see shared/notes/vllm-cpu.md): a 64 MiB KV cache instead of ~92% of RAM, eager mode, one pinned core."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

ROOT = Path(__file__).resolve().parent


def vllm_python() -> str:
    """The vLLM venv's python, created on first use by tests/vllm_env.sh."""
    done = subprocess.run(["bash", str(ROOT / "vllm_env.sh")], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"tests/vllm_env.sh failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


class VllmServer:
    """``with VllmServer(model_dir, port, "math", cpu_core=0) as base_url:`` → ``http://127.0.0.1:PORT``."""

    def __init__(self, model_dir: Path | str, port: int, served_name: str, cpu_core: int = 0,
                 python: str | None = None, ready_timeout_s: float | None = None) -> None:
        self.model_dir, self.port, self.served_name = str(model_dir), port, served_name
        self.cpu_core, self.python = cpu_core, python
        # ~30 s on an idle core, but 110 s and more when the shared 2-core machine had a load of 9-11.
        self.ready_timeout_s = ready_timeout_s or float(os.environ.get("OCTOROUTE_VLLM_READY_S", "240"))
        self.base_url = f"http://127.0.0.1:{port}"
        self.ready_s: float | None = None
        self._scratch = tempfile.TemporaryDirectory(prefix="vllm-test-")
        self._log_path = Path(self._scratch.name) / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            self.python or vllm_python(), "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_dir, "--served-model-name", self.served_name,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "1024", "--max-logprobs", "20",
            "--max-num-seqs", "16", "--enable-prefix-caching", "--kv-cache-memory-bytes", "64M",
        ]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # empty crashes it
        return env | {
            "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "VLLM_CACHE_ROOT": str(Path(self._scratch.name) / "cache"),
            "VLLM_CPU_OMP_THREADS_BIND": str(self.cpu_core),  # otherwise every server binds core 0
        }

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def rss_bytes(self) -> int:
        """Resident memory of the server and its children (the engine core runs in one)."""
        assert self._proc is not None
        out = subprocess.run(["ps", "-o", "rss=", "--ppid", str(self._proc.pid), "-p", str(self._proc.pid)],
                             capture_output=True, text=True, check=False).stdout
        return sum(int(x) for x in out.split()) * 1024

    def __enter__(self) -> str:
        started = time.monotonic()
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen(self.command(), env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        deadline = started + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log_tail = self.log_tail()
                self._stop()
                raise RuntimeError(f"vLLM exited with {self._proc.returncode}:\n{log_tail}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    self.ready_s = time.monotonic() - started
                    return self.base_url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        log_tail = self.log_tail()
        self._stop()
        raise TimeoutError(f"vLLM not healthy after {self.ready_timeout_s:.0f}s:\n{log_tail}")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop()

    def _stop(self) -> None:
        """SIGTERM the server (it stops its engine process itself); SIGKILL the group if it hangs."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._scratch.cleanup()
