"""Sampling: exact truncation masks, penalties with OpenAI/CTRL numbers, seeded draws whose
frequencies match the target distribution, and per-row independence inside a batch."""

import math

import pytest
import torch

from hybrid.engine.sampling import (RowState, SamplingParams, apply_penalties, make_generator,
                                    sample, truncation_mask)


@pytest.fixture(autouse=True, scope="module")
def one_thread_module():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: the thread pool only adds overhead
    yield
    torch.set_num_threads(threads)


def row(params=None, seed=0, prompt=(), output=()):
    params = params or SamplingParams()
    return RowState(params=params, generator=make_generator(seed), prompt_ids=list(prompt),
                    output_ids=list(output))


def logits_of(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float32))


def kept(probs, top_k=0, top_p=1.0, min_p=0.0):
    sorted_probs = torch.tensor(probs)[None]  # already descending
    m = truncation_mask(sorted_probs, torch.tensor([top_k]), torch.tensor([top_p]),
                        torch.tensor([min_p]))
    return int((~m).sum())


P = [0.5, 0.3, 0.15, 0.05]


def test_top_k_mask_exact():
    assert [kept(P, top_k=k) for k in (1, 2, 3, 4, 9)] == [1, 2, 3, 4, 4]
    assert kept(P, top_k=0) == 4  # off


def test_top_p_mask_exact():
    # keep the smallest prefix whose mass reaches top_p
    assert kept(P, top_p=0.5) == 1
    assert kept(P, top_p=0.51) == 2
    assert kept(P, top_p=0.79) == 2
    assert kept(P, top_p=0.81) == 3
    assert kept(P, top_p=0.96) == 4
    assert kept(P, top_p=0.01) == 1  # the best token always stays


def test_min_p_mask_exact():
    # threshold = min_p x 0.5
    assert kept(P, min_p=0.61) == 1  # 0.305 > 0.3
    assert kept(P, min_p=0.59) == 2  # 0.295
    assert kept(P, min_p=0.29) == 3  # 0.145
    assert kept(P, min_p=0.09) == 4  # 0.045
    assert kept(P, min_p=1.0) == 1


def test_filters_compose_in_order():
    # top-k 3 renormalises to [0.526, 0.316, 0.158]; top-p 0.8 then keeps 2
    assert kept(P, top_k=3, top_p=0.8) == 2
    assert kept(P, top_k=2, min_p=0.01) == 2


def test_greedy_is_argmax_of_penalised_logits():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert sample(logits, [row(SamplingParams(temperature=0))])[0].token_id == 1
    # token 1 was generated twice: frequency 0.1 x 2 drops it below token 2
    r = row(SamplingParams(temperature=0, frequency_penalty=0.1), output=[1, 1])
    assert sample(logits, [r])[0].token_id == 2


def test_presence_frequency_penalties_openai_numbers():
    logits = torch.zeros(1, 5)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, [row(p, prompt=[4, 4], output=[1, 1, 1, 2])])
    # prompt tokens do not count for OpenAI penalties
    assert out[0].tolist() == pytest.approx([0.0, -0.5 - 0.75, -0.5 - 0.25, 0.0, 0.0])
    assert logits.abs().sum() == 0  # input untouched


def test_repetition_penalty_ctrl_numbers():
    logits = torch.tensor([[2.0, -2.0, 1.0, 4.0]])
    p = SamplingParams(repetition_penalty=2.0)
    out = apply_penalties(logits, [row(p, prompt=[0, 1], output=[0])])
    assert out[0].tolist() == pytest.approx([1.0, -4.0, 1.0, 4.0])


def test_draw_frequencies_match_distribution():
    probs = [0.6, 0.25, 0.1, 0.05]
    n = 4000
    logits = logits_of(probs)[None].expand(n, 4)
    rows = [row(seed=1000 + i) for i in range(n)]
    counts = torch.bincount(torch.tensor([s.token_id for s in sample(logits, rows)]), minlength=4)
    for c, p in zip(counts.tolist(), probs):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(c - n * p) < 4 * sigma, (counts, probs)


def test_temperature_and_truncation_change_distribution():
    probs = [0.6, 0.25, 0.1, 0.05]
    n = 4000
    logits = logits_of(probs)[None].expand(n, 4)
    # temperature 0.5 squares the probabilities (then renormalises)
    rows = [row(SamplingParams(temperature=0.5), seed=i) for i in range(n)]
    counts = torch.bincount(torch.tensor([s.token_id for s in sample(logits, rows)]), minlength=4)
    target = torch.tensor(probs) ** 2
    target = (target / target.sum()).tolist()
    for c, p in zip(counts.tolist(), target):
        assert abs(c - n * p) < 4 * math.sqrt(n * p * (1 - p)) + 1, (counts, target)
    # top-p 0.8 allows only tokens 0 and 1, in ratio 0.6 : 0.25
    rows = [row(SamplingParams(top_p=0.8), seed=i) for i in range(n)]
    counts = torch.bincount(torch.tensor([s.token_id for s in sample(logits, rows)]), minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    p0 = 0.6 / 0.85
    assert abs(counts[0] - n * p0) < 4 * math.sqrt(n * p0 * (1 - p0))


def test_seeded_rows_are_independent_of_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    params = SamplingParams(temperature=1.3, top_k=20, top_p=0.95, min_p=0.02, seed=7)
    r_alone = row(params, seed=7)
    seq_alone = [sample(logits[:1], [r_alone])[0].token_id for _ in range(20)]
    r0, r1, r2 = row(params, seed=7), row(SamplingParams(temperature=0)), row(seed=99)
    seq_batched = [sample(logits, [r0, r1, r2])[0].token_id for _ in range(20)]
    assert seq_alone == seq_batched
    assert len(set(seq_alone)) > 1  # it does sample


def test_logprobs_top_n():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    s = sample(logits, [row(SamplingParams(temperature=0, logprobs=2))])[0]
    ref = torch.log_softmax(logits[0], -1)
    assert s.token_id == 1
    assert s.logprob == pytest.approx(float(ref[1]))
    assert [i for i, _ in s.top_logprobs] == [1, 2]
    assert s.top_logprobs[1][1] == pytest.approx(float(ref[2]))
    s0 = sample(logits, [row(SamplingParams(logprobs=0))])[0]
    assert s0.top_logprobs == [] and s0.logprob is not None
    assert sample(logits, [row()])[0].logprob is None


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0), ("top_k", -5),
    ("top_k", 2.5), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
    ("frequency_penalty", float("nan")), ("logprobs", 50), ("seed", "x"),
])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("params", [
    SamplingParams(top_p=0.9), SamplingParams(top_k=5, top_p=0.97), SamplingParams(min_p=0.05),
    SamplingParams(temperature=2.0, top_p=0.999),  # flat: candidates do not cover, full sort
])
def test_candidate_shortcut_equals_full_sort(monkeypatch, params):
    import hybrid.engine.sampling as sampling

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=g) * 3.0

    def draw():
        rows = [row(params, seed=s) for s in range(6)]
        return [[x.token_id for x in sample(logits, rows)] for _ in range(30)]

    monkeypatch.setattr(sampling, "CANDIDATES", (16, 64))
    short = draw()
    monkeypatch.setattr(sampling, "CANDIDATES", ())
    assert short == draw()
