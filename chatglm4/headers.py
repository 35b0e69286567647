"""Response headers both servers send, and OPTIONS answered like an API rather than a web page."""

from __future__ import annotations

from flask import Flask, request

# The page loads its script and styles from this origin only, talks only to this origin, and may
# not be framed (clickjacking) — nothing inline, so injected markup cannot run.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
}


def install(app: Flask) -> None:
    @app.after_request
    def _headers(resp):
        for name, value in SECURITY_HEADERS.items():
            resp.headers.setdefault(name, value)
        if request.method == "OPTIONS" and resp.status_code == 200:
            # Flask's automatic answer is an empty 200 text/html; an API says 204 with Allow.
            resp.status_code = 204
            resp.set_data(b"")
            resp.headers.pop("Content-Type", None)
        return resp
