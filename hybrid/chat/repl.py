"""The `hybrid chat` loop: read a message or a /command, stream the answer, repeat.

Ctrl-C while an answer streams stops that answer (the engine request is cancelled, the partial
answer stays in the history); Ctrl-C at the prompt clears the line; Ctrl-D or /exit quits.
"""

from __future__ import annotations

from rich.console import Console

from hybrid.chat.prompt import LineReader
from hybrid.chat.render import AnswerView
from hybrid.chat.session import MODES, ChatSession

HELP = """\
Commands:
  /mode [instant|thinking]  show or switch mode (thinking: reasoning, dimmed)
  /system [TEXT|clear]      show, set or clear the system prompt
  /reset                    forget the conversation (keeps mode, system prompt)
  /stats                    tokens, speed and time per phase
  /save FILE                save the conversation (.md: Markdown, else JSON)
  /image PATH               attach an image to the next message (a model with a vision tower)
  /help                     this text
  /exit                     quit (also Ctrl-D)
Enter sends; Alt-Enter (or Esc then Enter) adds a line; Ctrl-C stops an answer."""


class ChatApp:
    def __init__(self, session: ChatSession, console: Console, reader: LineReader, markdown: bool = True):
        self.session = session
        self.console = console
        self.reader = reader
        self.markdown = markdown

    def say(self, text: str, style: str | None = "cyan") -> None:
        self.console.print(text, style=style, markup=False, highlight=False)

    def run(self) -> int:
        import signal

        # Ctrl-C must stop an answer even when this process was started with SIGINT ignored (a
        # shell's background job, which then passes that on to all it runs: python installs no
        # KeyboardInterrupt handler for an ignored SIGINT).
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        s = self.session.settings
        self.say(f"hybrid chat - {s.mode} mode. /help for commands, Ctrl-D to quit.")
        while True:
            try:
                text = self.reader.read(f"[{self.session.settings.mode}] > ")
            except EOFError:
                self.console.print()
                return 0
            except KeyboardInterrupt:
                self.say("(Ctrl-D or /exit to quit)", style="dim")
                continue
            text = text.strip()
            if not text:
                continue
            if text.startswith("/"):
                if self.command(text) == "exit":
                    return 0
                continue
            self.answer(text)

    # ---- answering ------------------------------------------------------------------------

    def answer(self, text: str) -> None:
        from hybrid.engine.request import GenerationError

        try:
            reply = self.session.ask(text)
        except ValueError as e:
            self.say(f"error: {e}", style="red")
            return
        except KeyboardInterrupt:  # before the answer started
            self.say("[stopped]", style="dim")
            return
        view = AnswerView(self.console, markdown=self.markdown)
        note = None
        try:
            for ev in reply:
                if ev[0] == "reasoning":
                    view.reasoning(ev[1])
                elif ev[0] == "content":
                    view.content(ev[1])
        except KeyboardInterrupt:
            reply.cancel()
            note = "[stopped]"
        except GenerationError as e:
            note = f"[generation failed: {e}]"
        if note is None and reply.stats.finish_reason == "length":
            note = f"[cut off at {reply.stats.completion_tokens} tokens]"
        view.end(note)

    # ---- commands -------------------------------------------------------------------------

    def command(self, line: str) -> str | None:
        name, _, arg = line[1:].partition(" ")
        name, arg = name.lower(), arg.strip()
        s = self.session
        if name in ("exit", "quit", "q"):
            return "exit"
        if name == "help":
            self.say(HELP, style=None)
        elif name == "mode":
            if not arg:
                self.say(f"mode: {s.settings.mode} (choices: {', '.join(MODES)})")
            elif arg in MODES:
                s.set_mode(arg)
                self.say(f"mode: {arg}")
            else:
                self.say(f"unknown mode '{arg}'; choose {' or '.join(MODES)}", style="red")
        elif name == "system":
            if not arg:
                self.say(f"system prompt: {s.settings.system!r}" if s.settings.system else "no system prompt")
            elif arg == "clear":
                s.set_system(None)
                self.say("system prompt cleared")
            else:
                s.set_system(arg)
                self.say("system prompt set")
        elif name == "reset":
            s.reset()
            self.say("conversation cleared")
        elif name == "stats":
            self.say(self.stats_text(), style=None)
        elif name == "image":
            if not arg:
                self.say("usage: /image PATH", style="red")
            else:
                try:
                    im = s.attach_image(arg)
                    w, h = im.source_size
                    self.say(f"image {arg} ({w}x{h}, {im.tokens} tokens) goes with the next message")
                except ValueError as e:
                    self.say(f"error: {e}", style="red")
        elif name == "save":
            if not arg:
                self.say("usage: /save FILE", style="red")
            else:
                try:
                    kind = s.save(arg)
                    self.say(f"saved {len(s.transcript())} messages to {arg} ({kind})")
                except OSError as e:
                    self.say(f"cannot save to {arg}: {e}", style="red")
        else:
            self.say(f"unknown command /{name}; /help lists them", style="red")
        return None

    def stats_text(self) -> str:
        st = self.session.stats
        lines = []
        t = st.last
        if t is None:
            lines.append("no answers yet")
        else:
            lines += [
                "last answer:",
                f"  prompt     {t.prompt_tokens} tokens ({t.reused_tokens} reused from the last turn), "
                f"prefill {t.prefill_s:.2f} s ({t.prefill_tok_s:.1f} tok/s of new tokens)",
                f"  answer     {t.completion_tokens} tokens, decode {t.decode_s:.2f} s ({t.decode_tok_s:.1f} tok/s)",
                f"  ended by   {t.finish_reason or 'running'}",
            ]
        if st.turns:
            rate = (st.completion_tokens / st.decode_s) if st.decode_s > 0 else 0.0
            lines += [
                f"session: {st.turns} answers, {st.prompt_tokens} prompt + {st.completion_tokens} generated tokens,",
                f"  prefill {st.prefill_s:.2f} s, decode {st.decode_s:.2f} s ({rate:.1f} tok/s overall)",
            ]
        hit = self.session.cache_hit_rate()
        lines.append(f"GPU expert cache hit rate: {hit:.1%}" if hit is not None
                     else "GPU expert cache hit rate: n/a (no GPU expert cache in this run)")
        return "\n".join(lines)
