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


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(path=None, device=None, dtype=None, **options) -> "Model":
    """Load a checkpoint directory and return a Model.

    path: checkpoint directory (config.json + safetensors); None = the embedded demo model.
    device: where attention/router/dense/shared/LM head run (default: cuda if present, else cpu).
    dtype: device compute dtype, torch.bfloat16 (default) or torch.float32 (reference path).
    options:
      experts_backend  "cpu" (the C++ engine, default when hybrid._native is built) | "torch"
      expert_format    "int4" | "int8" | "bf16": how float experts are packed for the CPU engine
                       (INT4 checkpoints pass through as int4 unless told otherwise)
      device_weights   "bf16"/"fp32" (dense) | "int8" | "fp8", or a dict per tensor group
                       {"attention", "shared", "dense", "lm_head"} -> format
      packed_cache     True: save packed experts next to the checkpoint for an mmap next time
      threads          CPU engine threads (default: physical cores). With no GPU these are the
                       calling thread + threads-1 pool workers, and decode's device work runs
                       on them too (see _split_threads)
      max_len          context the KV cache is sized for (default: min(max_position_embeddings, 4096))
      max_vram         bytes the device may use (default: free device memory on CUDA; unchecked on CPU)
      profile          placement profile (hybrid plan, profiles/*.yaml): experts held on the device
      online           online re-placement of the profile's cached experts (hybrid/planner/
                       online.py): False, True, or a dict of OnlinePolicy fields (interval,
                       window, max_swaps, horizon) over the profile's `online.policy`. Default:
                       the profile's `online.enabled` (false as `hybrid plan` writes it). Needs a
                       profile with a `machine` section (its costs decide when a swap pays); the
                       number of cached experts per layer never changes, so the budget holds.
      progress         show progress bars (default True)
    """
    from hybrid.config import ModelConfig
    from hybrid.loaders.checkpoint import load_model
    from hybrid.loaders.memory import check_fits, device_formats_option

    if path is None:
        if not (DEMO_DIR / "config.json").is_file():
            raise FileNotFoundError(f"no embedded demo model at {DEMO_DIR}; pass a checkpoint directory")
        path = DEMO_DIR
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
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
    expert_format = opts.pop("expert_format", None)
    formats = device_formats_option(opts.pop("device_weights", None))
    packed_cache = bool(opts.pop("packed_cache", False))
    threads = opts.pop("threads", None)
    progress = bool(opts.pop("progress", True))
    max_vram = opts.pop("max_vram", None)
    profile = opts.pop("profile", None)
    online = opts.pop("online", None)
    if online is not None and not isinstance(online, (bool, dict)):
        raise TypeError(f"hybrid.load: online must be False, True or a dict of policy options, "
                        f"got {online!r}")
    if online is not None and online is not False and profile is None:
        raise ValueError("hybrid.load: online= re-places the experts a placement profile caches "
                         "on the device; pass profile= (hybrid plan) as well")
    config = ModelConfig.from_dir(path)
    max_len = int(opts.pop("max_len", None) or min(config.max_position_embeddings, 4096))
    if opts:
        raise TypeError(f"hybrid.load: unknown option(s) {', '.join(sorted(opts))}")

    prof = placer = None
    gpu_expert_bytes = 0
    if profile is not None:
        if backend != "cpu":
            raise ValueError("profile= caches experts on the device beside the CPU engine: it needs "
                             "experts_backend='cpu'")
        prof, spec = _load_profile(profile, path, device, max_vram)
        placer = _online_placer(prof, spec, online)
        item = torch.empty((), dtype=dtype).element_size()
        gpu_expert_bytes = prof.num_cached * 3 * config.hidden_size * config.moe_intermediate_size * item
    check_fits(config, path, device, dtype, formats, max_len=max_len, num_slots=1,
               max_vram=max_vram, experts_on_device=(backend == "torch"), extra=gpu_expert_bytes)
    if backend == "cpu":
        _split_threads(device, threads)
    mode = "precise" if dtype == torch.float32 else "fast"
    config, net = load_model(path, device, dtype, experts_backend=backend, expert_format=expert_format,
                             device_formats=formats, packed_cache=packed_cache, threads=threads,
                             mode=mode, progress=progress, config=config)
    live = None
    if prof is not None:
        _attach_gpu_caches(net, config, prof, device, dtype)
        if placer is not None:
            live = _attach_online(net, config, placer)
    return Model(config, net, path, max_len=max_len, tokenizer=_tokenizer(path), online=live)


def _native_available() -> bool:
    from hybrid import native  # the only importer of hybrid._native (DESIGN.md)

    return native.available()


def _load_profile(profile, path: Path, device: torch.device, max_vram):
    """A placement profile (hybrid plan), checked against this checkpoint's config and VRAM."""
    import json

    from hybrid.planner.model_spec import spec_from_config
    from hybrid.planner.profile import load as load_profile

    spec = spec_from_config(json.loads((path / "config.json").read_text()), model_id=path.name,
                            where=str(path / "config.json"))
    budget = max_vram
    if budget is None and device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0]
    return load_profile(str(profile), model=spec, vram_bytes=budget), spec


