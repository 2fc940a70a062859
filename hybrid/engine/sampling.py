"""Token sampling for a batch of rows, each with its own parameters and random stream.

Order of operations for one row (the order HF and vLLM use, written out so tests can check it):

  1. penalties on the raw logits (OpenAI presence/frequency over generated tokens; CTRL-style
     repetition penalty over prompt + generated tokens);
  2. temperature 0 -> greedy argmax of the penalised logits, nothing below applies;
  3. divide by temperature;
  4. top-k: keep the k highest logits (0 = off);
  5. top-p: keep the smallest set of most likely tokens whose probability sums to >= top_p;
  6. min-p: keep tokens whose probability is >= min_p x the most likely token's probability;
  7. draw one token by inverse CDF with the row's own torch.Generator (seeded per request), so a
     request's samples do not depend on which other requests share its batch.

Before all of that, a row whose answer has not begun yet (SamplingParams.answer_after: the
preamble's end marker, </think>, was not drawn yet or only blank tokens followed it) cannot
draw its held tokens (the stop tokens): a reply never ends with reasoning and no answer; it
ends by its length limit instead, which says so. With a budget (answer_by) the marker is drawn
once that many tokens went by without it; after it, it is not drawn again. banned_ids are never
drawn. And a row whose request has a grammar (SamplingParams.grammar, see grammar.py) has every
token the grammar does not allow set to -inf; after the draw its matcher takes the token. Rows
without a grammar are not touched.

Logprobs (optional, top-n) are of the penalised (and grammar-masked) distribution before
temperature and truncation: what the model believes, not what the sampler was allowed to pick.

Legend: B rows in the batch, S rows that sample (not greedy), V vocabulary size, C candidate
tokens kept for truncation (C <= V).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class SamplingParams:
    """Per-request sampling settings. temperature == 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages repeats (CTRL / HF semantics)
    presence_penalty: float = 0.0  # OpenAI: -= p for every token generated at least once
    frequency_penalty: float = 0.0  # OpenAI: -= p x count of the token in the generated text
    seed: int | None = None  # None: a fresh random seed per request
    logprobs: int | None = None  # None: no logprobs; n >= 0: chosen token + top-n alternatives
    stop_token_ids: list[int] = field(default_factory=list)  # extra ids that end generation
    ignore_eos: bool = False  # keep going past the tokenizer's end tokens (benchmarks)
    grammar: object = None  # hybrid.engine.grammar.Grammar: only tokens it allows are drawn
    # The answer follows a preamble (reasoning) that ends with token `answer_after`: `held_ids`
    # (the stop tokens) cannot be drawn before that token and one more after it that is not
    # in `blank_ids`.
    answer_after: int | None = None
    held_ids: list[int] = field(default_factory=list)
    answer_by: int | None = None  # a preamble budget: after this many tokens, answer_after is drawn
    blank_ids: frozenset = frozenset()  # tokens that do not begin the answer (whitespace, markers)
    banned_ids: list[int] = field(default_factory=list)  # never drawn (markers with no place here)

    def __post_init__(self):
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def bad(name, value, why):
            raise ValueError(f"SamplingParams.{name}={value!r}: {why}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                bad(name, value, "must be a number")
            if value != value or value in (float("inf"), float("-inf")):
                bad(name, value, "must be finite")
        if self.temperature < 0:
            bad("temperature", self.temperature, "must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", self.min_p, "must be in [0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", self.top_k, "must be an integer >= 0 (0 or -1 = off)")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "must be > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(name, getattr(self, name), "must be in [-2, 2] (OpenAI range)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", self.seed, "must be an integer or None")
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
            or not 0 <= self.logprobs <= 20
        ):
            bad("logprobs", self.logprobs, "must be None or an integer in [0, 20]")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", self.stop_token_ids, "must be a list of token ids >= 0")
        from hybrid.engine.grammar import Grammar

        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            bad("grammar", self.grammar, "must be None or a hybrid.engine.grammar.Grammar")
        if self.answer_after is not None and (isinstance(self.answer_after, bool) or not isinstance(
                self.answer_after, int) or self.answer_after < 0 or not (self.held_ids or self.answer_by is not None)):
            bad("answer_after", self.answer_after, "must be None or a token id >= 0, with held_ids or answer_by given")
        for name in ("held_ids", "blank_ids", "banned_ids"):
            if not all(isinstance(t, int) and t >= 0 for t in getattr(self, name)):
                bad(name, getattr(self, name), "must be token ids >= 0")
        if self.answer_by is not None and (self.answer_after is None or isinstance(self.answer_by, bool)
                                           or not isinstance(self.answer_by, int) or self.answer_by < 0):
            bad("answer_by", self.answer_by, "must be None or an integer >= 0, with answer_after given")


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request; draws happen on the CPU so results match on any device."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


