"""Drawing one answer in the terminal: streamed text, dimmed reasoning, Markdown at the end.

Tokens are printed as they come (soft-wrapped by the terminal, so nothing is re-laid out while
streaming). When the answer is complete and looks like Markdown, the streamed text is replaced
by rich's rendering of it, if it still fits on the screen (text that scrolled away cannot be
redrawn, so a long answer stays as streamed). Off a terminal, text is printed plainly.
"""

from __future__ import annotations

import math
import re

from rich.console import Console
from rich.markdown import Markdown

_MARKDOWN = re.compile(r"(^#{1,6}\s|^\s*```|^\s*[-*+]\s|^\s*\d+[.)]\s|\*\*[^*]+\*\*|`[^`\n]+`|^\|.*\|\s*$|\[[^\]]+\]\([^)]+\))",
                       re.MULTILINE)


def looks_like_markdown(text: str) -> bool:
    return bool(_MARKDOWN.search(text))


def rows_used(text: str, width: int) -> int:
    """Terminal rows `text` takes when printed from column 0 and wrapped at `width` cells."""
    from rich.cells import cell_len

    width = max(width, 1)
    return sum(max(1, math.ceil(cell_len(line) / width)) for line in text.split("\n"))


class AnswerView:
    """Streams one reply to `console`; call reasoning()/content() per event, then end()."""

    def __init__(self, console: Console, markdown: bool = True):
        self.console = console
        self.markdown = markdown and console.is_terminal
        self.state = None  # None, "reasoning", "content"
        self.content_text = ""
        self.at_line_start = True

    def _write(self, text: str, style: str | None = None) -> None:
        if not text:
            return
        self.console.print(text, end="", style=style, markup=False, highlight=False, soft_wrap=True)
        self.console.file.flush()
        self.at_line_start = text.endswith("\n")

    def _newline(self) -> None:
        if not self.at_line_start:
            self._write("\n")

    def reasoning(self, text: str) -> None:
        if self.state != "reasoning":
            self._newline()
            self._write("Thinking\n", style="dim bold")
            self.state = "reasoning"
            text = text.lstrip("\n")
        self._write(text, style="dim italic")

    def content(self, text: str) -> None:
        if self.state != "content":
            if self.state == "reasoning":
                self._newline()
                self._write("\n")
            text = text.lstrip("\n") if self.state is None or self.state == "reasoning" else text
            self.state = "content"
        self.content_text += text
        self._write(text)

    def end(self, note: str | None = None) -> None:
        """The answer is over. `note`: a dim remark after it (e.g. "[stopped]")."""
        redraw = (self.markdown and note is None and self.state == "content"
                  and looks_like_markdown(self.content_text))
        if redraw:
            rows = rows_used(self.content_text, self.console.width)
            if rows < self.console.height - 1:
                # Back to the answer's first row, clear to the end of the screen, re-render.
                up = rows - 1
                self.console.file.write(("\x1b[%dA" % up if up else "") + "\r\x1b[J")
                self.console.print(Markdown(self.content_text))
                self.at_line_start = True
        self._newline()
        if note is None and self.state is None:
            note = "(the model ended its turn without writing anything)"
        if note:
            self._write(note + "\n", style="dim")
