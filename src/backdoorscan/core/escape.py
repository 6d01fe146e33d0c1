"""Text from a model file (names, paths, messages, a child's output) made inert for each sink it reaches.

A terminal obeys control characters (ESC sequences erase lines and recolour them), Markdown turns names into
links, HTML and comments, and a CI runner takes `::command::` lines and `##[command]` anywhere as workflow
commands. Each sink has one function here; JSON and SARIF are written by `jsonout.dumps`, which escapes on its own.
"""

from __future__ import annotations

import re
import unicodedata

# Unicode categories printed as escapes: controls (C0, DEL, C1), format characters (bidi overrides, zero-width
# joiners), line and paragraph separators, unassigned code points and surrogates.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cn", "Cs", "Co"})
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~&:.@])")
_CI_LEGACY = "##["


def printable(text: object, keep_newlines: bool = False) -> str:
    """`text` with every control or invisible character written as a visible escape (`\\x1b`, `\\u202e`)."""
    out = []
    for ch in str(text):
        if (
            (ch == "\n" and keep_newlines)
            or ch == " "
            or (ch.isprintable() and unicodedata.category(ch) not in _UNSAFE_CATEGORIES)
        ):
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def md_text(text: object) -> str:
    """Text as literal Markdown in a paragraph or a table cell: no links, HTML, emphasis, headings or cell breaks."""
    return _MD_SPECIAL.sub(r"\\\1", printable(text))


def md_code(text: object, in_table: bool = True) -> str:
    """Text as a Markdown code span that its content cannot close: a fence longer than any backtick run inside.

    In a table cell `|` is escaped as `\\|` (GFM splits cells before it parses code spans); elsewhere it is kept.
    """
    body = printable(text)
    if in_table:
        body = body.replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if body.startswith(("`", " ")) or body.endswith(("`", " ")) or not body else ""
    return f"{fence}{pad}{body}{pad}{fence}"


def ci_line(line: str) -> str:
    """One output line that a CI runner cannot take as a workflow command (GitHub's `::cmd::` and `##[cmd]`)."""
    line = line.replace(_CI_LEGACY, "#\\u0023[")
    if line.lstrip().startswith("::"):
        return "\\" + line
    return line


def relay_line(line: str) -> str:
    """A line of a sandboxed child's output, for the user's terminal or log: printable and not a CI command."""
    body = line[:-1] if line.endswith("\n") else line
    return ci_line(printable(body)) + ("\n" if line.endswith("\n") else "")
