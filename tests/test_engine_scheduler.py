"""The continuous-batching engine on a tiny real transformer: concurrent requests match a
from-scratch greedy reference, batching does not change results, cancel frees the slot,
queueing, chunked prefill interleaved with decoding, stop strings, async streaming, errors."""

import asyncio
import threading

import pytest
import torch
from test_engine_model import (TinyLM, full_logits, one_thread, reference_greedy,  # noqa: F401
                               tiny_tokenizer)

from hybrid.engine import Engine, GenerationError, SamplingParams

GREEDY = SamplingParams(temperature=0)


class RecordingLM(TinyLM):
    """TinyLM that records each step's (slots, positions) and can hold a step until released."""

    def __init__(self):
        super().__init__()
        self.steps = []
        self.gate = None  # a threading.Semaphore: each step takes one permit
        self.entered = threading.Semaphore(0)
        self.fail_on_slot = None
        self.nan_on_slot = None

    def forward(self, input_ids, positions, slots, cache, logits_index=None):
        self.steps.append((slots.tolist(), positions.tolist()))
        self.entered.release()
        if self.gate is not None:
            assert self.gate.acquire(timeout=10), "test gate never opened"
        if self.fail_on_slot is not None and self.fail_on_slot in slots.tolist():
            raise RuntimeError("injected failure")
        logits = super().forward(input_ids, positions, slots, cache, logits_index)
        if self.nan_on_slot is not None:
            rows = slots if logits_index is None else slots[logits_index]
            logits[rows == self.nan_on_slot] = float("nan")
        return logits


@pytest.fixture
def model(one_thread):
    return RecordingLM()


def make_engine(model, tok, max_seqs=4, prefill_chunk=512, max_context=128):
    return Engine(model, tok, max_seqs=max_seqs, max_context=max_context,
                  prefill_chunk=prefill_chunk, cache=model.make_cache(max_seqs, max_context))


def prompts(tok, n):
    return [tok.encode(f"request {i}: hello there " + "x" * i) for i in range(n)]


def test_concurrent_requests_match_reference_and_batching_changes_nothing(model, tiny_tokenizer):
    tok = tiny_tokenizer
    ps = prompts(tok, 6)
    refs = [reference_greedy(model, p, 10, tok.stop_token_ids) for p in ps]
    with make_engine(model, tok, max_seqs=4) as eng:
        alone = [eng.generate(p, GREEDY, max_tokens=10) for p in ps]
        handles = [eng.submit(p, GREEDY, max_tokens=10) for p in ps]  # 6 requests, 4 slots
        batched = [h.result() for h in handles]
        stats = eng.stats()
    assert alone == refs
    assert [c.token_ids for c in batched] == refs
    for c, p in zip(batched, ps):
        assert c.usage.prompt_tokens == len(p)
        assert c.text == tok.decode(c.token_ids)
    assert max(len(set(slots)) for slots, _ in model.steps) == 4  # really batched
    assert stats["requests_finished"] == 12 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["generated_tokens"] == sum(c.usage.completion_tokens for c in batched) * 2


def test_seeded_sampling_same_alone_and_batched(model, tiny_tokenizer):
    tok = tiny_tokenizer
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=123, ignore_eos=True)
    with make_engine(model, tok) as eng:
        alone = eng.generate(prompts(tok, 1)[0], p, max_tokens=12)
        others = [eng.submit(q, SamplingParams(seed=i, ignore_eos=True), max_tokens=12)
                  for i, q in enumerate(prompts(tok, 3))]
        again = eng.generate(prompts(tok, 1)[0], p, max_tokens=12)
        [h.result() for h in others]
    assert alone == again and len(alone) == 12


def open_gate(model):
    gate, model.gate = model.gate, None
    gate.release(1000)  # wakes a step already waiting on it


