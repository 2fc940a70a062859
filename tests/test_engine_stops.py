"""Stop strings across token boundaries, held-back streaming text, stop tokens, max_tokens, and
UTF-8 characters split across tokens."""

import pytest
from test_engine_model import N_BASE, tiny_tokenizer  # noqa: F401  (fixture)

from hybrid.engine.stops import StopState, StopStrings


def run(stops, pieces):
    s = StopStrings(stops)
    out, hit = [], False
    for p in pieces:
        text, hit = s.feed(p)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(s.flush())
    return out, hit, s.matched


def test_stop_string_across_pieces_is_never_emitted():
    out, hit, matched = run(["</answer>"], ["Hel", "lo </", "ans", "wer> tail"])
    assert hit and matched == "</answer>"
    assert "".join(out) == "Hello "
    assert out == ["Hel", "lo ", "", ""]  # "</" and "</ans" were held back


def test_held_text_is_released_when_it_cannot_be_a_stop():
    out, hit, _ = run(["abc"], ["xa", "bd", "ab"])
    assert not hit
    assert out == ["x", "abd", "", "ab"]  # the last "ab" comes out at flush
    assert "".join(out) == "xabdab"


def test_earliest_of_several_stops_wins():
    out, hit, matched = run(["world", "lo w"], ["hello world"])
    assert hit and matched == "lo w" and out == ["hel"]


def test_stop_inside_one_piece_and_at_start():
    assert run(["\n\n"], ["a\n\nb"])[0] == ["a"]
    assert run(["STOP"], ["STOP now"])[0] == [""]


def test_bad_stop_strings():
    with pytest.raises(ValueError, match=r"stop\[1\]"):
        StopStrings(["ok", ""])


def stream(tok, ids, stop=(), max_tokens=None, stop_ids=()):
    st = StopState(tok.incremental_decoder(), stop_ids, stop, max_tokens)
    deltas, reason = [], None
    for t in ids:
        text, reason = st.on_token(t)
        deltas.append(text)
        if reason:
            break
    return deltas, reason


def test_utf8_split_across_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "héllo 世界 🙂!"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # byte tokens: multi-byte characters span several tokens
    deltas, reason = stream(tok, ids, max_tokens=len(ids))
    assert reason == "length"
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some tokens were held until their character was complete


def test_unfinished_character_at_the_end_is_flushed_as_replacement(tiny_tokenizer):
    ids = tiny_tokenizer.encode("a世")[:-1]  # cut the 3-byte character short
    deltas, reason = stream(tiny_tokenizer, ids, max_tokens=len(ids))
    assert reason == "length" and "".join(deltas) == "a\ufffd"


def test_stop_token_is_not_shown(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = N_BASE + 1
    deltas, reason = stream(tok, tok.encode("hi") + [eos, 65], stop_ids=[eos])
    assert reason == "stop" and "".join(deltas) == "hi"
    assert len(deltas) == 3  # nothing read after the stop token


def test_stop_string_spanning_tokens_with_multibyte(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode("答案是42。结束了")
    deltas, reason = stream(tok, ids, stop=["。结束"])
    assert reason == "stop" and "".join(deltas) == "答案是42"


def test_length_flushes_held_text(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode("abc</ans")
    deltas, reason = stream(tok, ids, stop=["</answer>"], max_tokens=len(ids))
    assert reason == "length" and "".join(deltas) == "abc</ans"


def test_special_tokens_are_text_when_not_stops(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = [N_BASE + 7] + tok.encode("hm") + [N_BASE + 8]
    deltas, _ = stream(tok, ids, max_tokens=len(ids))
    assert "".join(deltas) == "<think>hm</think>"
