"""Alert hook templates: Jinja2's immutable sandbox, strict about undefined names, each text compiled once.

A template is operator-written, but what it renders is partly server-written (banners and replies
quoted in a finding), so rendering happens in the sandbox: no attribute of a Python object beyond
what the documents hold, no mutation of the context. An undefined name is an error, never an
empty string: a template that names a ticket the store does not know yet fails the delivery,
which is retried, instead of sending a request to `.../ticket//comment`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

# Jinja2 is imported where a template is first compiled, not with this module: the config
# imports it to check hook templates, and every sweep would pay a tenth of a second for it
if TYPE_CHECKING:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["TemplateError", "check_template", "render_template"]


class TemplateError(Exception):
    """A template failed to compile or to render; the message names the template and the line."""


def _json(value: object) -> str:
    """`{{ x | json }}`: a JSON value (string, number, object) for a request body."""
    import jinja2  # noqa: PLC0415 - loaded already: this runs inside a render

    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined raises here: "'dict object' has no attribute 'x'"
    return json.dumps(value, ensure_ascii=False)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    import jinja2  # noqa: PLC0415 - see the imports above
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    env = ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # the bodies are JSON or text; `| json` quotes what goes into JSON
        keep_trailing_newline=True,
    )
    env.filters["json"] = _json
    return env


@functools.lru_cache(maxsize=256)
def _compiled(text: str, name: str) -> jinja2.Template:
    import jinja2  # noqa: PLC0415 - see the imports above

    try:
        return _environment().from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{name}: line {exc.lineno}: {exc.message}") from None


def check_template(text: str, name: str) -> None:
    """Compile `text` (read from `name`); a syntax error raises TemplateError naming the line."""
    _compiled(text, name)


def render_template(text: str, name: str, context: Mapping[str, Any]) -> str:
    """Render `text` with `context`; any failure is a TemplateError naming `name` and the line."""
    import jinja2  # noqa: PLC0415 - see the imports above

    template = _compiled(text, name)
    try:
        return template.render(context)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{name}: line {_line(exc)}: {exc.message or exc}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise TemplateError(f"{name}: {type(exc).__name__}: {exc}") from None


def _line(exc: BaseException) -> str:
    """The template line a render error happened on, from the traceback Jinja2 rewrote."""
    tb = exc.__traceback__
    line = "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = str(tb.tb_lineno)
        tb = tb.tb_next
    return line
