"""Decode steps from static buffers, one set per (batch-size, key-length) bucket, replayed eagerly
or as captured CUDA graphs (graphs.py). Chosen once when the engine is made; prefill, mixed
batches and anything over the largest bucket take the model's ordinary forward.

    runner = DecodeRunner(network, cache, max_batch=8, graphs=False)
    if runner.fits(slots, positions):
        logits = runner.step(ids, positions, slots)    # host ints -> [n, Vocab] fp32 (device)
    # = runner.run(runner.prepare(ids, positions, slots))[:n]: host half, device half

A step: the n tokens' embedding rows (host table), their positions and slots, what each row
reads and the row it writes (the cache says both, from its host-side state: a slot cache's slot
and slot * max_len + position; a paged cache's blocks, a fixed-shape [B, L / block size] table,
and block * block size + offset) are put in the bucket's host buffers (pinned on CUDA), padded
to the bucket's B with copies of row 0 that write the cache's spare row, copied to the device
buffers in one go each (non-blocking), then the device part runs from those buffers (DecoderStack.
decode_static): no shape depends on the data and nothing on the device waits for the host
except at the MoE hand-offs. Eagerly, that is the same math as forward() on the same tokens;
with graphs=True, the first step of a bucket runs eagerly on the capture stream (it warms cuBLAS
and allocates every staging buffer), then the bucket is captured and later steps replay it.

Buckets: B in 1, 2, 4, ... up to the power of two >= max_batch (at most STATIC_ROWS, the sizes
the stagings keep fixed buffers for; padding rows need no slot of their own, so a bucket may
exceed the cache's slots); key length L in MIN_KEYS, 2*MIN_KEYS, ... up to the cache's max_len.
A step attends to L keys per row, masked by position, so L is the smallest bucket above the
step's largest position (attention reads at most 2x the keys it needs).

Legend: n tokens in the step, B bucket rows, L key-length bucket, H hidden, Vocab vocabulary.
"""

from __future__ import annotations

import logging

import torch

from hybrid.experts.staging import STATIC_ROWS
from hybrid.models.batch import DecodeBatch

log = logging.getLogger(__name__)

MIN_KEYS = 64  # smallest key-length bucket


