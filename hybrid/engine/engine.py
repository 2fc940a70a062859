"""Continuous batching: one background thread turns all live requests into one model call a step.

Each step builds one flat ragged batch (legend: T tokens in the step, V vocabulary):

  - every running sequence contributes its newest token (decode), position = its length - 1;
  - prompts still being read in contribute chunks, oldest request first, up to prefill_chunk
    tokens in total per step, so a long prompt is read over several steps while the other
    sequences keep decoding; with layerwise prefill on (the model's layerwise_chunks()),
    a long prompt read while nothing decodes goes in chunks of at least that many tokens, so
    that each runs layerwise (_plan says why only then);
  - model.forward(input_ids [T], positions [T], slots [T], cache, logits_index [n]) writes each
    token's KV into cache[slot, position] and returns logits [n, V] for the rows that sample:
    decode tokens and the last token of a finished prompt;
  - each of those rows is sampled with its own parameters and random stream (sampling.py),
    then stop rules and streaming text are applied (stops.py) and one Event goes to the caller.

Images (submit(images=[ImageSpan])): the prompt holds each image's expanded placeholder tokens;
when a prompt chunk reaches an image, the model's encode_image(image) (the vision tower, on this
thread) gives its rows, which replace those tokens' input embeddings (forward's embeds=).

A request holds a cache slot from admission to its end. It is admitted the moment there is room
(at submit, or when another request releases some) and joins the next step; otherwise it waits
in a FIFO queue. Cancellation (handle.cancel(), or the reader going away) frees its room at the
next step boundary.

Room and prefix reuse depend on the cache (kv_slots.py, chosen once): with a paged cache (the
default where the model has one) room is counted in blocks, enough for the prompt plus
max_tokens, and requests whose prompts start alike share the full blocks of that prefix while
they run: the prefix is computed once, by the first, and the others wait for it (a request
whose shared prefix is still being computed skips steps). With a slot cache room is a whole
slot, and a new request reuses the KV a freed slot still holds for a shared prefix.
Prefix matching compares what the KV depends on: token ids, and inside an image its pixels' hash
and the index (the placeholder ids of two different images are equal), so the next turn about
the same image re-encodes nothing.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from hybrid.engine.request import (Completion, Event, RequestHandle, TokenLogprob, Usage)
from hybrid.engine.sampling import RowState, SamplingParams, make_generator, sample
from hybrid.engine.kv_slots import PagedKV, SlotKV
from hybrid.engine.stops import StopState
from hybrid.models.moonvit_images import token_keys
from hybrid.planner.device_memory import PREFILL_CHUNK

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 4096  # cache length when neither max_context nor a cache is given
DEFAULT_BLOCK_SIZE = 16  # tokens per paged-cache block
RATE_WINDOW_S = 10.0  # tok/s in stats() is measured over this many recent seconds


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    stop: StopState
    handle: RequestHandle
    row: RowState = None
    output: list[int] = field(default_factory=list)  # sampled ids, stop token included
    max_tokens: int = 0
    slot: int | None = None
    computed: int = 0  # tokens (prompt + output) whose KV is in the cache
    reused: int = 0  # prompt tokens whose KV it found in the cache (prefix reuse)
    kv: object = None  # the KV placement's own record (kv_slots.PagedKV)
    cancelled: bool = False
    images: list = field(default_factory=list)  # ImageSpans (hybrid/models/moonvit_images.py)
    keys: list = field(default_factory=list)  # per prompt position: what its KV depends on
    image_rows: dict = field(default_factory=dict)  # span index -> [tokens, H], once encoded

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def computed_keys(self) -> list:
        return (self.keys + self.output)[:self.computed]


def _module_device_dtype(module) -> tuple[torch.device, torch.dtype]:
    """Where the model computes and in what float dtype: its .device/.dtype when it says so
    (hybrid.load's Model and the model classes do), else its first parameters (test modules)."""
    if isinstance(module, torch.nn.Module):
        params = list(module.parameters())
        floats = [p for p in params if p.is_floating_point()]
        return (params[0].device if params else torch.device("cpu"),
                floats[0].dtype if floats else torch.float32)
    return torch.device(module.device), module.dtype


def _check_cache_fits(bytes_per_token: int, tokens: int, what: str, device: torch.device) -> None:
    """Refuse, with the numbers, a KV cache larger than the memory left on its device (the
    model is loaded by now, so what is free is what the cache can have)."""
    need = bytes_per_token * tokens
    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], f"free on {device}"
    else:
        import psutil

        free, where = psutil.virtual_memory().available, "of available RAM"
    if need > free:
        gib = 1024 ** 3
        raise MemoryError(
            f"Engine: the KV cache for {what} needs "
            f"{need / gib:.2f} GiB ({bytes_per_token} bytes per token), but only "
            f"{free / gib:.2f} GiB is {where}; lower max_seqs, max_context or kv_blocks")


