"""A tiny document model rendered to Markdown and to self-contained HTML.

Both renderers walk the same blocks, so ``report.md`` and ``report.html`` always show the same
strings. The HTML inlines its CSS and embeds figures as base64 PNG ``data:`` URIs: the file can be
mailed or archived alone, with no external asset.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup


@dataclass
class Paragraph:
    """Plain text; `code`, **bold** and *emphasis* spans are honoured by both renderers."""

    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    """A PNG on disk; ``rel`` is its path relative to the report folder (used by Markdown)."""

    path: Path
    rel: str
    caption: str


@dataclass
class Code:
    text: str
    lang: str = ""


Block = Paragraph | Bullets | Table | Figure | Code


@dataclass
class Section:
    title: str
    level: int = 2
    blocks: list[Block] = field(default_factory=list)
    anchor: str = ""

    def add(self, *blocks: Block) -> Section:
        self.blocks.extend(blocks)
        return self


@dataclass
class Document:
    title: str
    subtitle: str = ""
    sections: list[Section] = field(default_factory=list)


# --- Markdown ------------------------------------------------------------------------------------------


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Document) -> str:
    out = [f"# {doc.title}", ""]
    if doc.subtitle:
        out += [doc.subtitle, ""]
    for sec in doc.sections:
        out += [f"{'#' * sec.level} {sec.title}", ""]
        for b in sec.blocks:
            if isinstance(b, Paragraph):
                out += [b.text, ""]
            elif isinstance(b, Bullets):
                out += [f"- {item}" for item in b.items] + [""]
            elif isinstance(b, Table):
                if b.caption:
                    out += [f"*{b.caption}*", ""]
                out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
                out.append("|" + "|".join("---" for _ in b.header) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
                out.append("")
            elif isinstance(b, Figure):
                out += [f"![{b.caption}]({b.rel})", "", f"*{b.caption}*", ""]
            elif isinstance(b, Code):
                fence = "~~~~" if "```" in b.text else "```"
                out += [f"{fence}{b.lang}", b.text.rstrip("\n"), fence, ""]
    return "\n".join(out).rstrip() + "\n"


# --- HTML ----------------------------------------------------------------------------------------------

_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*")


def inline_html(text: str) -> Markup:
    """Escape ``text`` and turn `code`, **bold** and *emphasis* spans into tags."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        if m.group(1) is not None:
            out.append(f"<code>{html.escape(m.group(1))}</code>")
        elif m.group(2) is not None:
            out.append(f"<strong>{html.escape(m.group(2))}</strong>")
        else:
            out.append(f"<em>{html.escape(m.group(3))}</em>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return Markup("".join(out))


def data_uri(path: Path) -> str:
    """``data:image/png;base64,...`` of a PNG file (empty string when it is missing)."""
    try:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return ""


def to_html(doc: Document) -> str:
    env = Environment(loader=PackageLoader("evaluation.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["inline"] = inline_html
    env.filters["data_uri"] = data_uri
    env.tests["paragraph"] = lambda b: isinstance(b, Paragraph)
    env.tests["bullets"] = lambda b: isinstance(b, Bullets)
    env.tests["table"] = lambda b: isinstance(b, Table)
    env.tests["figure"] = lambda b: isinstance(b, Figure)
    env.tests["code"] = lambda b: isinstance(b, Code)
    return env.get_template("report.html.j2").render(doc=doc)
