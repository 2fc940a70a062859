"""ChatSession over the real engine and tiny model, and the answer view's terminal output."""

import io
import json

import pytest
from rich.console import Console

from hybrid.chat.render import AnswerView, looks_like_markdown, rows_used
from hybrid.chat.session import ChatSession, Settings
from test_serve_support import CONTEXT, model


@pytest.fixture(scope="module")
def engine():
    from hybrid.engine.engine import Engine

    m = model()
    e = Engine(m, tokenizer=m.tokenizer, max_seqs=2, max_context=CONTEXT)
    yield e
    e.close()


def session(engine, **kw) -> ChatSession:
    return ChatSession(engine, model().tokenizer, Settings(temperature=0, **kw))


def test_instant_answer_is_content_and_recorded(engine):
    s = session(engine, max_tokens=6)
    reply = s.ask("hello")
    events = list(reply)
    assert reply.stats.completion_tokens <= 6 and reply.stats.finish_reason in ("stop", "length")
    assert "".join(e[1] for e in events if e[0] == "content") == reply.content
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    assert s.messages[1]["content"] == reply.content
    assert s.stats.turns == 1 and s.stats.completion_tokens == reply.stats.completion_tokens


def test_thinking_mode_streams_reasoning_and_prompt_differs(engine):
    s = session(engine, max_tokens=6, mode="thinking")
    ids_thinking, in_reasoning = s.prompt_ids("why?")
    assert in_reasoning
    s.set_mode("instant")
    ids_instant, in_reasoning = s.prompt_ids("why?")
    assert not in_reasoning and len(ids_instant) == len(ids_thinking) + 1  # "<think></think>" vs "<think>"
    s.set_mode("thinking")
    reply = s.ask("why?")
    list(reply)
    assert reply.reasoning and s.messages[-1]["reasoning_content"] == reply.reasoning
    with pytest.raises(ValueError, match="instant, thinking"):
        s.set_mode("fast")


def test_cancel_keeps_the_partial_answer(engine):
    s = session(engine, max_tokens=200)
    reply = s.ask("tell me a story")
    it = iter(reply)
    first = next(it)
    reply.cancel()
    assert reply.stats.finish_reason == "cancelled"
    assert s.messages[-1]["role"] == "assistant"
    assert s.messages[-1]["content"].startswith(first[1]) or first[0] == "reasoning"
    # The engine slot is free again: a new question is answered.
    list(s.ask("again"))
    assert s.stats.turns == 2


def test_a_reader_that_leaves_its_loop_cancels_the_answer(engine):
    """Ctrl-C in the body of the reader's loop (while it renders) drops the reply's generator
    before cancel() runs; that alone must stop the request and record the turn as cancelled
    (it was recorded as still running, and /stats said so)."""
    s = session(engine, max_tokens=200)
    reply = s.ask("tell me a story")
    for _ in reply:
        break  # the generator is closed here, as an exception out of the loop body closes it
    assert reply.stats.finish_reason == "cancelled" and reply.stats.completion_tokens >= 1
    reply.cancel()  # the repl's handler then runs: nothing more to record
    assert s.stats.turns == 1
    list(s.ask("again"))  # the engine slot is free again
    assert s.stats.turns == 2


def test_system_reset_save(engine, tmp_path):
    s = session(engine, max_tokens=3, system="Be brief.")
    list(s.ask("hi"))
    assert s.transcript()[0] == {"role": "system", "content": "Be brief."}
    s.save(tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant"]
    assert data["settings"]["system"] == "Be brief."
    assert s.save(str(tmp_path / "c.md")) == "markdown"
    assert "## user\n" in (tmp_path / "c.md").read_text()
    s.reset()
    assert s.transcript() == [{"role": "system", "content": "Be brief."}]


def test_too_long_conversation_is_refused_with_advice(engine):
    s = session(engine)
    with pytest.raises(ValueError, match="/reset"):
        s.ask("z" * (CONTEXT + 10))
    assert s.messages == []


def terminal(width=40, height=20):
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=width, height=height, color_system=None), buf


def test_markdown_answer_is_redrawn_when_it_fits():
    con, buf = terminal()
    view = AnswerView(con)
    view.reasoning("let me think")
    for piece in ["Here:\n", "- one\n", "- **two**"]:
        view.content(piece)
    view.end()
    out = buf.getvalue()
    assert "Thinking" in out and "let me think" in out
    assert "- **two**" in out  # as streamed
    assert "\x1b[2A\r\x1b[J" in out  # back up over the 3 streamed rows and clear
    assert "•" in out and "two" in out.split("\x1b[J")[-1]  # rich's rendering of the list


def test_plain_text_long_text_and_pipes_are_left_as_streamed():
    con, buf = terminal()
    view = AnswerView(con)
    view.content("just words, no markup")
    view.end()
    assert "\x1b[J" not in buf.getvalue()
    con, buf = terminal(height=5)
    view = AnswerView(con)
    view.content("# Title\n" + "line\n" * 10)
    view.end()
    assert "\x1b[J" not in buf.getvalue()  # scrolled off: cannot be redrawn
    pipe = io.StringIO()
    view = AnswerView(Console(file=pipe, force_terminal=False))
    view.content("**bold**")
    view.end("[stopped]")
    assert pipe.getvalue() == "**bold**\n[stopped]\n"


def test_markdown_detection_and_row_counting():
    assert looks_like_markdown("```python\nx\n```") and looks_like_markdown("1. first")
    assert not looks_like_markdown("A plain sentence. Another one.")
    assert rows_used("abc", 10) == 1
    assert rows_used("a" * 25, 10) == 3
    assert rows_used("x\n\ny", 10) == 3
    assert rows_used("漢字漢字漢字", 10) == 2  # wide characters take two cells


def test_next_turn_reuses_the_conversation_prefix(engine):
    s = session(engine, max_tokens=4)
    first = s.ask("first question")
    list(first)
    second = s.ask("second question")
    list(second)
    # The whole first prompt is a prefix of the second one, and its KV is still in the slot.
    assert second.stats.reused_tokens >= first.stats.prompt_tokens
    assert second.stats.reused_tokens < second.stats.prompt_tokens
