"""hybrid.load and the Model object people hold.

    model = hybrid.load("/models/Kimi-K2.5")          # bf16 device weights, CPU INT4 experts
    model.generate(model.tokenizer.encode("Hi"), 32)

`dtype=torch.float32` is the reference path: everything fp32, CPU experts in mode="precise".
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

DEMO_DIR = Path(__file__).parent / "demo_model"


DECODE_STEPS = ("auto", "eager", "static", "graphs")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(path=None, device=None, dtype=None, **options) -> "Model":
    """Load a checkpoint directory and return a Model.

    path: checkpoint directory (config.json + safetensors), or a .gguf file (the first file of a
          split set: the others are found beside it); None = the embedded demo model.
    device: where attention/router/dense/shared/LM head run (default: cuda if present, else cpu).
    dtype: device compute dtype, torch.bfloat16 (default) or torch.float32 (reference path).
    options:
      experts_backend  "cpu" (the C++ engine, default when hybrid._native is built) | "torch"
      expert_format    "int4" | "int8" | "bf16": how float experts are packed for the CPU engine
                       (INT4 checkpoints pass through as int4 unless told otherwise)
      device_weights   "bf16"/"fp32" (dense) | "int8" | "fp8" | "blocks" (a GGUF file's non-expert
                       tensors in their own blocks, run by the native kernels; CPU device, bf16), or a
                       dict per tensor group
                       {"attention", "shared", "dense", "lm_head"} -> format
      packed_cache     True: save packed experts next to the checkpoint for an mmap next time
      threads          CPU engine threads (default: physical cores). With no GPU these are the
                       calling thread + threads-1 pool workers, and decode's device work runs
                       on them too (see hybrid/runtime/threads.py)
      max_len          context the KV cache is sized for (default: min(max_position_embeddings, 4096))
      max_vram         bytes the device may use (default: free device memory on CUDA; unchecked on CPU)
      profile          placement profile (hybrid plan, profiles/*.yaml): experts held on the device
      online           online re-placement of the profile's cached experts (hybrid/planner/
                       online.py): False, True, or a dict of OnlinePolicy fields (interval,
                       window, max_swaps, horizon) over the profile's `online.policy`. Default:
                       the profile's `online.enabled` (false as `hybrid plan` writes it). Needs a
                       profile with a `machine` section (its costs decide when a swap pays); the
                       number of cached experts per layer never changes, so the budget holds.
      device_ops       "auto" (default) | "torch" | "native": the device ops' forms (hybrid/ops);
                       "torch" on a CPU runs exactly what a CUDA device runs (also HYBRID_DEVICE_OPS)
      decode_steps     "auto" (default) | "eager" | "static" | "graphs": how the engine runs decode
                       steps (hybrid/engine/step_runner.py). eager: forward() every step; static:
                       from static buffers per batch-size bucket (torch op set); graphs: those
                       buffers captured as CUDA graph segments. auto: graphs on a CUDA device with
                       an architecture that has static decode and no online re-placement (whose
                       swaps move the cache's tensors), else eager. Prefill always runs eager.
      defer_experts    expert deferral (hybrid/experts/moe_layer.py): each MoE layer's k
                       lowest-weight CPU picks per token are added to the next MoE layer's output,
                       so the CPU computes them during that layer's attention. Changes the math;
                       default 0 (off): bench/deferral.py measures the accuracy cost
      layerwise_prefill "auto" (default) | True | False: prefill chunks the cost model says are
                       large enough stream every MoE layer's experts to the device, double-
                       buffered, and run them there (hybrid/runtime/layerwise.py); auto: on a CUDA
                       device when its two layer buffers fit; True: on or an error saying why
      progress         show progress bars (default True)
      images_enabled   load the vision tower of a checkpoint that has one (default True); False
                       saves its memory and refuses images
      mmproj           a GGUF model's vision tower: llama.cpp's mmproj GGUF for Kimi K2.5 (projector
                       kimik25; hybrid/models/moonvit_gguf.py). Default: the one mmproj*.gguf file
                       beside the model, if there is exactly one (one that does not fit the model is
                       skipped with a warning); False: none
    """
    if path is None:
        if not (DEMO_DIR / "config.json").is_file():
            raise FileNotFoundError(f"no embedded demo model at {DEMO_DIR}; pass a checkpoint directory")
        path = DEMO_DIR
    path = Path(path)
    if not path.is_dir() and not (path.suffix == ".gguf" and path.is_file()):
        raise FileNotFoundError(f"checkpoint directory (or .gguf file) {path} does not exist")
    device = torch.device(device) if device is not None else _default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested, but torch sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else (dtype or torch.bfloat16)
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float32 ('bf16' / 'fp32'), got {dtype!r}")
    opts = dict(options)
    backend = opts.pop("experts_backend", None)
    if backend is None:
        backend = "cpu" if _native_available() else "torch"
        if backend == "torch":
            warnings.warn("hybrid._native is not built (pip install -e .): routed experts run on the "
                          "plain torch backend, which is much slower")
    online = opts.pop("online", None)
    if online is not None and not isinstance(online, (bool, dict)):
        raise TypeError(f"hybrid.load: online must be False, True or a dict of policy options, "
                        f"got {online!r}")
    profile = opts.pop("profile", None)
    if online is not None and online is not False and profile is None:
        raise ValueError("hybrid.load: online= re-places the experts a placement profile caches "
                         "on the device; pass profile= (hybrid plan) as well")
    g = _open_gguf(path)  # parsed once: config, weights and tokenizer read this one object
    try:
        return _load(path, device, dtype, opts, backend, online, profile, g)
    finally:
        # Closed here, loaded or not: what the model keeps it copied out of the mapping (arrays
        # that still view it keep it, GGUFFile.close), so nothing holds the file once load
        # returns, and a failed load's traceback does not keep it mapped.
        if g is not None:
            g.close()


def _load(path: Path, device, dtype, opts: dict, backend: str, online, profile, g) -> "Model":
    from hybrid.models import config_from_dir, config_from_gguf
    from hybrid.runtime.build import build_model
    from hybrid.runtime.memory import device_formats_option

    config = config_from_gguf(g) if g is not None else config_from_dir(path)
    max_len = int(opts.pop("max_len", None) or min(config.max_position_embeddings, 4096))
    kw = dict(expert_format=opts.pop("expert_format", None),
              device_formats=device_formats_option(opts.pop("device_weights", None)),
              packed_cache=bool(opts.pop("packed_cache", False)), threads=opts.pop("threads", None),
              progress=bool(opts.pop("progress", True)), max_vram=opts.pop("max_vram", None),
              device_ops=opts.pop("device_ops", None), defer_experts=opts.pop("defer_experts", 0),
              images_enabled=bool(opts.pop("images_enabled", True)), mmproj=opts.pop("mmproj", None),
              layerwise_prefill=opts.pop("layerwise_prefill", "auto"))
    decode_steps = opts.pop("decode_steps", None) or "auto"
    if decode_steps not in DECODE_STEPS:
        raise ValueError(f"hybrid.load: decode_steps must be one of {', '.join(DECODE_STEPS)}, "
                         f"got {decode_steps!r}")
    if opts:
        raise TypeError(f"hybrid.load: unknown option(s) {', '.join(sorted(opts))}")
    built = build_model(path, device, dtype, experts_backend=backend, max_len=max_len, profile=profile,
                        online=online, config=config, gguf_file=g, **kw)
    model = Model(built, path, max_len=max_len, tokenizer=_tokenizer(path, g))
    model._decode_steps = model._resolve_decode_steps(decode_steps)
    return model


def _native_available() -> bool:
    from hybrid import native  # the only importer of hybrid._native (DESIGN.md)

    return native.available()


def _open_gguf(path: Path):
    """`path` opened as a GGUFFile when it is a .gguf file (or the first of a split set), else None."""
    from hybrid.loaders.gguf_file import GGUFFile, is_gguf_path

    return GGUFFile(path) if is_gguf_path(path) else None


def _tokenizer(path: Path, g=None):
    """The engine's tokenizer when the checkpoint ships one (tiktoken.model or tokenizer.json,
    or a GGUF's tokenizer.ggml.* metadata: `g`, the file already open)."""
    if g is not None:
        from hybrid.tokenizer_gguf import gguf_tokenizer

        return gguf_tokenizer(g)
    if not any((path / n).is_file() for n in ("tiktoken.model", "tokenizer.json")):
        return None
    from hybrid.tokenizer import load_tokenizer

    return load_tokenizer(path)


class Model:
    """A loaded model: .config, .tokenizer, .network, .vision, .logits(), .generate(), .stream().

    Images (a checkpoint with a vision tower, hybrid/models/vision.py): logits/generate/stream take
    images=[...], each a PIL.Image, a path or encoded bytes, in prompt order; token_ids then hold
    one image placeholder (model.vision.placeholder_id, <|media_pad|>) where each image goes, and
    each is expanded to the image's token count (logits come back for the expanded sequence)."""

    def __init__(self, built, path: Path, max_len: int, tokenizer=None):
        self.config, self.network, self.path = built.config, built.network, path
        self.facts = built.facts
        self.max_len, self.tokenizer = max_len, tokenizer
        # planner/online.py LiveReplacement, or None: its end_step runs after every forward.
        self.online = built.online
        self.vision = built.vision  # hybrid/models/vision.py Vision, or None (no image input)
        self.device, self.dtype = self.network.device, self.network.dtype
        self._built = built
        self._engine = None
        self._decode_steps = "eager"  # hybrid.load sets the resolved decode_steps option

    def _resolve_decode_steps(self, choice: str) -> str:
        """decode_steps made concrete for this model (ValueError where it cannot run)."""
        static_ok = self.network.cache_class.static_decode() and self._built.ops.name == "torch"
        if choice == "auto":
            return "graphs" if self.device.type == "cuda" and static_ok and self.online is None else "eager"
        if choice in ("static", "graphs") and not static_ok:
            raise ValueError(f"hybrid.load: decode_steps={choice!r} needs the torch op set "
                             f"(device_ops='torch' on a CPU) and an architecture with static decode "
                             f"({self.config.model_type} with op set {self._built.ops.name!r})")
        if choice == "graphs" and (self.device.type != "cuda" or self.online is not None):
            raise ValueError("hybrid.load: decode_steps='graphs' needs a CUDA device and no online "
                             "re-placement")
        return choice

    def decode_runner(self, cache, max_seqs: int):
        """The engine's runner for decode steps (hybrid/engine/step_runner.py), or None: forward()
        runs them (decode_steps='eager'). The slot cache and the paged one both take it."""
        if self._decode_steps == "eager":
            return None
        from hybrid.engine.step_runner import DecodeRunner

        after = self.online.end_step if self.online is not None else None
        return DecodeRunner(self.network, cache, max_batch=min(max_seqs, cache.num_slots),
                            graphs=self._decode_steps == "graphs", after_step=after)

    def make_cache(self, num_slots: int = 1, max_len: int | None = None, num_blocks: int | None = None,
                   block_size: int | None = None):
        """A slot cache, or with num_blocks and block_size a paged one (see kv_paged())."""
        return self.network.make_cache(num_slots, max_len or self.max_len, num_blocks, block_size)

    def kv_paged(self) -> bool:
        return self.network.kv_paged()

    def kv_bytes_per_token(self) -> int:
        return self.network.kv_bytes_per_token()

    def kv_cache_tokens(self, num_slots: int, max_len: int | None = None, num_blocks: int | None = None,
                        block_size: int | None = None) -> int:
        """Token rows make_cache(same arguments) allocates per layer (spare rows included)."""
        return self.network.kv_cache_tokens(num_slots, max_len or self.max_len, num_blocks, block_size)

    def moe_layers(self) -> dict:
        """{decoder-layer index: MoELayer}: attach points for traces, timing and placement."""
        return self.network.moe_layers()

    def stats(self) -> dict:
        """How the model was built: the op set, the expert factory's counters (int4_passthrough,
        quantised, from_cache)."""
        return self._built.stats()

    def forward(self, input_ids, positions, slots, cache, logits_index=None, embeds=None) -> torch.Tensor:
        """One step (the engine calls this once per step). With online re-placement, the swaps
        the step's routing asks for happen after the whole forward, never inside it. embeds:
        (rows, values) replacing those rows' input embeddings (image tokens)."""
        with self.prefill_chunk(input_ids.numel()):  # the chunk's mode (layerwise or cpu)
            if embeds is None:
                out = self.network.forward(input_ids, positions, slots, cache, logits_index)
            else:
                out = self.network.forward(input_ids, positions, slots, cache, logits_index, embeds=embeds)
        if self.online is not None:
            self.online.end_step()
        return out

    def prefill_chunk(self, tokens: int):
        """Context for a forward of `tokens`: layerwise prefill when the cost model picks it
        (hybrid/runtime/layerwise.py), else nothing changes."""
        from contextlib import nullcontext

        lw = self._built.layerwise
        return nullcontext("cpu") if lw is None else lw.chunk(tokens)

    def layerwise(self):
        """The LayerwisePrefill (threshold, mode(tokens), predict(tokens)), or None: off."""
        return self._built.layerwise

    def layerwise_chunks(self) -> tuple[int, int | None] | None:
        """(fewest, most) tokens of a layerwise forward, fixed at load, or None: layerwise
        prefill is off or never pays. fewest: the cost model's threshold; most: what the
        activations beside the two layer buffers allow (None: unbounded). The engine reads long
        prompts in chunks within them (hybrid/engine/engine.py)."""
        lw = self._built.layerwise
        return None if lw is None or lw.threshold is None else (lw.threshold, lw.max_chunk)

    def online_stats(self) -> dict | None:
        """Online re-placement counters (swaps, steps, hits, picks, hit_rate), None when off."""
        return self.online.stats() if self.online is not None else None

    def encode_image(self, image) -> torch.Tensor:
        """A PreparedImage (hybrid/models/moonvit_images.py) -> [tokens, H] input embeddings."""
        return self._vision().encode(image)

    def _vision(self):
        if self.vision is None:
            why = ("it was loaded with images_enabled=False" if self._built.config.model_type == "kimi_k25"
                   else "it has no vision tower")
            raise ValueError(f"this model takes no images: {why}")
        return self.vision

    def _with_images(self, token_ids, images):
        """(expanded ids, ImageSpans) for images given to logits/generate/stream."""
        if images is None or len(images) == 0:
            return list(token_ids), []
        v = self._vision()
        return v.expand(token_ids, v.prepare(images))

    def _check_prompt(self, token_ids, extra: int = 0) -> torch.Tensor:
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("empty prompt: token_ids needs at least one token")
        if ids.numel() + extra > self.max_len:
            raise ValueError(f"prompt of {ids.numel()} tokens + {extra} new exceeds max_len {self.max_len} "
                             "(pass max_len= to hybrid.load)")
        return ids

    def logits(self, token_ids, images=None) -> torch.Tensor:
        """Logits for every position of a prompt: [len, vocab] fp32 (len after image expansion)."""
        token_ids, spans = self._with_images(token_ids, images)
        ids = self._check_prompt(token_ids)
        cache = self.make_cache(1, ids.numel())
        pos = torch.arange(ids.numel())
        embeds = self.vision.span_rows(spans) if spans else None
        return self.forward(ids, pos, torch.zeros_like(pos), cache, embeds=embeds)

    def generate(self, token_ids, max_new_tokens: int, temperature: float = 0.0, **sampling) -> list[int]:
        """New token ids (prompt not included, a final end-of-sequence token not included)."""
        return list(self.stream(token_ids, max_new_tokens, temperature, **sampling))

    def stream(self, token_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop_at_eos: bool = True, images=None,
               **sampling) -> Iterator[int]:
        """Yield new token ids as they are made. With a tokenizer this runs on the engine
        (hybrid.engine: batching, every sampling option); without one (bare test checkpoints)
        a plain prefill + decode loop over forward() with the latent cache."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        token_ids, spans = self._with_images(token_ids, images)
        ids = self._check_prompt(token_ids, max_new_tokens)
        if max_new_tokens == 0:
            return
        if self.tokenizer is not None:
            from hybrid.engine.sampling import SamplingParams

            params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                    ignore_eos=not stop_at_eos, **sampling)
            for ev in self.engine().submit(ids.tolist(), params, max_tokens=max_new_tokens, images=spans):
                yield from ev.token_ids
            return
        if sampling:
            raise TypeError(f"sampling option(s) {', '.join(sorted(sampling))} need the engine "
                            "(a checkpoint with a tokenizer)")
        yield from self._plain_loop(ids, max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos, spans)

    def engine(self):
        """The generation engine for this model (created on first use; needs a tokenizer)."""
        if self._engine is None:
            from hybrid.engine.engine import Engine

            # One slot: the KV cache hybrid.load checked against the device budget. Servers
            # that batch build their own Engine with more slots (and their own budget check).
            self._engine = Engine(self, max_seqs=1, max_context=self.max_len, decode_runner=self.decode_runner)
        return self._engine

    def close(self) -> None:
        """Stop the engine. (A GGUF checkpoint's file is closed when hybrid.load returns.)"""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def _plain_loop(self, ids, max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos, spans=()):
        from hybrid.engine.sampling import RowState, SamplingParams, make_generator, sample

        row = RowState(SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
                       make_generator(seed), ids.tolist(), [])
        cache = self.make_cache(1, ids.numel() + max_new_tokens)
        eos = set(self.config.eos_token_ids) if stop_at_eos else set()
        pos = torch.arange(ids.numel())
        last = torch.tensor([ids.numel() - 1])
        embeds = self.vision.span_rows(spans) if spans else None
        logits = self.forward(ids, pos, torch.zeros_like(pos), cache, logits_index=last, embeds=embeds)
        n = ids.numel()
        for i in range(max_new_tokens):
            tok = sample(logits[:1], [row])[0].token_id  # the engine's sampler, one row
            if tok in eos:
                return
            row.output_ids.append(tok)
            yield tok
            if i == max_new_tokens - 1:
                return
            logits = self.forward(torch.tensor([tok]), torch.tensor([n]), torch.tensor([0]), cache)
            n += 1
