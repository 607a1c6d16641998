"""A MkDocs hook: typeset the maths at build time with KaTeX, so a page needs no script and no network.

``pymdownx.arithmatex`` (generic mode) marks every formula of the Markdown pages and of the
docstrings (``$...$``, ``$$...$$``; the griffe extension turns ``.. math::`` into the latter) as
``<span class="arithmatex">\\(...\\)</span>`` or ``<div class="arithmatex">\\[...\\]</div>``.
This hook replaces each with KaTeX's MathML, rendered by PyKaTeX (KaTeX running inside Python,
``pip install ".[docs]"``). Browsers draw MathML themselves, so the built site shows its
equations offline, without KaTeX's stylesheet or fonts. A formula KaTeX cannot parse stops the
build with the page and the formula, as a broken link does under ``--strict``.
"""

from __future__ import annotations

import html
import re

from mkdocs.exceptions import PluginError

_MATH = re.compile(r'<(?P<tag>span|div) class="arithmatex">(?P<body>.*?)</(?P=tag)>', re.DOTALL)
_DELIMITERS = {"span": ("\\(", "\\)"), "div": ("\\[", "\\]")}


def render(tex: str, *, display: bool) -> str:
    """The MathML of one TeX formula (``display``: a block of its own), as KaTeX writes it."""
    import pykatex

    return pykatex.renderToString(tex, displayMode=display, output="mathml", throwOnError=True)


def typeset(page_html: str, where: str = "page") -> str:
    """``page_html`` with every arithmatex formula replaced by its MathML."""

    def one(m: re.Match) -> str:
        tag = m.group("tag")
        tex = html.unescape(m.group("body")).strip()
        start, end = _DELIMITERS[tag]
        if tex.startswith(start) and tex.endswith(end):
            tex = tex[len(start) : -len(end)].strip()
        try:
            out = render(tex, display=tag == "div")
        except Exception as err:  # pykatex raises KaTeX's ParseError as a plain Exception subclass
            raise PluginError(f"{where}: KaTeX cannot typeset {tex!r}: {err}") from err
        return f'<div class="imtm-math">{out}</div>' if tag == "div" else out

    return _MATH.sub(one, page_html)


def on_page_content(html_text: str, page, **kwargs) -> str:
    return typeset(html_text, page.file.src_path)