def test_queueing_is_visible_and_cancel_frees_the_slot(model, tiny_tokenizer):
    tok = tiny_tokenizer
    model.gate = threading.Semaphore(0)
    eng = make_engine(model, tok, max_seqs=1)
    try:
        long = eng.submit(prompts(tok, 1)[0], SamplingParams(ignore_eos=True, seed=0))
        queued = [eng.submit(q, GREEDY, max_tokens=3) for q in prompts(tok, 3)[1:]]
        assert model.entered.acquire(timeout=10)  # step 1 (long's prefill) is inside forward
        s = eng.stats()
        assert (s["running"], s["waiting"]) == (1, 2)
        model.gate.release()
        events = iter(long)
        first = next(events)
        assert first.finish_reason is None and len(first.token_ids) == 1
        long.cancel()  # step 2 is held in forward: the cancel lands after it
        open_gate(model)
        rest = list(events)
        assert rest[-1].finish_reason == "cancelled"
        assert rest[-1].usage.completion_tokens == 1 + sum(len(e.token_ids) for e in rest)
        done = [h.result() for h in queued]  # the freed slot serves the queue
        assert all(c.finish_reason in ("length", "stop") for c in done)
        assert eng.cache.resets == []  # freed slots keep their KV for prefix reuse
        assert eng.stats()["requests_cancelled"] == 1
    finally:
        if model.gate is not None:
            open_gate(model)
        eng.close()


def test_cancel_while_waiting_never_runs(model, tiny_tokenizer):
    tok = tiny_tokenizer
    model.gate = threading.Semaphore(0)
    eng = make_engine(model, tok, max_seqs=1)
    try:
        first, second = prompts(tok, 2)
        running = eng.submit(first, SamplingParams(temperature=0, ignore_eos=True), max_tokens=2)
        waiting = eng.submit(second, GREEDY, max_tokens=2)
        assert model.entered.acquire(timeout=10)
        waiting.cancel()
        c = waiting.result()  # answered at once, while the engine is still inside a step
        assert c.finish_reason == "cancelled" and c.token_ids == [] and c.usage.completion_tokens == 0
        open_gate(model)
        assert running.result().finish_reason == "length"
        s = eng.stats()
        assert s["prompt_tokens"] == len(first) and s["requests_cancelled"] == 1
        assert len(model.steps) == 2  # prefill + one decode, nothing for the cancelled one
    finally:
        if model.gate is not None:
            open_gate(model)
        eng.close()


def test_chunked_prefill_interleaves_with_decoding(model, tiny_tokenizer):
    tok = tiny_tokenizer
    short = tok.encode("hi")
    long = list(range(300, 340))  # 40 prompt tokens, read 8 per step
    ref_long = reference_greedy(model, long, 4, tok.stop_token_ids)
    with make_engine(model, tok, max_seqs=2, prefill_chunk=8) as eng:
        a = eng.submit(short, SamplingParams(ignore_eos=True, temperature=0), max_tokens=30)
        it = iter(a)
        next(it)  # a is decoding now
        b = eng.submit(long, GREEDY, max_tokens=4)
        out_b = b.result()
        list(it)
    assert out_b.token_ids == ref_long
    slot_a = model.steps[0][0][0]
    b_steps = [(s, p) for s, p in model.steps if any(x != slot_a for x in s)]
    prefill = [(s, p) for s, p in b_steps if sum(x != slot_a for x in s) > 1]
    assert len(prefill) == 5  # ceil(40 / 8)
    for s, p in prefill:
        assert sum(x != slot_a for x in s) == 8
        assert s.count(slot_a) == 1  # a's decode token rides along in every prefill step
    # prompt positions are read in order, chunk after chunk
    b_pos = [q for s, p in prefill for x, q in zip(s, p) if x != slot_a]
    assert b_pos == list(range(40))


def test_prefix_reuse_reads_only_the_new_tokens(model, tiny_tokenizer):
    tok = tiny_tokenizer
    first = tok.encode("system: be brief. user: hello there")
    greedy = SamplingParams(temperature=0, ignore_eos=True)
    with make_engine(model, tok, max_seqs=2) as eng:
        out1 = eng.generate(first, greedy, max_tokens=5)
        slot1 = model.steps[0][0][0]
        # an unrelated prompt takes the other, empty slot: the history stays
        other = tok.encode("unrelated words")
        eng.generate(other, greedy, max_tokens=2)
        assert model.steps[-1][0][0] != slot1
        # the next chat turn: everything before plus new text
        second = first + out1 + tok.encode(" user: and then?")
        n_steps = len(model.steps)
        done = eng.complete(second, greedy, max_tokens=5)
        out2 = done.token_ids
        stats = eng.stats()
    reused = len(first) + len(out1) - 1  # the last answer token was never fed
    assert stats["prompt_tokens_reused"] == reused
    # ... and the request's own usage says so (the servers' cached_tokens / cache_read_input_tokens)
    assert done.usage.cached_tokens == reused and done.usage.prompt_tokens == len(second)
    slots, positions = model.steps[n_steps]
    assert set(slots) == {slot1} and positions == list(range(reused, len(second)))
    assert out2 == reference_greedy(model, second, 5)