class Engine:
    """Continuous-batching generation over a model that follows the flat ragged contract.

    model: the Model from hybrid.load(), or anything with its engine-facing part: forward(input_ids,
    positions, slots, cache, logits_index, embeds=) (embeds only with images, and then
    encode_image(image)), .config (vocab_size, max_position_embeddings),
    online_stats() (None when off), layerwise_chunks() (None: layerwise prefill is off), and,
    when no cache is given, make_cache(num_slots, max_len),
    kv_bytes_per_token(), kv_cache_tokens(same arguments as make_cache) and .max_len (None: the
    config's limit); .tokenizer when none is given.
    max_seqs: concurrent sequences (cache slots). max_context: longest sequence, prompt plus
    output (default: the cache's max_len, else the Model's max_len, else
    min(max_position_embeddings, 4096)).
    prefill_chunk: prompt tokens read per step across all prompts (default: the chunk the load's
    activation estimate assumes, hybrid/planner/device_memory.py); a step with no decode may
    read more for layerwise prefill (_plan). cache: a ready cache with
    .reset(slot), .num_slots and .max_len (default: the model's make_cache, after checking that
    model.kv_bytes_per_token() x the rows it will allocate (kv_cache_tokens: slots x context, or
    the paged pool's blocks and its spare block) fits the memory left).
    prefix_reuse: let a new request reuse the KV of a prompt prefix the cache holds.
    block_size: tokens per block of a paged cache, made when the model has one (model.kv_paged());
    None: a slot cache. kv_blocks: the paged cache's size in blocks (default: as many as
    max_seqs whole contexts, the memory a slot cache would take); with shared prefixes, more
    sequences than that fit, so max_seqs may be raised at the same memory.
    decode_runner: None, or runner(cache, max_seqs) -> a DecodeRunner (hybrid/engine/
    step_runner.py) or None (hybrid.load's Model.decode_runner): steps of decode tokens only
    that it fits run through it (static buffers, CUDA graphs), the rest through forward().
    """

    def __init__(self, model, tokenizer=None, max_seqs: int = 16, max_context: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, cache=None, prefix_reuse: bool = True,
                 block_size: int | None = DEFAULT_BLOCK_SIZE, kv_blocks: int | None = None,
                 decode_runner=None):
        self.module = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if self.tokenizer is None:
            raise ValueError("Engine: a tokenizer is needed (pass tokenizer=, or a Model that has one)")
        self.config = model.config
        for name, value in (("max_seqs", max_seqs), ("prefill_chunk", prefill_chunk),
                            ("block_size", block_size or 1), ("kv_blocks", kv_blocks or 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Engine: {name} must be a positive integer, got {value!r}")
        if max_context is not None and (not isinstance(max_context, int) or max_context < 2):
            raise ValueError(f"Engine: max_context must be an integer >= 2, got {max_context!r}")
        limit = self.config.max_position_embeddings
        if max_context is not None and limit is not None and max_context > limit:
            raise ValueError(f"Engine: max_context {max_context} exceeds the model's "
                             f"max_position_embeddings {limit}")
        if cache is None:
            # hybrid.load's Model knows the context it was sized for (its max_len option)
            max_context = (max_context or model.max_len
                           or min(limit or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT))
            device = _module_device_dtype(model)[0]
            if block_size is not None and model.kv_paged():
                what = f"{kv_blocks} blocks of {block_size} tokens"
                if kv_blocks is None:
                    kv_blocks = max_seqs * -(-max_context // block_size)
                    what = f"{max_seqs} sequences x {max_context} tokens ({kv_blocks} blocks of {block_size})"
                # the pool's own count: the blocks handed out and the spare block that padding
                # rows of a static decode step write (hybrid/models/paged_kv_cache.py)
                rows = model.kv_cache_tokens(max_seqs, max_context, kv_blocks, block_size)
                _check_cache_fits(model.kv_bytes_per_token(), rows, what + ", and a spare block", device)
                cache = model.make_cache(max_seqs, max_context, kv_blocks, block_size)
            else:
                _check_cache_fits(model.kv_bytes_per_token(), model.kv_cache_tokens(max_seqs, max_context),
                                  f"{max_seqs} sequences x {max_context} tokens", device)
                cache = model.make_cache(max_seqs, max_context)
        else:
            if cache.num_slots < max_seqs:
                raise ValueError(f"Engine: cache has {cache.num_slots} slots, max_seqs is {max_seqs}")
            max_context = max_context or cache.max_len
            if max_context > cache.max_len:
                raise ValueError(f"Engine: max_context {max_context} exceeds the cache's "
                                 f"max_len {cache.max_len}")
        self.cache = cache
        self._runner = decode_runner(cache, max_seqs) if decode_runner is not None else None
        self.max_seqs, self.max_context, self.prefill_chunk = max_seqs, max_context, prefill_chunk
        # (fewest, most) tokens of a layerwise forward (the cost model's threshold and what the
        # device's memory allows, fixed at load; None: off): the owner decides the mode per
        # forward (Model.prefill_chunk), the engine only makes chunks that can reach it.
        self._layerwise_chunks = model.layerwise_chunks()
        self.device = _module_device_dtype(self.module)[0]
        self.vocab_size = self.config.vocab_size

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Guarded by _lock: the queue, the slot table and the running list, so that admission
        # happens the moment a slot frees (at submit or at release) and stats() is consistent.
        self._waiting: deque[_Request] = deque()
        self._cancel_ids: set[int] = set()  # guarded by _lock
        self._active: list[_Request] = []  # holding a slot, in admission order
        self.prefix_reuse = prefix_reuse
        from hybrid.models.paged_kv_cache import PagedLatentKVCache

        placement = PagedKV if isinstance(cache, PagedLatentKVCache) else SlotKV
        self._kv = placement(cache, max_seqs, prefix_reuse)  # guarded by _lock
        self._ids = itertools.count(1)
        self._closed = False
        self._counters = dict(requests_submitted=0, requests_finished=0, requests_cancelled=0,
                              requests_failed=0, prompt_tokens=0, prompt_tokens_reused=0,
                              prompt_tokens_computed=0, generated_tokens=0, steps=0)
        self._rate: deque[tuple[float, int]] = deque()  # (time, tokens generated that step)
        self._thread = threading.Thread(target=self._loop, name="hybrid-engine", daemon=True)
        self._thread.start()

    # ---- public API -----------------------------------------------------------------------

    def submit(self, prompt_ids, params: SamplingParams | None = None, stop=(),
               max_tokens: int | None = None, images=None) -> RequestHandle:
        """Queue a request and return its handle at once. Raises ValueError for bad input
        (empty prompt, unknown token ids, longer than max_context). images: ImageSpans of the
        (already expanded) prompt, hybrid/models/moonvit_images.py."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"submit: params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        prompt = self._check_prompt(prompt_ids)
        room = self.max_context - len(prompt)
        if room < 1:
            raise ValueError(f"prompt has {len(prompt)} tokens; the context limit is "
                             f"{self.max_context} (prompt + output), so no room to generate")
        if max_tokens is None:
            max_tokens = room
        elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        elif max_tokens > room:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds "
                             f"the context limit of {self.max_context} tokens")
        blocks = self._kv.blocks_for(len(prompt) + max_tokens)
        if blocks > self._kv.total_blocks():
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) needs "
                             f"{blocks} KV blocks; the cache has {self._kv.total_blocks()}")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(self.tokenizer.stop_token_ids)
        rid = next(self._ids)
        handle = RequestHandle(rid, self._request_cancel)
        req = _Request(id=rid, prompt=prompt, params=params, handle=handle, max_tokens=max_tokens,
                       stop=StopState(self.tokenizer.incremental_decoder(), stop_ids, stop, max_tokens))
        req.row = RowState(params=params, generator=make_generator(params.seed),
                           prompt_ids=req.prompt, output_ids=req.output)
        req.images = self._check_images(images, len(prompt))
        req.keys = token_keys(prompt, req.images)
        with self._wake:
            if self._closed:
                raise RuntimeError("Engine is closed")
            self._waiting.append(req)
            self._counters["requests_submitted"] += 1
            self._admit_locked()
            self._wake.notify()
        return handle

    def generate(self, prompt_ids, params: SamplingParams | None = None, stop=(),
                 max_tokens: int | None = None) -> list[int]:
        """Blocking convenience: the generated token ids (without a final stop token)."""
        return self.submit(prompt_ids, params, stop=stop, max_tokens=max_tokens).result().token_ids

    def complete(self, prompt_ids, params: SamplingParams | None = None, stop=(),
                 max_tokens: int | None = None) -> Completion:
        """Blocking convenience: ids, text, finish reason and usage."""
        return self.submit(prompt_ids, params, stop=stop, max_tokens=max_tokens).result()

    def stats(self) -> dict:
        """Counters for /metrics: running, waiting, totals and recent generated tok/s."""
        with self._lock:
            now = time.monotonic()
            while self._rate and now - self._rate[0][0] > RATE_WINDOW_S:
                self._rate.popleft()
            span = now - self._rate[0][0] if self._rate else 0.0
            tokens = sum(n for _, n in self._rate)
            out = dict(self._counters, running=len(self._active), waiting=len(self._waiting),
                       max_seqs=self.max_seqs, max_context=self.max_context,
                       tokens_per_s=tokens / span if span > 0 else 0.0, **self._kv.counts())
        # hybrid.load(..., online=...): experts swapped into the GPU cache and its hit rate
        # (the model's step-end callback runs inside self.module.forward, once per step).
        online = self.module.online_stats()
        if online is not None:
            out["expert_swaps"] = online["swaps"]
            if online["hit_rate"] is not None:
                out["expert_cache_hit_rate"] = online["hit_rate"]
        return out

    def close(self) -> None:
        """Stop the engine thread; requests still queued or running end as "cancelled"."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- request bookkeeping --------------------------------------------------------------

    def _check_prompt(self, prompt_ids) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.flatten().tolist()
        if isinstance(prompt_ids, (str, bytes)):
            raise TypeError("submit: prompt_ids must be token ids; encode text with the tokenizer")
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("submit: the prompt is empty")
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(f"submit: prompt_ids[{i}]={t!r} is not a token id in "
                                 f"[0, {self.vocab_size})")
        return prompt

    def _check_images(self, images, n: int) -> list:
        spans = sorted(images or (), key=lambda s: s.start)
        prev = 0
        for s in spans:
            if s.start < prev or s.end > n:
                raise ValueError(f"submit: image span [{s.start}, {s.end}) overlaps another or leaves "
                                 f"the prompt of {n} tokens")
            prev = s.end
        return spans

    def _request_cancel(self, request_id: int) -> None:
        with self._wake:
            for req in self._waiting:
                if req.id == request_id:
                    self._waiting.remove(req)
                    self._counters["requests_cancelled"] += 1
                    self._emit_end(req, "cancelled")
                    return
            self._cancel_ids.add(request_id)
            self._wake.notify()

    def _emit_end(self, req: _Request, reason: str, error: str | None = None) -> None:
        text = req.stop.finish(reason)
        req.handle._push(Event(text=text, finish_reason=reason, error=error,
                               usage=Usage(len(req.prompt), req.stop.generated, req.reused)))

    def _release(self, req: _Request, kv_valid: bool = True) -> None:
        """Give its room back (engine thread) and admit waiting requests into it. The KV is kept
        for prefix reuse unless a failed step may have left it half written (kv_valid=False)."""
        with self._lock:
            if req.slot is not None:
                self._kv.release(req, kv_valid)
                req.slot = None
            if req in self._active:
                self._active.remove(req)
            self._admit_locked()

    def _admit_locked(self) -> None:
        """Move waiting requests, oldest first, in while there is room (caller holds _lock)."""
        while self._waiting and self._kv.admit(self._waiting[0]):
            req = self._waiting.popleft()
            self._active.append(req)
            self._counters["prompt_tokens"] += len(req.prompt)
            self._counters["prompt_tokens_reused"] += req.computed
            req.reused = req.computed

    # ---- the engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closed or self._waiting or self._active
                                    or self._cancel_ids)
                if self._closed:
                    break
                cancel, self._cancel_ids = self._cancel_ids, set()
                self._admit_locked()
                cancelled = [r for r in self._active if r.id in cancel]
            for req in cancelled:
                self._release(req)
                with self._lock:
                    self._counters["requests_cancelled"] += 1
                self._emit_end(req, "cancelled")
            with self._lock:  # requests admitted from now on join the next step
                active = []
                for r in self._active:
                    reused = r.reused
                    if self._kv.ready(r):  # may hand it an orphaned shared block to compute
                        active.append(r)
                    self._counters["prompt_tokens_reused"] -= reused - r.reused
            if active:
                self._step(active)
        self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            pending = list(self._waiting) + list(self._active)
            self._waiting.clear()
        for req in pending:
            self._release(req)
            self._emit_end(req, "cancelled")

    def _plan(self, active) -> tuple[list[_Request], list[tuple[_Request, int, int]]]:
        """Pick this step's tokens: all decodes, then prompt chunks within the budget; or, with
        nothing decoding, one layerwise-sized chunk of the oldest prompt (_long_chunk)."""
        decodes = [r for r in active if r.output]  # prompt done: exactly one new token to feed
        prompts = [r for r in active if not r.output]
        if not decodes and prompts:
            n = self._long_chunk(len(prompts[0].tokens) - prompts[0].computed)
            if n:
                return [], [(prompts[0], prompts[0].computed, n)]
        chunks, budget = [], self.prefill_chunk
        for req in prompts:
            if budget <= 0:
                break
            n = min(len(req.tokens) - req.computed, budget)
            chunks.append((req, req.computed, n))
            budget -= n
        return decodes, chunks

    def _long_chunk(self, pending: int) -> int:
        """Tokens of a prompt with `pending` left to read in one layerwise forward, or 0: the
        usual budget. Only in a step with no decode: such a chunk takes many times as long as a
        prefill_chunk step (K2.5 on PCIe 4: 15K tokens, tens of seconds), and a decoding request
        must not wait that long for its next token, so beside decodes the budget holds and the
        prompt runs on the CPU path. A request that arrives meanwhile waits for the step to
        end, as it would for the several budget-sized steps the chunk replaces. The chunk is the
        threshold, or all that is left when that is under twice the threshold, so no short
        CPU-path tail is left and no forward exceeds 2 x threshold tokens (layerwise's speed
        grows with the chunk, as the copy is paid once per chunk), nor the most the device's
        memory allows (then a tail under the threshold goes the usual way)."""
        if self._layerwise_chunks is None:
            return 0
        t, most = self._layerwise_chunks
        if t <= self.prefill_chunk or pending < t:
            return 0
        n = pending if pending < 2 * t else t
        return n if most is None else min(n, most)

    def _images_ready(self, req: _Request, start: int, n: int) -> bool:
        """Encode the images the chunk [start, start+n) reaches (once per request, when its first
        token is read; on this thread). A failure fails this request only: -> False."""
        try:
            with torch.inference_mode():
                for k, span in enumerate(req.images):
                    # (None: read to its end, or never encoded; a chunk recomputed after a shared
                    # block lost its writer may reach it again)
                    if req.image_rows.get(k) is None and span.start < start + n and span.end > start:
                        req.image_rows[k] = self.module.encode_image(span.image)  # [tokens, H]
            return True
        except Exception as e:
            log.exception("image encoding failed")
            self._release(req, kv_valid=False)
            with self._lock:
                self._counters["requests_failed"] += 1
            self._emit_end(req, "error", error=f"image encoding failed: {type(e).__name__}: {e}")
            return False

    def _image_rows(self, req: _Request, start: int, n: int):
        """(offset in the chunk, rows [m, H]) for each image the chunk [start, start+n) reaches."""
        for k, span in enumerate(req.images):
            lo, hi = max(span.start, start), min(span.end, start + n)
            if lo < hi:
                yield lo - start, req.image_rows[k][lo - span.start:hi - span.start]
                if hi == span.end:  # read to its end: its rows are not needed again
                    req.image_rows[k] = None

    def _step(self, active: list[_Request]) -> None:
        decodes, chunks = self._plan(active)
        ids, pos, slots, sample_at, sample_reqs = [], [], [], [], []
        for req in decodes:
            ids.append(req.output[-1])  # the newest token; everything before is in the cache
            pos.append(req.computed)
            slots.append(req.slot)
            sample_at.append(len(ids) - 1)
            sample_reqs.append(req)
        chunks = [c for c in chunks if self._images_ready(*c)]
        rows, values = [], []  # image tokens of this step: rows of the batch, their embeddings
        for req, start, n in chunks:
            for i, r in self._image_rows(req, start, n):
                rows += range(len(ids) + i, len(ids) + i + r.shape[0])
                values.append(r)
            ids += req.prompt[start:start + n]
            pos += range(start, start + n)
            slots += [req.slot] * n
            if start + n == len(req.prompt):  # the prompt's last token predicts the first output
                sample_at.append(len(ids) - 1)
                sample_reqs.append(req)
        stepped = decodes + [c[0] for c in chunks]
        try:
            with self._lock:
                self._kv.prepare([(r, 1) for r in decodes] + [(r, n) for r, _, n in chunks])
            with torch.inference_mode():
                if not chunks and self._runner is not None and self._runner.fits(slots, pos):
                    logits = self._runner.step(ids, pos, slots)  # [n, V]: static buffers / graphs
                else:
                    logits = self._forward(ids, pos, slots, sample_at, rows, values)
                if sample_reqs:
                    if tuple(logits.shape[:1]) != (len(sample_at),):
                        raise RuntimeError(f"model.forward returned logits of shape "
                                           f"{tuple(logits.shape)}, expected ({len(sample_at)}, V)")
                    # Checkpoints often pad the LM head past the tokenizer's last id; those
                    # rows mean nothing and must never be sampled.
                    logits = logits[:, :self.tokenizer.vocab_size]
                    bad = torch.isnan(logits).any(dim=-1).tolist()  # [n]
                    samples = [None] * len(sample_reqs)
                    good = [i for i, b in enumerate(bad) if not b]
                    if good:
                        picked = sample(logits[good], [sample_reqs[i].row for i in good])
                        for i, s in zip(good, picked):
                            samples[i] = s
        except Exception as e:  # a failed step fails its requests, not the engine
            log.exception("engine step failed")
            for req in stepped:
                self._release(req, kv_valid=False)
                with self._lock:
                    self._counters["requests_failed"] += 1
                self._emit_end(req, "error", error=f"{type(e).__name__}: {e}")
            return
        for req in decodes:
            req.computed += 1
        for req, start, n in chunks:
            req.computed += n
        with self._lock:
            for req in stepped:
                self._kv.advance(req)
            self._counters["prompt_tokens_computed"] += sum(n for _, _, n in chunks)
        for req, s in zip(sample_reqs, samples if sample_reqs else []):
            try:
                if s is None:
                    raise FloatingPointError(f"the model produced NaN logits at position "
                                             f"{req.computed - 1} (slot {req.slot})")
                self._deliver(req, s)
            except Exception as e:  # NaN logits, or a tokenizer that cannot decode the id
                log.error("request %d failed: %s", req.id, e)
                self._release(req, kv_valid=s is not None)
                with self._lock:
                    self._counters["requests_failed"] += 1
                self._emit_end(req, "error", error=f"{type(e).__name__}: {e}")
        with self._lock:
            self._counters["steps"] += 1
            self._counters["generated_tokens"] += len(sample_reqs)
            self._rate.append((time.monotonic(), len(sample_reqs)))

    def _forward(self, ids: list[int], pos: list[int], slots: list[int], sample_at: list[int],
                 rows: list[int], values: list[torch.Tensor]) -> torch.Tensor:
        dev = self.device
        extra = {}
        if rows:  # image tokens: their embeddings come from the vision tower
            extra["embeds"] = (torch.tensor(rows, dtype=torch.long, device=dev), torch.cat(values))  # [m], [m, H]
        return self.module.forward(
            torch.tensor(ids, dtype=torch.long, device=dev),  # [T]
            torch.tensor(pos, dtype=torch.long, device=dev),  # [T]
            torch.tensor(slots, dtype=torch.long, device=dev),  # [T]
            self.cache,
            logits_index=torch.tensor(sample_at, dtype=torch.long, device=dev),  # [n]
            **extra,
        )  # [n, V]

    def _deliver(self, req: _Request, s) -> None:
        req.output.append(s.token_id)
        text, reason = req.stop.on_token(s.token_id)
        shown = [] if s.token_id in req.stop.stop_ids else [s.token_id]
        lp = None
        if req.params.logprobs is not None and shown:
            lp = [TokenLogprob(s.token_id, s.logprob, s.top_logprobs)]
        usage = Usage(len(req.prompt), req.stop.generated, req.reused) if reason else None
        if reason:
            self._release(req)
            with self._lock:
                self._counters["requests_finished"] += 1
        req.handle._push(Event(token_ids=shown, text=text, logprobs=lp, finish_reason=reason,
                               usage=usage))
