"""The baseline: one request at a time, whole answer at the end, the way the original demo served.

    python bench/serial_server.py --port 8101

Also measures plain in-process `model.generate` tokens/s at batch 1 at start (GET /health reports it)."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flask import Flask, jsonify, request  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    import torch

    from chatglm4.engine import modelload

    # float32: the original demo's precision, and that of the "ours" row the reference is compared with.
    loaded = modelload.load(args.model, dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    lock = threading.Lock()

    def generate(messages: list[dict], max_tokens: int, force: bool) -> tuple[str, int, int]:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with lock, torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens if force else 0,
                                 do_sample=False, eos_token_id=loaded.stop_token_ids)
        new = out[0][ids["input_ids"].shape[1]:]
        return tok.decode(new, skip_special_tokens=True), ids["input_ids"].shape[1], len(new)

    # plain in-process generate, batch 1, 64 forced tokens (after one warm-up)
    msgs = [{"role": "user", "content": "Write a story about a robot."}]
    generate(msgs, 8, True)
    t = time.perf_counter()
    _, _, n = generate(msgs, 64, True)
    reference = n / (time.perf_counter() - t)

    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    def chat():
        body = request.get_json()
        text, n_prompt, n_out = generate(body["messages"], body.get("max_tokens", 64), bool(body.get("ignore_eos")))
        return jsonify({"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "length",
                        "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                  "total_tokens": n_prompt + n_out}})

    @app.get("/health")
    def health():
        return jsonify({"status": "ok", "generate_tok_s": reference})

    import waitress

    waitress.serve(app, host="127.0.0.1", port=args.port, threads=64)
    return 0


if __name__ == "__main__":
    sys.exit(main())
