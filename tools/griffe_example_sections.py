"""A griffe extension for the docs build: render the house docstring style with mkdocstrings.

The docstrings are Google style with a few reStructuredText constructs that Sphinx and
Napoleon understand but Markdown does not. In the copy griffe parses (the source is not
changed) this extension:

- renames ``Example:`` section headers to ``Examples:`` (Napoleon and the Google style guide
  accept both; griffe's Google parser only the plural, and renders the singular as an
  admonition whose ``>>>`` lines become Markdown quotes);
- turns ``.. math::`` directives into ``$$ ... $$`` blocks (rows and ``&`` alignment inside an
  ``aligned`` environment, as Sphinx does) and ``:math:`x``` into ``$x$`` (marked by the
  ``pymdownx.arithmatex`` extension, typeset at build time by ``tools/mkdocs_katex.py``);
- turns cross-reference roles (``:class:`~imtm.Tokens```, ``:func:``, ``:mod:``...) into code spans.
"""

from __future__ import annotations

import re

import griffe

_HEADER = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const):`~?([^`]+)`")
_DIRECTIVE = re.compile(r"^(\s*)\.\. math::[ \t]*$")


_ENVIRONMENT = re.compile(r"\\begin\{(\w+\*?)\}.*?\\end\{\1\}", re.DOTALL)


def _has_rows(tex: str) -> bool:
    """Whether ``tex`` has ``&`` or ``\\\\`` outside any ``\\begin{...}`` environment."""
    bare = _ENVIRONMENT.sub("", tex).replace("\\&", "")
    return "&" in bare or "\\\\" in bare


def _math_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group(1)
        i += 1
        body: list[str] = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        real = [b for b in body if b.strip()]
        cut = min((len(b) - len(b.lstrip()) for b in real), default=0)
        rows = [b[cut:] for b in body if b.strip()]
        if _has_rows(" ".join(rows)):
            # Like Sphinx, whose math directive puts rows (``\\``) and alignment (``&``) in an
            # environment: KaTeX and MathJax accept ``&`` only inside one.
            rows = ["\\begin{aligned}", *rows, "\\end{aligned}"]
        out.append(f"{indent}$$")
        out.extend(f"{indent}{b}" for b in rows)
        out.append(f"{indent}$$")
        out.append("")
    return "\n".join(out)


def rewrite(text: str) -> str:
    """The docstring ``text`` with the constructs above translated for Markdown."""
    text = _HEADER.sub(r"\1Examples:", text)
    if ".. math::" in text:
        text = _math_blocks(text)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    text = _XREF_ROLE.sub(
        lambda m: f"`{m.group(1).split('.')[-1] if m.group(0).count('~') else m.group(1)}`", text
    )
    return text


class ExampleSections(griffe.Extension):
    """Apply :func:`rewrite` to every docstring griffe loads."""

    def on_instance(self, *, obj, **kwargs) -> None:
        doc = getattr(obj, "docstring", None)
        if doc is not None:
            doc.value = rewrite(doc.value)
