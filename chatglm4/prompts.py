"""Prompt templates: Jinja files in templates/, rendered strictly (a missing variable raises)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


class TemplateError(LookupError):
    """A template is missing or was rendered without a variable it needs."""


@lru_cache(maxsize=1)
def environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
        autoescape=False,  # these are prompts, not HTML
    )
    # Titles are quoted as JSON strings so that a title is visibly data; keep Chinese readable.
    env.policies["json.dumps_kwargs"] = {"ensure_ascii": False, "sort_keys": True}
    return env


@lru_cache(maxsize=None)
def required_variables(name: str) -> frozenset[str]:
    """The top-level variables template `name` uses."""
    import jinja2
    from jinja2 import meta

    env = environment()
    try:
        source = env.loader.get_source(env, name)[0]
    except jinja2.TemplateNotFound as exc:
        raise TemplateError(f"template {name} not found in {TEMPLATE_DIR}") from exc
    return frozenset(meta.find_undeclared_variables(env.parse(source)))


def render(name: str, **variables: Any) -> str:
    """The template `name` filled with `variables`; raises TemplateError on anything missing."""
    import jinja2

    # Checked up front: a filter such as tojson would otherwise swallow an undefined value.
    missing = required_variables(name) - variables.keys()
    if missing:
        raise TemplateError(f"template {name}: missing variable(s) {', '.join(sorted(missing))}")
    try:
        return environment().get_template(name).render(**variables).strip()
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"template {name}: {exc}") from exc