def _online_placer(prof, spec, online):
    """The OnlinePlacer `online` asks for (None: off), starting from the profile's placement,
    with the profile's machine and expert formats as its cost model."""
    import dataclasses

    from hybrid.planner.cost import CostModel, MachineSpec
    from hybrid.planner.online import OnlinePlacer
    from hybrid.planner.simulate import OnlinePolicy

    section = prof.data.get("online") or {}
    if not isinstance(section, dict):
        raise ValueError(f"{prof.path}: field 'online' must be a mapping")
    if online is None:
        online = bool(section.get("enabled", False))
    if online is False:
        return None
    options = dict(section.get("policy") or {})
    if isinstance(online, dict):
        options.update(online)
    known = {f.name for f in dataclasses.fields(OnlinePolicy)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"online re-placement: unknown policy option(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    policy = OnlinePolicy(**options)
    if not isinstance(prof.data.get("machine"), dict):
        raise ValueError(f"{prof.path}: online re-placement needs the profile's 'machine' section "
                         f"(the costs that decide when a swap pays); make the profile with "
                         f"`hybrid plan`")
    machine = MachineSpec.from_dict(prof.data["machine"], where=f"{prof.path}: machine")
    cost = CostModel(spec, machine, gpu_expert_format=prof.gpu_expert_format)
    return OnlinePlacer(cost, prof.mask(spec.moe_layers), spec.moe_layers, policy)


def _attach_online(net, config, placer):
    """Observe every MoE layer's routing and swap experts at each step's end (Model.forward)."""
    from hybrid.planner.online import LiveReplacement

    caches, sources = {}, {}
    for i, layer in enumerate(net.layers):
        if config.is_moe_layer(i) and layer.mlp.gpu_cache is not None:
            caches[i] = layer.mlp.gpu_cache
            sources[i] = layer.mlp.routed.layer.unpack_expert
    live = LiveReplacement(placer, caches, sources)
    for i, layer in enumerate(net.layers):
        if config.is_moe_layer(i):
            layer.mlp.observe = live.observe
    return live


def _attach_gpu_caches(net, config, prof, device, dtype) -> None:
    """Give each MoE layer the experts the profile holds on the device (from the packed CPU
    layout, dequantised once); the CPU engine then skips them."""
    from hybrid.experts.gpu_cache import GpuExpertCache

    for i, layer in enumerate(net.layers):
        if config.is_moe_layer(i) and prof.experts_for_layer(i):
            layer.mlp.gpu_cache = GpuExpertCache.from_profile(prof, i, layer.mlp.routed.layer, device, dtype)


def _split_threads(device: torch.device, threads: int | None) -> None:
    """With no GPU the "device" work (attention, router, shared expert, dense MLP, LM head) runs
    on the same cores as the expert engine, one part after the other. Decode steps do it in
    native calls (csrc/mla_decode.h, router.h, dense.h: the bf16 GEMV up to a few tokens) on the
    engine's threads: the Python thread plus `threads - 1` pool workers (caller jobs,
    thread_pool.h), so each core runs one thread and nothing spins on a core another needs.
    Measured on the 2-vCPU dev box: a pool of one worker per core plus a waiting Python thread
    paid ~110 us per pool round trip, one worker fewer ~6 us; demo-model decode went from
    ~150 to 610-850 tok/s with these calls.

    torch keeps what is left: prefill-sized matmuls and attention, and everything in fp32. It
    gets the cores the engine was not given, or 1/8 of them (at least 1) when the engine has
    them all: its OpenMP workers spin after each op, and a 2-thread torch beside a 2-thread
    engine measured 500-860 ms per tiny-model step against 3-16 ms with 1 torch thread.

    Experts a profile caches "on the device" (GpuExpertCache on a CPU device) run on the Python
    thread after the submit, while the pool's workers run their share of the CPU experts; the
    Python thread takes its own share at sync."""
    if device.type != "cpu":
        return
    from hybrid import native
    from hybrid.hardware import cores as machine_cores

    c = machine_cores()
    n = max(1, min(c["physical"], c["usable"]))
    engine = min(threads or n, n)
    torch.set_num_threads(n - engine if engine < n else max(1, n // 8))
    # The Python thread computes a share of every expert job (CpuMoE caller=, set by the
    # loader on a CPU device), so the engine's `engine` threads are it + engine-1 pool workers:
    # a worker per core plus the caller left one core with two spinning threads, and each
    # decode layer paid ~110 us for the pool round trip on 2 vCPUs (6 us this way).
    # The synchronous native calls (dense GEMV, MLA decode) use the same caller + workers, capped
    # at `engine` (a pool keeps at least one worker, which a 1-thread run must not use).
    workers = max(1, engine - 1)
    if native.num_threads() != workers:
        native.set_num_threads(workers)
    native.lib().set_sync_threads(engine)


def _tokenizer(path: Path):
    """The engine's tokenizer when the checkpoint ships one (tiktoken.model or tokenizer.json)."""
    if not any((path / n).is_file() for n in ("tiktoken.model", "tokenizer.json")):
        return None
    from hybrid.tokenizer import load_tokenizer

    return load_tokenizer(path)


class Model:
    """A loaded model: .config, .tokenizer, .logits(), .generate(), .stream()."""

    def __init__(self, config, net, path: Path, max_len: int, tokenizer=None, online=None):
        self.config, self.net, self.path = config, net, path
        self.max_len, self.tokenizer = max_len, tokenizer
        # planner/online.py LiveReplacement, or None: its end_step runs after every forward.
        self.online = online
        self.device, self.dtype = net.device, net.dtype
        self.model = net  # the module with forward(), under the name hybrid.engine looks for
        self._engine = None

    def new_cache(self, num_slots: int = 1, max_len: int | None = None):
        from hybrid.models.kv_cache import LatentKVCache

        return LatentKVCache(self.config, num_slots, max_len or self.max_len, self.device, self.dtype)

    def forward(self, input_ids, positions, slots, cache, logits_index=None) -> torch.Tensor:
        """One step (the engine calls this once per step). With online re-placement, the swaps
        the step's routing asks for happen after the whole forward, never inside it."""
        out = self.net.forward(input_ids, positions, slots, cache, logits_index)
        if self.online is not None:
            self.online.end_step()
        return out

    def online_stats(self) -> dict | None:
        """Online re-placement counters (swaps, steps, hits, picks, hit_rate), None when off."""
        return self.online.stats() if self.online is not None else None

    def _check_prompt(self, token_ids, extra: int = 0) -> torch.Tensor:
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("empty prompt: token_ids needs at least one token")
        if ids.numel() + extra > self.max_len:
            raise ValueError(f"prompt of {ids.numel()} tokens + {extra} new exceeds max_len {self.max_len} "
                             "(pass max_len= to hybrid.load)")
        return ids

    def logits(self, token_ids) -> torch.Tensor:
        """Logits for every position of a prompt: [len, vocab] fp32."""
        ids = self._check_prompt(token_ids)
        cache = self.new_cache(1, ids.numel())
        pos = torch.arange(ids.numel())
        return self.forward(ids, pos, torch.zeros_like(pos), cache)

    def generate(self, token_ids, max_new_tokens: int, temperature: float = 0.0, **sampling) -> list[int]:
        """New token ids (prompt not included, a final end-of-sequence token not included)."""
        return list(self.stream(token_ids, max_new_tokens, temperature, **sampling))

    def stream(self, token_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop_at_eos: bool = True, **sampling) -> Iterator[int]:
        """Yield new token ids as they are made. With a tokenizer this runs on the engine
        (hybrid.engine: batching, every sampling option); without one (bare test checkpoints)
        a plain prefill + decode loop over forward() with the latent cache."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        ids = self._check_prompt(token_ids, max_new_tokens)
        if max_new_tokens == 0:
            return
        if self.tokenizer is not None:
            from hybrid.engine.sampling import SamplingParams

            params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                    ignore_eos=not stop_at_eos, **sampling)
            for ev in self.engine().submit(ids.tolist(), params, max_tokens=max_new_tokens):
                yield from ev.token_ids
            return
        if sampling:
            raise TypeError(f"sampling option(s) {', '.join(sorted(sampling))} need the engine "
                            "(a checkpoint with a tokenizer)")
        yield from self._plain_loop(ids, max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos)

    def engine(self):
        """The generation engine for this model (created on first use; needs a tokenizer)."""
        if self._engine is None:
            from hybrid.engine.engine import Engine

            # One slot: the KV cache hybrid.load checked against the device budget. Servers
            # that batch build their own Engine with more slots (and their own budget check).
            self._engine = Engine(self, max_seqs=1, max_context=self.max_len)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def _plain_loop(self, ids, max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos):
        cache = self.new_cache(1, ids.numel() + max_new_tokens)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        eos = set(self.config.eos_token_ids) if stop_at_eos else set()
        pos = torch.arange(ids.numel())
        last = torch.tensor([ids.numel() - 1])
        logits = self.forward(ids, pos, torch.zeros_like(pos), cache, logits_index=last)
        n = ids.numel()
        for i in range(max_new_tokens):
            tok = _sample(logits[0], temperature, top_p, top_k, gen)
            if tok in eos:
                return
            yield tok
            if i == max_new_tokens - 1:
                return
            logits = self.forward(torch.tensor([tok]), torch.tensor([n]), torch.tensor([0]), cache)
            n += 1


def _sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, gen) -> int:
    """logits [Vocab] fp32 -> one token id. temperature 0: greedy."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.cpu() / temperature, -1)
    if top_k > 0:
        kth = torch.topk(probs, min(top_k, probs.numel()))[0][-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p * sp.sum()
        probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