def test_stop_string_in_engine(model, tiny_tokenizer):
    tok = tiny_tokenizer
    p = prompts(tok, 1)[0]
    with make_engine(model, tok) as eng:
        full = eng.complete(p, SamplingParams(temperature=0, ignore_eos=True), max_tokens=8)
        # a stop string that starts inside token 2's text and ends inside token 3's
        t2, t3 = tok.decode(full.token_ids[2:3]), tok.decode(full.token_ids[3:4])
        stop = t2[-2:] + t3[:2]
        cut = eng.complete(p, SamplingParams(temperature=0, ignore_eos=True), stop=[stop],
                           max_tokens=8)
    expect = full.text[:full.text.index(stop)]
    assert cut.finish_reason == "stop" and cut.text == expect
    assert full.finish_reason == "length" and full.usage.completion_tokens == 8


def test_async_iteration_and_disconnect(model, tiny_tokenizer):
    tok = tiny_tokenizer
    ps = prompts(tok, 3)

    async def main(eng):
        async def consume(p):
            ids = []
            async for ev in eng.submit(p, GREEDY, max_tokens=6).aiter():
                ids += ev.token_ids
            return ids

        results = await asyncio.gather(*(consume(p) for p in ps))
        # a client that goes away: its task is cancelled mid-stream
        h = eng.submit(ps[0], SamplingParams(ignore_eos=True, seed=1), max_tokens=100)
        got_one = asyncio.Event()

        async def reader():
            async for _ in h.aiter():
                got_one.set()

        task = asyncio.create_task(reader())
        await got_one.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return results, h

    with make_engine(model, tok) as eng:
        results, h = asyncio.run(main(eng))
        final = list(h)[-1]  # the events left after the reader went away
        refs = [eng.generate(p, GREEDY, max_tokens=6) for p in ps]
        assert eng.stats()["requests_cancelled"] == 1
    assert results == refs
    assert final.finish_reason == "cancelled" and final.usage.completion_tokens < 100


def test_failed_step_fails_its_requests_only(model, tiny_tokenizer):
    tok = tiny_tokenizer
    with make_engine(model, tok, max_seqs=1) as eng:
        model.fail_on_slot = 0
        with pytest.raises(GenerationError, match="injected failure"):
            eng.generate(prompts(tok, 1)[0], GREEDY, max_tokens=3)
        model.fail_on_slot = None
        assert eng.cache.resets == [0]  # a failed step may leave half-written KV: reset
        p = prompts(tok, 1)[0]
        assert eng.generate(p, GREEDY, max_tokens=3) == reference_greedy(model, p, 3, tok.stop_token_ids)
        s = eng.stats()
        assert s["requests_failed"] == 1 and s["prompt_tokens_reused"] == 0


def test_nan_logits_fail_only_that_request(model, tiny_tokenizer):
    tok = tiny_tokenizer
    greedy = SamplingParams(temperature=0, ignore_eos=True)
    with make_engine(model, tok, max_seqs=2) as eng:
        model.nan_on_slot = 1
        # Held at the gate, a cannot finish before b is submitted: a finished a would leave
        # slot 0 holding the prefix the two prompts share ("request "), b would reuse it, and
        # no NaN would reach b (what made this test flaky on a busy machine).
        model.gate = threading.Semaphore(0)
        a, b = (eng.submit(p, greedy, max_tokens=4) for p in prompts(tok, 2))  # slots 0 and 1
        open_gate(model)
        assert len(a.result().token_ids) == 4
        with pytest.raises(GenerationError, match="NaN logits"):
            b.result()
        assert eng.cache.resets == [1]
        assert eng.stats()["requests_failed"] == 1


