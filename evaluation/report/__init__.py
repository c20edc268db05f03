"""Render ``results.json`` into ``report.md``, a self-contained ``report.html`` and PNG figures.

>>> from evaluation.report import render_report
>>> files = render_report("runs/demo/results.json")  # doctest: +SKIP

Every number comes from the results file; see :mod:`evaluation.report.content` for what is shown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from evaluation.report.content import build_document
from evaluation.report.document import to_html, to_markdown
from evaluation.results import Results, read_results
from translators.files import atomic_write_text


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    figures: list[Path]


def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text, durable=False)


def render_report(
    results: str | os.PathLike[str] | Results,
    out_dir: str | os.PathLike[str] | None = None,
    results_dir: str | os.PathLike[str] | None = None,
) -> ReportFiles:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``out_dir``.

    ``results`` is a ``results.json`` path (or its folder) or a loaded :class:`Results`. Sample image
    paths in the results are resolved against ``results_dir`` (default: the results file's folder).
    ``out_dir`` defaults to that folder too. Files are replaced atomically.
    """
    if isinstance(results, Results):
        res = results
        base = Path(results_dir) if results_dir else Path(out_dir or ".")
    else:
        p = Path(results)
        p = p / "results.json" if p.is_dir() else p
        res = read_results(p)
        base = Path(results_dir) if results_dir else p.parent
    out = Path(out_dir) if out_dir else base
    out.mkdir(parents=True, exist_ok=True)
    doc, figs = build_document(res, base, out)
    md, html = out / "report.md", out / "report.html"
    _write_text(md, to_markdown(doc))
    _write_text(html, to_html(doc))
    return ReportFiles(md, html, figs)
