"""`hybrid chat` driven through a pseudo-terminal (pexpect), and through a pipe.

The model is the tiny random checkpoint with its stop tokens silenced (greedy answers always
run to --max-tokens), so an answer is long enough to interrupt with Ctrl-C deterministically.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from test_serve_support import no_stop_checkpoint_dir

REPO = Path(__file__).resolve().parents[1]
# A fresh prompt: prompt_toolkit draws "[mode] >" and moves the cursor (an escape sequence comes
# next). When a line is accepted it redraws "[mode] > TEXT", which must not count as a new prompt.
PROMPT_INSTANT = r"\[instant\] >\x1b"
PROMPT_THINKING = r"\[thinking\] >\x1b"


def env(tmp_path) -> dict:
    e = dict(os.environ)
    e.update(PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""), TERM="xterm-256color",
             PROMPT_TOOLKIT_NO_CPR="1", XDG_STATE_HOME=str(tmp_path / "state"), COLUMNS="100", LINES="40")
    return e


@pytest.fixture(autouse=True)
def show_session_on_failure(tmp_path):
    """Print the pty transcript after each test; pytest shows it only when the test failed."""
    yield
    log = tmp_path / "pty.log"
    if log.exists():
        text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", log.read_text(errors="replace"))
        print("---- pty transcript (escape codes removed) ----\n" + text[-4000:])


def spawn(tmp_path, *args, mode: str | None = "instant") -> pexpect.spawn:
    """mode None: the model's default (its template's: thinking for the test checkpoint)."""
    argv = ["-m", "hybrid", "chat", str(no_stop_checkpoint_dir()), "--temperature", "0", *args]
    if mode is not None:
        argv += ["--mode", mode]
    child = pexpect.spawn(sys.executable, argv, env=env(tmp_path), encoding="utf-8", timeout=60,
                          dimensions=(40, 100))
    child.logfile_read = open(tmp_path / "pty.log", "w")  # the whole session, for a failure's report
    child.expect(PROMPT_INSTANT if mode == "instant" else PROMPT_THINKING)
    return child


def test_chat_starts_in_the_models_default_mode(tmp_path):
    # The Kimi template's default is thinking, as `hybrid serve` answers by default.
    child = spawn(tmp_path, "--max-tokens", "4", mode=None)
    child.sendeof()
    child.expect(pexpect.EOF)


def test_chat_in_a_terminal(tmp_path):
    child = spawn(tmp_path, "--max-tokens", "8")
    try:
        # A question gets a streamed answer, then the prompt comes back.
        child.sendline("Hello there")
        child.expect(PROMPT_INSTANT)
        child.sendline("/stats")
        child.expect(r"answer\s+8 tokens")
        child.expect(r"ended by\s+length")
        child.expect(PROMPT_INSTANT)

        # Thinking mode: the reasoning is shown under its own header.
        child.sendline("/mode thinking")
        child.expect("mode: thinking")
        child.expect(PROMPT_THINKING)
        child.sendline("Why?")
        child.expect("Thinking")
        child.expect(PROMPT_THINKING)
        child.sendline("/mode instant")
        child.expect(PROMPT_INSTANT)

        child.sendline("/system Be brief.")
        child.expect("system prompt set")
        child.expect(PROMPT_INSTANT)
        save = tmp_path / "chat.json"
        child.sendline(f"/save {save}")
        child.expect("saved 5 messages")  # system + two questions and two answers
        child.expect(PROMPT_INSTANT)
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect(PROMPT_INSTANT)
        child.sendline("/nonsense")
        child.expect("unknown command /nonsense")
        child.expect(PROMPT_INSTANT)

        # Ctrl-C at the prompt does not quit.
        child.sendcontrol("c")
        child.expect(r"Ctrl-D or /exit to quit")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    import json

    saved = json.loads(save.read_text())
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert saved["messages"][4].get("reasoning_content")


def test_ctrl_c_stops_the_answer_not_the_program(tmp_path):
    child = spawn(tmp_path, "--max-tokens", "900", "--context-length", "1024")
    try:
        child.sendline("Tell me everything")
        # prompt_toolkit turns bracketed paste off when it hands the line over; the answer
        # streams after that. Wait for some of it, then interrupt.
        child.expect_exact("\x1b[?2004l")
        child.expect(re.compile(".{40}", re.S))
        child.sendcontrol("c")
        child.expect(r"\[stopped\]")
        child.expect(PROMPT_INSTANT)
        child.sendline("/stats")
        child.expect(r"answer\s+(\d+) tokens")
        n = int(child.match.group(1))
        child.expect(r"ended by\s+cancelled")
        child.expect(PROMPT_INSTANT)
        # The program still answers, and can be stopped again.
        child.sendline("Again")
        child.expect_exact("\x1b[?2004l")
        child.expect(re.compile(".{40}", re.S))
        child.sendcontrol("c")
        child.expect(r"\[stopped\]")
        child.expect(PROMPT_INSTANT)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert 0 < n < 900
    assert child.exitstatus == 0


def test_piped_input_without_a_terminal(tmp_path):
    script = "Hello\n/mode thinking\nMore \\\nlines\n/stats\n"
    r = subprocess.run([sys.executable, "-m", "hybrid", "chat", str(no_stop_checkpoint_dir()), "--temperature", "0",
                        "--max-tokens", "8"], input=script, capture_output=True, text=True, env=env(tmp_path),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "mode: thinking" in r.stdout
    assert "session: 2 answers" in r.stdout
    assert "loading" in r.stderr and "loaded" in r.stderr


@pytest.mark.parametrize("args, code, needle", [
    (["/nonexistent/model/dir"], 1, "cannot load /nonexistent/model/dir: no such directory"),
    (["EMPTY_DIR"], 1, "cannot load EMPTY_DIR"),  # the loader's own complaint, one line
    (["--max-tokens", "0"], 2, "--max-tokens"),
    (["--temperature", "-1"], 2, "temperature"),
])
def test_bad_model_or_options_exit_with_a_message(tmp_path, args, code, needle):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(empty) if a == "EMPTY_DIR" else a for a in args]
    needle = needle.replace("EMPTY_DIR", str(empty))
    r = subprocess.run([sys.executable, "-m", "hybrid", "chat", *args], capture_output=True, text=True,
                       env=env(tmp_path), timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == code
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