def test_bad_requests_get_clear_errors(model, tiny_tokenizer):
    tok = tiny_tokenizer
    with make_engine(model, tok, max_context=32) as eng:
        with pytest.raises(ValueError, match="context limit of 32"):
            eng.submit(list(range(30)), GREEDY, max_tokens=5)
        with pytest.raises(ValueError, match="no room to generate"):
            eng.submit(list(range(32)), GREEDY)
        with pytest.raises(ValueError, match="empty"):
            eng.submit([], GREEDY)
        with pytest.raises(ValueError, match=r"prompt_ids\[1\]=99999"):
            eng.submit([1, 99999], GREEDY)
        with pytest.raises(TypeError, match="encode text"):
            eng.submit("hello", GREEDY)
        with pytest.raises(ValueError, match="max_tokens"):
            eng.submit([1, 2], GREEDY, max_tokens=0)
        # max_tokens defaults to the room left
        c = eng.complete(list(range(1, 29)), SamplingParams(temperature=0, ignore_eos=True))
        assert c.finish_reason == "length" and c.usage.completion_tokens == 4
    with pytest.raises(RuntimeError, match="closed"):
        eng.submit([1], GREEDY)
    with pytest.raises(ValueError, match="max_seqs"):
        Engine(model, tok, max_seqs=0, cache=model.make_cache(1, 8))
    with pytest.raises(ValueError, match="cache has 1 slots"):
        Engine(model, tok, max_seqs=2, cache=model.make_cache(1, 8))


def test_logprobs_in_events(model, tiny_tokenizer):
    tok = tiny_tokenizer
    p = prompts(tok, 1)[0]
    with make_engine(model, tok) as eng:
        c = eng.complete(p, SamplingParams(temperature=0, logprobs=3, ignore_eos=True), max_tokens=4)
    assert len(c.logprobs) == 4
    with torch.no_grad():
        ref = torch.log_softmax(model.forward(
            torch.tensor(p), torch.arange(len(p)), torch.zeros(len(p), dtype=torch.long),
            model.make_cache(1, 128))[-1], -1)
    first = c.logprobs[0]
    assert first.token_id == c.token_ids[0] == first.top[0][0]
    assert first.logprob == pytest.approx(float(ref[first.token_id]), abs=1e-5)
    assert len(first.top) == 3


def test_padded_lm_head_rows_are_never_sampled(tiny_tokenizer, one_thread):
    tok = tiny_tokenizer
    model = TinyLM(vocab=tok.vocab_size + 64)
    prompt = tok.encode("hello")
    with torch.no_grad():
        model.head[:, tok.vocab_size:] = 0.0
        # make the padded rows the model's favourites, by far
        model.head[:, tok.vocab_size:] += 100.0 * torch.sign(full_logits_features(model, prompt))[:, None]
        assert int(full_logits(model, prompt).argmax()) >= tok.vocab_size
    with make_engine(model, tok) as eng:
        for params in (SamplingParams(temperature=0, ignore_eos=True),
                       SamplingParams(temperature=1.0, seed=3, ignore_eos=True)):
            c = eng.complete(prompt, params, max_tokens=6)
            assert c.finish_reason == "length"
            assert all(t < tok.vocab_size for t in c.token_ids)


def full_logits_features(model, ids):
    """The final normed hidden state of the last token (what the LM head multiplies)."""
    head = model.head.data.clone()
    model.head.data = torch.eye(model.hidden, dtype=head.dtype)
    try:
        return full_logits(model, ids)
    finally:
        model.head.data = head


class LayerwiseLM(TinyLM):
    """TinyLM that says layerwise forwards hold 10 to 15 tokens (Model.layerwise_chunks)."""

    def layerwise_chunks(self):
        return (10, 15)


def test_long_prompt_chunks_stay_within_the_layerwise_bounds(tiny_tokenizer, one_thread):
    """With nothing decoding, a long prompt is read in layerwise-sized chunks: the threshold, or
    all that is left under twice it, but never more than the most the device's memory allows;
    a prompt under the threshold goes the usual budgeted way."""
    with make_engine(LayerwiseLM(), tiny_tokenizer, prefill_chunk=4) as eng:
        assert [eng._long_chunk(n) for n in (9, 10, 12, 15, 16, 19, 20, 37)] == [0, 10, 12, 15, 15, 15, 10, 10]
    with make_engine(TinyLM(), tiny_tokenizer, prefill_chunk=4) as eng:   # no layerwise prefill
        assert eng._long_chunk(1000) == 0
