"""Reading the user's message: prompt_toolkit on a terminal, plain input() otherwise.

On a terminal: history (kept in a file across sessions, searchable with Ctrl-R), and multi-line
editing: Enter sends, Alt-Enter (or Esc then Enter) starts a new line, pasted text keeps its
lines. Without a terminal (piped input, scripts): one line per message, and a line ending in a
backslash continues on the next.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_history_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "hybrid" / "chat_history"


class LineReader:
    """read(prompt) -> the message text; raises EOFError at end of input (Ctrl-D) and
    KeyboardInterrupt on Ctrl-C."""

    def __init__(self, history_path: Path | None = None, interactive: bool | None = None):
        if interactive is None:
            interactive = sys.stdin.isatty() and sys.stdout.isatty()
        self.interactive = interactive
        self._session = None
        if interactive:
            self._session = self._make_session(history_path)

    @staticmethod
    def _make_session(history_path: Path | None):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        history = InMemoryHistory()
        if history_path is not None:
            try:
                history_path.parent.mkdir(parents=True, exist_ok=True)
                history = FileHistory(str(history_path))
            except OSError:
                pass  # a read-only home: keep history for this session only
        keys = KeyBindings()

        @keys.add("enter")
        def _send(event):
            event.current_buffer.validate_and_handle()

        @keys.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        return PromptSession(history=history, key_bindings=keys, multiline=True,
                             prompt_continuation=lambda width, line, soft: "." * (width - 1) + " ")

    def read(self, prompt: str) -> str:
        if self._session is not None:
            return self._session.prompt(prompt)
        lines = []
        text = input(prompt)
        while text.endswith("\\"):
            lines.append(text[:-1])
            text = input("")
        lines.append(text)
        return "\n".join(lines)
