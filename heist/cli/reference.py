"""The command-line reference (``docs/cli.md``), generated from the commands themselves.

Every option of every ``heist`` command, with its default and help text, so no option exists that the docs
do not name. ``make docs`` (``python -m heist.cli.reference docs/cli.md``) rewrites the file; a test fails
when a command changed and the file was not regenerated.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HEADER = """# Command-line reference

Generated from the commands by `make docs` (`heist/cli/reference.py`); do not edit by hand. Each command
also prints this with `--help`. The guides explain what the options are for: [attacker](attacker.md),
[victim service](victim-service.md), [defenses](defenses.md), [monitor](monitor.md),
[privacy](privacy.md), [evaluation](evaluation.md), [foundation](foundation.md).
"""


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(name path, command)`` of every leaf command under ``group``, in the order ``--help`` lists them."""
    for name in group.list_commands(None):
        sub = group.get_command(None, name)
        if sub is None or getattr(sub, "hidden", False):
            continue
        if hasattr(sub, "list_commands"):
            yield from _commands(sub, (*path, name))
        else:
            yield (*path, name), sub


def _clean(text: str | None) -> str:
    """Help text as Markdown table cell: one line, rich's ``\\[`` escapes undone, pipes escaped."""
    return " ".join((text or "").replace("\\[", "[").split()).replace("|", "\\|")


def _default(param: Any) -> str:
    if param.required:
        return "required"
    default = param.default
    if param.is_flag and param.secondary_opts:
        return f"`{param.opts[0] if default else param.secondary_opts[0]}`"
    if param.is_flag:
        return "off" if not default else "on"
    if default is None or default == [] or default == ():
        return ""
    return f"`{default}`"


def _option_row(param: Any) -> str:
    names = ", ".join(f"`{o}`" for o in (*param.opts, *param.secondary_opts))
    env = f" (env `{param.envvar}`)" if isinstance(param.envvar, str) else ""
    bounds = [f"{'>=' if k == 'min' else '<='} {v}" for k in ("min", "max")
              if (v := getattr(param, k, None)) is not None]
    extra = f" ({', '.join(bounds)})" if bounds else ""
    return f"| {names} | {_default(param)} | {_clean(param.help)}{extra}{env} |"


def render_reference() -> str:
    """The whole reference as Markdown: one section per command (usage, summary, arguments, options)."""
    import typer

    from heist.cli.main import app

    root = typer.main.get_command(app)
    out = [HEADER]
    for path, command in _commands(root):
        name = " ".join(("heist", *path))
        out.append(f"## `{name}`\n")
        summary = _clean((command.help or "").split("\n\n")[0])
        if summary:
            out.append(f"{summary}\n")
        args = [p for p in command.params if p.param_type_name == "argument"]
        if args:
            out.append("Arguments: " + ", ".join(
                f"`{p.name.upper()}`{'...' if p.nargs == -1 else ''}"
                f"{' (' + _clean(p.help) + ')' if getattr(p, 'help', None) else ''}" for p in args) + "\n")
        options = [p for p in command.params if p.param_type_name == "option" and "--help" not in p.opts
                   and not p.hidden]
        if options:
            out.append("| Option | Default | Meaning |\n|---|---|---|")
            out.extend(_option_row(p) for p in options)
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    """``python -m heist.cli.reference [FILE]``: write the reference to FILE (default: stdout)."""
    text = render_reference()
    if not argv:
        sys.stdout.write(text)
        return 0
    from translators.files import atomic_write_text

    atomic_write_text(Path(argv[0]), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
