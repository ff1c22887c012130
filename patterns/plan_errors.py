"""Errors a user can cause with a Plan, in one shape: file, JSON path, expected, found.

Pydantic reports problems as ``loc`` tuples that mix real keys with union-branch labels
(``a_shape``, ``function-after[...]``); users think in the JSON they wrote. ``from_validation``
walks each ``loc`` through the *input* document so the path names only what exists in the file
(``$.layers[3].heads[2].prefill.type``) and drops the labels.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_SHOWN = 8  # more issues than this are counted, not printed: the first ones are the useful ones


@dataclass(frozen=True)
class PlanIssue:
    """One thing wrong with a plan."""

    path: str  # JSON path, e.g. ``$.layers[3].heads[2].prefill.type``
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.path}: expected {self.expected}, found {self.found}"


class PlanError(Exception):
    """A plan that cannot be used. ``str(err)`` names the file, the path, expected and found.

    Not a ``ValueError`` on purpose: pydantic would wrap a ``ValueError`` raised inside a validator
    and lose the path we computed; this one passes through untouched.
    """

    def __init__(self, issues: list[PlanIssue] | PlanIssue, file: str | None = None, note: str = ""):
        self.issues = [issues] if isinstance(issues, PlanIssue) else list(issues)
        self.file = file
        self.note = note
        super().__init__(self._render())

    def with_file(self, file: str) -> "PlanError":
        return PlanError(self.issues, file=file, note=self.note)

    def _render(self) -> str:
        head = f"{self.file or '<plan>'}: "
        shown = [str(i) for i in self.issues[:_MAX_SHOWN]]
        more = len(self.issues) - len(shown)
        if len(shown) == 1:
            body = shown[0]
        else:
            body = f"{len(self.issues)} problems:\n  " + "\n  ".join(shown)
            if more:
                body += f"\n  ... and {more} more"
        return head + body + (f"\n  ({self.note})" if self.note else "")

    def __str__(self) -> str:  # recomputed so with_file()/note changes show
        return self._render()


def json_path(parts: list[str | int]) -> str:
    """``['layers', '3', 'heads', 2, 'type']`` -> ``$.layers[3].heads[2].type``.

    Integer-like keys are written as indices whether they came from a list or an object key,
    so a per-layer override ``"3"`` and the fourth entry of a layer list read the same.
    """
    out = "$"
    for p in parts:
        if isinstance(p, int) or (isinstance(p, str) and p.isdigit()):
            out += f"[{p}]"
        elif _IDENT.match(p):
            out += f".{p}"
        else:
            out += "[" + json.dumps(p) + "]"
    return out


def show_value(value: Any, limit: int = 60) -> str:
    """A short, JSON-looking rendering of what the user wrote."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _walk(doc: Any, loc: tuple) -> tuple[list[str | int], Any, bool]:
    """Follow ``loc`` through the input ``doc``; skip pydantic's branch labels.

    Returns (path parts, value found there, whether a union-branch label contradicted the input:
    such errors come from the branch that does not apply and are dropped).
    """
    parts: list[str | int] = []
    cur = doc
    for el in loc:
        if isinstance(cur, dict) and isinstance(el, str) and el in cur:
            parts.append(el)
            cur = cur[el]
        elif isinstance(cur, list) and isinstance(el, (int, str)) and str(el).isdigit() and int(el) < len(cur):
            parts.append(int(el))
            cur = cur[int(el)]
        elif isinstance(el, str) and (el.startswith("list[") or el.startswith("dict[")):
            if (el.startswith("list[") and isinstance(cur, dict)) or (el.startswith("dict[") and isinstance(cur, list)):
                return parts, cur, True
        else:
            # a discriminator tag (the pattern type), a validator label, or a missing key: missing
            # keys are kept so the path names the field that should be there
            if isinstance(cur, dict) and isinstance(el, str) and el != cur.get("type") and not el.startswith("function-"):
                parts.append(el)
                cur = None
    return parts, cur, False


# pydantic error types whose message we say more plainly (ctx fills the braces)
_PLAIN = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "a whole number",
    "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
    "bool_type": "true or false", "string_type": "a string", "dict_type": "an object",
    "model_type": "an object", "model_attributes_type": "an object", "list_type": "a list",
    "tuple_type": "a list", "greater_than_equal": "a number >= {ge}", "greater_than": "a number > {gt}",
    "less_than_equal": "a number <= {le}", "less_than": "a number < {lt}",
    "multiple_of": "a multiple of {multiple_of}", "too_short": "at least {min_length} item(s)",
}


def _expected(err: dict) -> tuple[str, str | None]:
    """Expected text, and an override for 'found' when the input is not the thing to show."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "this required field", "nothing"
    if kind == "extra_forbidden":
        return "only the fields this object defines (a typo?)", None
    if kind == "union_tag_invalid":
        tags = ctx.get("expected_tags", "")
        return f"a known pattern type: {tags}", None
    if kind == "union_tag_not_found":
        return f"a '{ctx.get('discriminator', 'type').strip(chr(39))}' field naming the pattern type", "an object without it"
    if kind == "literal_error":
        return str(ctx.get("expected")), None  # pydantic writes "1" or "'select' or 'reuse'"
    if kind in _PLAIN:
        return _PLAIN[kind].format(**ctx), None
    msg = err.get("msg", kind)
    for prefix in ("Input should be ", "Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
            break
    # our own validators say "EXPECTED; found FOUND" (see ``invalid``)
    if "; found " in msg:
        expected, found = msg.split("; found ", 1)
        return expected, found
    return msg, None


def invalid(expected: str, found: str) -> ValueError:
    """The error a model validator raises; ``from_validation`` splits it back into its parts."""
    return ValueError(f"{expected}; found {found}")


def from_validation(exc: Any, doc: Any, file: str | None = None) -> PlanError:
    """Turn a pydantic ``ValidationError`` raised while validating ``doc`` into a ``PlanError``."""
    issues: dict[str, PlanIssue] = {}
    for err in exc.errors():
        parts, value, wrong_branch = _walk(doc, tuple(err["loc"]))
        if wrong_branch:
            continue
        path = json_path(parts)
        expected, found = _expected(err)
        if found is None:
            found = show_value(err.get("input", value))
        if err["type"] == "extra_forbidden":
            found = f"unknown field '{parts[-1]}'" if parts else "an unknown field"
        if err["type"] == "union_tag_invalid":  # point at the tag itself
            path = json_path(parts + ["type"])
            found = show_value((err.get("ctx") or {}).get("tag"))
        if path in issues:  # two union branches rejecting the same value: say both
            old = issues[path]
            if expected not in old.expected:
                issues[path] = PlanIssue(path, f"{old.expected} or {expected}", old.found)
            continue
        issues[path] = PlanIssue(path, expected, found)
    if not issues:  # every error came from a branch that did not apply (should not happen)
        issues["$"] = PlanIssue("$", "a valid plan", str(exc).splitlines()[0])
    return PlanError(list(issues.values()), file=file)
