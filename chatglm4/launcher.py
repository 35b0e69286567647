"""`make run`: starts the model server and the gateway, prints the URL when both are ready, and
stops both on Ctrl-C (or when either exits)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

log = logging.getLogger("launcher")
ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 600


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = dict(os.environ)
    ms_port = env.get("MODEL_SERVER_PORT", "8001")
    gw_host = env.get("GATEWAY_HOST", "127.0.0.1")
    gw_port = env.get("GATEWAY_PORT", "8000")
    env.setdefault("MODEL_SERVER_URL", f"http://127.0.0.1:{ms_port}")
    procs = [
        subprocess.Popen([sys.executable, str(ROOT / "LLMapis.py")], cwd=ROOT, env=env),
        subprocess.Popen([sys.executable, str(ROOT / "serveapi.py")], cwd=ROOT, env=env),
    ]

    def stop(*_: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    # Installed explicitly: a launcher started in the background of a script inherits SIGINT ignored.
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    url = f"http://{gw_host}:{gw_port}"
    try:
        deadline, ready = time.monotonic() + READY_TIMEOUT_S, False
        while True:
            if any(p.poll() is not None for p in procs):
                log.error("a server exited (see the log above); stopping")
                stop()
                return 1
            if not ready:
                try:
                    ready = requests.get(url + "/health", timeout=2).status_code == 200
                except requests.RequestException:
                    ready = False
                if ready:
                    log.info("ChatGLM4 Web is ready: open %s/ (API: %s/v1, %s/api); Ctrl-C stops", url, url, url)
                elif time.monotonic() > deadline:
                    log.error("not ready after %d s; stopping", READY_TIMEOUT_S)
                    stop()
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        log.info("stopping")
        stop()
        return 0


if __name__ == "__main__":
    sys.exit(main())
