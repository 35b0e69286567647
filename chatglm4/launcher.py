"""`make run`: starts the model server and the gateway, prints the URL when both are ready, and
stops both gracefully on Ctrl-C or SIGTERM (or when either exits): they finish what is in flight
within SHUTDOWN_GRACE_SECONDS. A second Ctrl-C stops them at once."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from chatglm4 import config as cfg

log = logging.getLogger("launcher")
ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 600
# Beyond the servers' own grace period: time to close sockets and the search index.
EXIT_MARGIN_S = 15


class Interrupted(Exception):
    pass


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = dict(os.environ)
    ms_port = env.get("MODEL_SERVER_PORT", "8001")
    gw_host = env.get("GATEWAY_HOST", "127.0.0.1")
    gw_port = env.get("GATEWAY_PORT", "8000")
    grace = cfg.load(cfg.GatewayConfig, [], env).shutdown_grace
    env.setdefault("MODEL_SERVER_URL", f"http://127.0.0.1:{ms_port}")
    # Own sessions: a terminal's Ctrl-C reaches only the launcher, which then asks each server once
    # (a second signal would make them stop at once).
    procs = [subprocess.Popen([sys.executable, str(ROOT / name)], cwd=ROOT, env=env, start_new_session=True)
             for name in ("LLMapis.py", "serveapi.py")]
    stopping = {"count": 0}

    def interrupted(*_: object) -> None:
        # The first signal ends the main loop; later ones only count, so stop() is never cut short
        # (the servers run in their own sessions and would outlive a crashed launcher).
        stopping["count"] += 1
        if stopping["count"] == 1:
            raise Interrupted

    def signal_all() -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()

    def stop() -> None:
        signal_all()
        deadline = time.monotonic() + grace + EXIT_MARGIN_S
        seen = stopping["count"]
        while any(p.poll() is None for p in procs):
            if stopping["count"] > seen:  # asked again: stop now
                seen = stopping["count"]
                log.info("stopping now")
                signal_all()
                deadline = min(deadline, time.monotonic() + 5)
            if time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.2)

    # Installed explicitly: a launcher started in the background of a script inherits SIGINT ignored.
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    url = f"http://{gw_host}:{gw_port}"
    try:
        deadline, ready = time.monotonic() + READY_TIMEOUT_S, False
        while True:
            if any(p.poll() is not None for p in procs):
                log.error("a server exited (see the log above); stopping")
                stopping["count"] = 1
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
                    stopping["count"] = 1
                    stop()
                    return 1
            time.sleep(0.5)
    except Interrupted:
        log.info("stopping: finishing requests in flight (up to %g s; Ctrl-C again to stop now)", grace)
        stop()
        return 0


if __name__ == "__main__":
    sys.exit(main())
