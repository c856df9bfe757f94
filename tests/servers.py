"""A real `lorafleet serve` in a child process, on 127.0.0.1 and ephemeral ports, for tests."""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

LORAFLEET = str(Path(sys.executable).parent / "lorafleet")


class ServerProcess:
    def __init__(self, *args: str, start_timeout: float = 180.0):
        cmd = [LORAFLEET, "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.info = self._wait_ready(start_timeout)
        self.target = f"127.0.0.1:{self.info['port']}"
        self.metrics_url = f"http://127.0.0.1:{self.info['metrics_port']}/metrics"

    def _wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lorafleet serve exited with {self.proc.returncode}: {self.proc.stderr.read()[-3000:]}")
            if sel.select(timeout=1.0):
                line = self.proc.stdout.readline()
                if line.startswith("{"):
                    info = json.loads(line)
                    if info.get("event") == "ready":
                        return info
        self.proc.kill()
        raise TimeoutError(f"lorafleet serve was not ready within {timeout:.0f}s")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as Kubernetes does; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise
        return self.proc.returncode

    def metric(self, name: str, **labels) -> float:
        """The sum of a metric's samples whose labels include `labels`."""
        import urllib.request

        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total
