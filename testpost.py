"""Example client: chat and book search against a running gateway, with the response time.

    python testpost.py --url http://127.0.0.1:8000 "你好"            # chat
    python testpost.py --url http://127.0.0.1:8000 --stream "你好"   # chat, streamed
    python testpost.py --search "帮我找找有关函数求导的书"            # book search
    python testpost.py                                              # one of each, like the original demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import requests

from chatglm4.protocol import ApiChatResponse, BookSearchResponse

DEFAULT_PROMPT = "你好，请介绍一下你自己。"
DEFAULT_QUERY = "帮我找找有关函数求导的书"


class ClientError(Exception):
    pass


def _post(url: str, path: str, body: dict, key: str | None, stream: bool = False) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = requests.post(url.rstrip("/") + path, json=body, headers=headers, timeout=(5, 300), stream=stream)
    except requests.ConnectionError:
        raise ClientError(f"cannot reach the gateway at {url}: is it running? (make run)") from None
    except requests.Timeout:
        raise ClientError(f"the gateway at {url} did not answer in time") from None
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:200]
        raise ClientError(f"HTTP {resp.status_code}: {message}")
    return resp


def chat(url: str, prompt: str, key: str | None, stream: bool) -> None:
    start = time.perf_counter()
    if not stream:
        answer = ApiChatResponse.model_validate(_post(url, "/api/chat", {"prompt": prompt}, key).json())
        print(answer.respond)
        print(f"[{answer.usage.completion_tokens} tokens, {time.perf_counter() - start:.2f} s]")
        return
    resp = _post(url, "/api/chat", {"prompt": prompt, "stream": True}, key, stream=True)
    first = None
    for line in resp.iter_lines(decode_unicode=False):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise ClientError(chunk["error"]["message"])
        for choice in chunk.get("choices", []):
            text = choice["delta"].get("content")
            if text:
                first = first or time.perf_counter()
                print(text, end="", flush=True)
    total = time.perf_counter() - start
    print(f"\n[first token {((first or start) - start) * 1000:.0f} ms, total {total:.2f} s]")


def search(url: str, query: str, key: str | None) -> None:
    start = time.perf_counter()
    answer = BookSearchResponse.model_validate(_post(url, "/api/books/search", {"query": query}, key).json())
    print(answer.message)
    for book in answer.books:
        print(f"  {book.id:>5}  {book.title}")
    print(f"[{time.perf_counter() - start:.2f} s]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ChatGLM4 Web example client")
    parser.add_argument("prompt", nargs="?", help="chat message (default: a greeting, plus a search)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="gateway URL")
    parser.add_argument("--key", default=None, help="API key, when the gateway has API_KEYS set")
    parser.add_argument("--search", metavar="QUERY", help="search the catalogue instead of chatting")
    parser.add_argument("--stream", action="store_true", help="stream the chat reply")
    args = parser.parse_args(argv)
    try:
        if args.search:
            search(args.url, args.search, args.key)
        elif args.prompt:
            chat(args.url, args.prompt, args.key, args.stream)
        else:
            print(f"> {DEFAULT_PROMPT}")
            chat(args.url, DEFAULT_PROMPT, args.key, args.stream)
            print(f"\n> {DEFAULT_QUERY}")
            search(args.url, DEFAULT_QUERY, args.key)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