@dataclass
class RowState:
    """What the sampler needs to know about one request."""

    params: SamplingParams
    generator: torch.Generator
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    matcher: object = None  # grammar.Matcher of params.grammar (made here, one per request)
    answer_phase: int = 0  # with params.answer_after: 0 before it, 1 after it, 2 answer begun

    def __post_init__(self):
        if self.params.grammar is not None and self.matcher is None:
            self.matcher = self.params.grammar.matcher()


@dataclass
class Sampled:
    token_id: int
    logprob: float | None = None  # log p(chosen) under the penalised distribution
    top_logprobs: list[tuple[int, float]] | None = None  # n most likely (id, logprob), best first


def apply_penalties(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """Return logits [B, V] with each row's penalties applied (the input is not modified).
    Only the ids a row has seen are touched, so the cost is per seen token, not per V."""
    out = logits
    for b, row in enumerate(rows):
        p = row.params
        need_freq = (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and len(row.output_ids)
        need_rep = p.repetition_penalty != 1.0 and (len(row.prompt_ids) or len(row.output_ids))
        if not (need_freq or need_rep):
            continue
        if out is logits:
            out = logits.clone()
        if need_freq:
            ids, counts = torch.unique(torch.as_tensor(list(row.output_ids), dtype=torch.long),
                                       return_counts=True)
            ids, counts = ids.to(out.device), counts.to(out.device, out.dtype)
            out[b, ids] -= p.frequency_penalty * counts + p.presence_penalty
        if need_rep:
            seen = list(row.prompt_ids) + list(row.output_ids)
            ids = torch.unique(torch.as_tensor(seen, dtype=torch.long)).to(out.device)
            vals = out[b, ids]
            # Dividing a positive logit and multiplying a negative one both lower it.
            out[b, ids] = torch.where(vals > 0, vals / p.repetition_penalty,
                                      vals * p.repetition_penalty)
    return out


def truncation_mask(sorted_probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    min_p: torch.Tensor) -> torch.Tensor:
    """Which sorted positions are removed by top-k, then top-p, then min-p.

    sorted_probs [B, C]: the C most likely tokens' probabilities under the full (temperature
    scaled) distribution, descending; C may be less than V when the rest is known to be cut.
    top_k [B] (0 = off, at most C), top_p [B], min_p [B]. Returns a bool mask [B, C], True =
    removed. Each filter removes a suffix; position 0 (the best token) is never removed.
    """
    B, C = sorted_probs.shape
    rank = torch.arange(C, device=sorted_probs.device).expand(B, C)  # [B, C]
    k_on = top_k > 0
    removed = k_on[:, None] & (rank >= top_k[:, None])  # [B, C]
    cum = torch.cumsum(sorted_probs, dim=-1)  # [B, C]
    # top-p sees the distribution top-k left, renormalised: compare against the kept mass.
    kept_mass = torch.where(k_on, cum.gather(1, (top_k - 1).clamp(0, C - 1)[:, None])[:, 0],
                            torch.ones_like(cum[:, 0]))  # [B]
    before = cum - sorted_probs  # mass of strictly better tokens
    removed |= (before >= (top_p * kept_mass)[:, None]) & (top_p[:, None] < 1.0)
    # min-p is relative to the best token, so renormalising does not change it.
    removed |= sorted_probs < (min_p[:, None] * sorted_probs[:, :1])
    removed[:, 0] = False
    return removed


CANDIDATES = (1024, 16384)  # candidate counts tried in turn before a full sort


def _candidates(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely tokens, enough of them that every row's kept set lies inside.

    Sorting a 160K vocabulary per row is the slow part of sampling on a CPU; the kept set is
    almost always a few hundred tokens. Try the top CANDIDATES[0] (or the largest top_k); while
    some row's filters might keep more than that (a flat distribution), try more, and in the
    end sort everything.
    Returns (probabilities [S, C] descending, token ids [S, C]).
    """
    V = probs.shape[1]
    for C in CANDIDATES:
        C = max(C, int(top_k.max()))
        if C >= V:
            break
        vals, ids = torch.topk(probs, C, dim=-1)  # [S, C], sorted
        covered = ((top_k > 0) & (top_k <= C)) | ((top_p < 1.0) & (vals.sum(-1) >= top_p)) \
            | ((min_p > 0.0) & (vals[:, -1] < min_p * vals[:, 0]))
        if bool(covered.all()):
            return vals, ids
    return torch.sort(probs, dim=-1, descending=True)


def sample(logits: torch.Tensor, rows: Sequence[RowState]) -> list[Sampled]:
    """Pick one token per row. logits [B, V] (any float dtype, any device)."""
    B, V = logits.shape
    if B != len(rows):
        raise ValueError(f"sample: logits has {B} rows but {len(rows)} row states were given")
    logits = apply_penalties(logits.float(), rows)  # [B, V] fp32
    dev = logits.device
    constrained = [b for b, r in enumerate(rows) if r.matcher is not None]
    if constrained:
        logits = _mask_rows(logits, [rows[b].matcher for b in constrained], constrained)
    ruled = [b for b, r in enumerate(rows) if r.params.banned_ids or r.params.answer_after is not None]
    if ruled:
        logits = _apply_rules(logits if constrained else logits.clone(), rows, ruled)
    chosen = torch.argmax(logits, dim=-1)  # [B], greedy answer for every row

    sampled_rows = [b for b, r in enumerate(rows) if not r.params.greedy]
    if sampled_rows:
        idx = torch.as_tensor(sampled_rows, device=dev)
        sub = [rows[b].params for b in sampled_rows]
        temp = torch.tensor([p.temperature for p in sub], device=dev)
        top_k = torch.tensor([min(p.top_k, V) if p.top_k > 0 else 0 for p in sub], device=dev)
        top_p = torch.tensor([p.top_p for p in sub], device=dev)
        min_p = torch.tensor([p.min_p for p in sub], device=dev)
        probs = torch.softmax(logits[idx] / temp[:, None], dim=-1)  # [S, V]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in sub):
            probs, order = _candidates(probs, top_k, top_p, min_p)  # [S, C]
            probs = probs.masked_fill(truncation_mask(probs, top_k, top_p, min_p), 0.0)
        else:  # plain temperature sampling: the CDF works in vocabulary order, no sort needed
            order = None
        cdf = torch.cumsum(probs, dim=-1)  # [S, C]
        # One uniform per row from that row's own generator, on the CPU.
        u = torch.stack([torch.rand((), generator=rows[b].generator) for b in sampled_rows])
        target = u.to(dev)[:, None] * cdf[:, -1:]  # [S, 1]
        pos = torch.searchsorted(cdf, target, right=True)[:, 0]  # [S]
        # If rounding puts the target at the very top of the CDF, take the last token that
        # adds probability (never a removed or zero-probability one).
        last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)[:, 0]  # [S]
        pos = torch.minimum(pos, last)
        chosen[idx] = pos if order is None else order.gather(1, pos[:, None])[:, 0]

    chosen_list = chosen.tolist()
    for b in constrained:
        rows[b].matcher.accept(chosen_list[b])
    for b in ruled:
        r = rows[b]
        if r.params.answer_after is None:
            continue
        if r.answer_phase == 0:
            r.answer_phase = int(chosen_list[b] == r.params.answer_after)
        elif chosen_list[b] not in r.params.blank_ids:
            r.answer_phase = 2
    results = [Sampled(token_id=t) for t in chosen_list]
    want = [b for b, r in enumerate(rows) if r.params.logprobs is not None]
    if want:
        logp = torch.log_softmax(logits[want], dim=-1)  # [W, V]
        n_top = max(rows[b].params.logprobs for b in want)
        top_v, top_i = (torch.topk(logp, n_top, dim=-1) if n_top > 0 else (None, None))
        for j, b in enumerate(want):
            results[b].logprob = float(logp[j, chosen_list[b]])
            n = rows[b].params.logprobs
            results[b].top_logprobs = (
                [(int(i), float(v)) for i, v in zip(top_i[j, :n].tolist(), top_v[j, :n].tolist())]
                if n > 0 else []
            )
    return results


def _mask_rows(logits: torch.Tensor, matchers, where: list[int]) -> torch.Tensor:
    """logits [B, V] with rows `where` limited to what their matchers allow (R = len(where));
    the input is not modified."""
    from hybrid.engine.grammar import apply_masks, fill_masks, new_bitmask

    B, V = logits.shape
    bitmask = new_bitmask(len(where), V)  # [R, W]
    fill_masks(matchers, bitmask)
    out = logits.clone()
    if len(where) == B:
        return apply_masks(out, bitmask)
    idx = torch.as_tensor(where, device=logits.device)
    out[idx] = apply_masks(out[idx], bitmask)
    return out


def _apply_rules(logits: torch.Tensor, rows, ruled: list[int]) -> torch.Tensor:
    """The token rules of SamplingParams on rows `ruled` of logits [B, V] (in place): banned_ids
    never; before the answer (answer_phase 0, 1) held_ids neither; a spent preamble budget
    (answer_by) draws answer_after; once drawn, answer_after is not drawn again."""
    NEG = float("-inf")
    for b in ruled:
        r, p = rows[b], rows[b].params
        if p.banned_ids:
            logits[b, p.banned_ids] = NEG
        if p.answer_after is None:
            continue
        if r.answer_phase == 0 and p.answer_by is not None and len(r.output_ids) >= p.answer_by:
            logits[b] = NEG  # the preamble's budget is spent: it ends here
            logits[b, p.answer_after] = 0.0
        if r.answer_phase < 2 and p.held_ids:
            logits[b, p.held_ids] = NEG
        if r.answer_phase > 0:
            logits[b, p.answer_after] = NEG
    return logits