def bucket_sizes(limit: int, start: int = 1) -> list[int]:
    """start, 2*start, 4*start, ... below limit, then limit: [1, 2, 4, 6] for (6, 1)."""
    sizes, b = [], start
    while b < limit:
        sizes.append(b)
        b *= 2
    return sizes + [limit]


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to the power of two >= max_batch, at most STATIC_ROWS."""
    sizes = [1]
    while sizes[-1] < min(max_batch, STATIC_ROWS):
        sizes.append(sizes[-1] * 2)
    return sizes


def bucket_for(sizes: list[int], n: int) -> int:
    """The smallest bucket >= n (sizes ascending; n <= sizes[-1])."""
    return next(b for b in sizes if b >= n)


class StaticInputs:
    """One bucket's buffers: host (pinned on CUDA) and device, filled in place each step.
    h [B, H] embedded rows; index [3, B] long: positions, slots, write rows; reads: what each
    row attends to, shaped as the cache's decode_reads for (B, L) says (slots [B] long of a slot
    cache, block table [B, M'] int32 of a paged one)."""

    def __init__(self, B: int, L: int, hidden: int, cache, device: torch.device, dtype: torch.dtype):
        pin = device.type == "cuda"
        self.B, self.L, self.cache = B, L, cache
        like = cache.decode_reads([0] * B, L)
        self.host_h = torch.zeros(B, hidden, dtype=dtype, pin_memory=pin)
        self.host_index = torch.zeros(3, B, dtype=torch.long, pin_memory=pin)
        self.host_reads = torch.zeros(like.shape, dtype=like.dtype, pin_memory=pin)
        self.h = torch.zeros(B, hidden, dtype=dtype, device=device)
        self.index = torch.zeros(3, B, dtype=torch.long, device=device)
        self.reads = torch.zeros(like.shape, dtype=like.dtype, device=device)
        self._copied = torch.cuda.Event() if pin else None  # the last fill's copies

    def batch(self) -> DecodeBatch:
        """A fresh DecodeBatch over the device buffers (its mask is computed in the step)."""
        return DecodeBatch(self.index[0], self.index[1], self.index[2], self.L, self.reads)

    def fill(self, rows: torch.Tensor, positions: list[int], slots: list[int]) -> None:
        """rows [n, H] embedded; padding rows repeat row 0 and write the cache's spare row."""
        n, B, cache = len(positions), self.B, self.cache
        pad = B - n
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies have left the host buffers
        self.host_h[:n].copy_(rows)
        self.host_h[n:].copy_(rows[:1].expand(pad, -1))
        slots_b = slots + slots[:1] * pad
        self.host_index[0] = torch.tensor(positions + positions[:1] * pad)
        self.host_index[1] = torch.tensor(slots_b)
        self.host_index[2, :n] = cache.decode_rows(slots, positions)
        self.host_index[2, n:] = cache.spare_row
        self.host_reads.copy_(cache.decode_reads(slots_b, self.L))
        self.h.copy_(self.host_h, non_blocking=True)
        self.index.copy_(self.host_index, non_blocking=True)
        self.reads.copy_(self.host_reads, non_blocking=True)
        if self._copied is not None:
            self._copied.record()


class DecodeRunner:
    def __init__(self, network, cache, max_batch: int, graphs: bool = False, after_step=None):
        """after_step: called after each step (the model's online re-placement, which forward()
        runs after each forward)."""
        if network.ops.name != "torch":
            raise ValueError(f"DecodeRunner: static decode steps run the torch op set (the device "
                             f"path; device_ops='torch'), this network has {network.ops.name!r}")
        if not cache.static_decode():
            raise ValueError(f"DecodeRunner: {type(cache).__name__} has no static decode write "
                             "(decode_reads / read_rows / write_rows / spare_row); this architecture "
                             "decodes eagerly")
        if max_batch < 1 or max_batch > cache.num_slots:
            raise ValueError(f"DecodeRunner: max_batch {max_batch} must be in 1..{cache.num_slots} "
                             "(one token per cache slot)")
        device = torch.device(network.device)
        if graphs and device.type != "cuda":
            raise ValueError(f"DecodeRunner: CUDA graphs need a CUDA device, the network is on {device}")
        if graphs:
            for i, moe in network.moe_layers().items():
                if not moe.host_experts().capabilities().accumulates:
                    raise ValueError(f"DecodeRunner: layer {i}'s host executor does not write "
                                     "out= buffers; a captured step needs its result at a fixed address")
        self.network, self.cache, self.device = network, cache, device
        self.after_step = after_step
        self.graphs = graphs
        self.batch_sizes = batch_buckets(max_batch)
        self.max_batch = min(max_batch, STATIC_ROWS)
        self.key_lengths = bucket_sizes(cache.max_len, min(MIN_KEYS, cache.max_len))
        self._inputs: dict[tuple[int, int], StaticInputs] = {}
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}
        self._captured: dict[tuple[int, int], object] = {}   # SegmentedGraph per bucket
        self._eager_only: set[tuple[int, int]] = set()        # buckets whose capture failed
        self._pool = self._stream = None
        self.stats = {"steps": 0, "replays": 0, "captures": 0, "capture_failures": 0}

    # ---- what the engine asks -----------------------------------------------------------------
    def fits(self, slots: list[int], positions: list[int]) -> bool:
        """A decode step this runner takes: 1..max_batch tokens, one per distinct slot."""
        return (0 < len(slots) <= self.max_batch and len(set(slots)) == len(slots)
                and 0 <= min(slots) and max(slots) < self.cache.num_slots
                and 0 <= min(positions) and max(positions) < self.cache.max_len)

    def bucket(self, n: int, max_position: int) -> tuple[int, int]:
        return bucket_for(self.batch_sizes, n), bucket_for(self.key_lengths, max_position + 1)

    def launches_per_step(self, bucket: tuple[int, int]) -> int | None:
        """Graph launches one replay of `bucket` costs (None: not captured)."""
        g = self._captured.get(bucket)
        return None if g is None else g.launches

    def step(self, input_ids: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """One decode step: token ids, positions, slots (host ints, len n) -> logits [n, Vocab]
        fp32 on the device (the bucket's buffer: read it before the next step)."""
        logits = self.run(self.prepare(input_ids, positions, slots))[: len(input_ids)]
        if self.after_step is not None:
            self.after_step()
        return logits

    def prepare(self, input_ids: list[int], positions: list[int], slots: list[int]) -> tuple[int, int]:
        """The host half: embedding rows and indices into the bucket's buffers; its bucket."""
        key = self.bucket(len(input_ids), max(positions))
        inp = self._inputs.get(key)
        if inp is None:
            inp = self._inputs[key] = StaticInputs(*key, self.network.config.hidden_size, self.cache,
                                                   self.device, self.network.dtype)
        rows = self.network.embed_rows(torch.tensor(input_ids, dtype=torch.long))
        inp.fill(rows, positions, slots)
        return key

    @torch.inference_mode()
    def run(self, key: tuple[int, int]) -> torch.Tensor:
        """The device half, from the buffers `prepare` filled: logits [B, Vocab] fp32."""
        self.stats["steps"] += 1
        inp = self._inputs[key]
        graph = self._captured.get(key)
        if graph is not None:
            graph.replay()
            self.stats["replays"] += 1
            return self._outputs[key]
        if not self.graphs or key in self._eager_only:
            return self._run(inp)
        return self._first_with_capture(key, inp)

    # ---- inside ---------------------------------------------------------------------------------
    def _run(self, inp: StaticInputs) -> torch.Tensor:
        return self.network.decode_static(inp.h, inp.batch(), self.cache)  # [B, Vocab]

    def _first_with_capture(self, key, inp: StaticInputs) -> torch.Tensor:
        """Run this step eagerly on the capture stream (warm-up and this step's result), then
        capture the bucket for the next steps. A capture that fails (an op in the step that
        cannot be captured) leaves the bucket eager, with a warning naming the error."""
        from hybrid.engine.graphs import StepRecorder

        if self._stream is None:
            self._stream = torch.cuda.Stream()
            self._pool = torch.cuda.graph_pool_handle()
        main = torch.cuda.current_stream()
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            out = self._run(inp).clone()
        main.wait_stream(self._stream)
        torch.cuda.synchronize()
        stagings = [moe.staging for moe in self.network.moe_layers().values()]
        rec = StepRecorder(self._pool)
        try:
            from contextlib import ExitStack

            with ExitStack() as stack:
                for st in stagings:
                    stack.enter_context(st.recording(rec))
                with rec.capturing(self._stream):
                    self._outputs[key] = self._run(inp)
        except RuntimeError as e:
            log.warning("decode step bucket B=%d L=%d could not be captured, it runs eagerly: %s", *key, e)
            self._eager_only.add(key)
            self._outputs.pop(key, None)
            self.stats["capture_failures"] += 1
            return out
        self._captured[key] = rec.graph
        self.stats["captures"] += 1
        return out
