"""deploy/compose.yaml, the README's scale-out recipe as a file: it parses, its settings are ours,
and every URL in it names a service it defines."""

from __future__ import annotations

import re

import yaml

from chatglm4 import config as cfg
from conftest import ROOT


def test_compose_file_parses_and_its_urls_name_its_services():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert {"vllm-0", "vllm-1", "model-server-0", "model-server-1", "gateway", "mysql"} <= set(services)
    for name in ("vllm-0", "vllm-1"):
        command = services[name]["command"]
        assert "--max-model-len" in command and "--served-model-name" in command
    text = yaml.safe_dump(services)
    for host in re.findall(r"https?://([a-z0-9-]+):\d+", text) + re.findall(r"@([a-z0-9-]+):\d+", text):
        assert host in services, host
    for name in ("model-server-0", "model-server-1"):
        assert "--engine-url http://vllm-" in services[name]["command"][-1]
    gateway_env = services["gateway"]["environment"]
    known = {env for _, env, _, _ in cfg.settings_table(cfg.GatewayConfig)}
    assert set(gateway_env) <= known
    urls = gateway_env["MODEL_SERVER_URL"].split(",")
    assert len(urls) == 2 and all(u.startswith("http://model-server-") for u in urls)
