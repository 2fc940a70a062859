"""Cost model: predicted decode and prefill time for model x machine x placement.

One decode step for a batch of B tokens (DESIGN.md "One decode step"), per MoE layer l:

  serial_l   attention, norms and router on the GPU: read their weights and the layer's
             latent KV cache once per step (memory-bound), or their FLOPs at large B
  then the CPU and the GPU work at the same time:
  cpu_l(S)   = cpu_fix + sum over experts e NOT in S of cpu_e
  gpu_l(S)   = gpu_fix + sum over experts e IN S of gpu_e        (gpu_fix: the shared expert)
  sync_l     submit + wake + result copy + stream sync, once per layer

  time_l(S)  = serial_l + max(cpu_l(S), gpu_l(S)) + sync_l

with, for an expert picked by one token with probability p_e (from the trace),
  touched_e  = 1 - (1 - p_e)^B    expected chance the batch touches e at all (its weights are
                                  read once however many of the B tokens use it)
  cpu_e      = max(touched_e * expert_bytes_cpu / (cpu_read_gbps * cpu_kernel_efficiency),
                   B * p_e * expert_flops / cpu_matmul_tops)
  gpu_e      = max(touched_e * expert_bytes_gpu / gpu_mem_gbps, B * p_e * expert_flops / gpu_tflops)
               + touched_e * gpu_expert_overhead   (host dispatch of one cached expert's matmuls)
  cache_l    = gpu_cache_layer_us if layer l holds any cached expert, else 0 (the cache's fixed
               per-layer work: slot lookup, sort, one host sync), added to the GPU part

The rates come from a MachineSpec: assumed for the reference workstation, measured for this
machine by calibrate.py (`hybrid profile --calibrate`), which times the real runtime: the
expert engine (sync cost, kernel GB/s), the GPU cache (per-layer and per-expert cost), torch's
matmul read rate, and the per-layer host overhead that makes a no-cache run add up.

Decode time = dense layers + sum_l time_l + LM head; tok/s = B / time. With B = 1, touched_e =
p_e: the sum over CPU experts is the expected CPU bytes of a token, the quantity the placement
moves. The CPU prefill path is the same formula with B = the prefill chunk.
Prefill: one chunk of B tokens runs either as above ("cpu") or layerwise (every MoE layer's
routed experts streamed to the GPU over PCIe, double-buffered, and run there); prefill() names
the faster, layerwise_threshold() the smallest chunk that streams, and the runtime runs exactly
that (hybrid/runtime/layerwise.py).

The cost is in seconds and each part is a plain sum, so the planner (plan.py) can work with the
per-expert arrays cpu_e / gpu_e directly (LayerCosts).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from hybrid.planner.model_spec import ModelSpec
from hybrid.planner.units import parse_bytes

GB = 1e9


@dataclass
class MachineSpec:
    name: str
    cpu_read_gbps: float          # RAM streaming read bandwidth, all cores together (GB/s)
    cpu_kernel_efficiency: float  # fraction of cpu_read_gbps the expert GEMV kernel reaches
    cpu_matmul_tops: float        # CPU int8/bf16 matmul rate at large batch (AMX/VNNI), T op/s
    gpu_mem_gbps: float           # achievable GPU memory bandwidth (GB/s)
    gpu_tflops: float             # achievable dense bf16 matmul rate on the GPU (TFLOP/s)
    pcie_gbps: float              # achievable pinned host -> device copy rate (GB/s)
    sync_us: float                # per MoE layer CPU/GPU hand-off cost (microseconds)
    vram_bytes: int               # total GPU memory (0: no GPU)
    ram_bytes: int                # total RAM
    cpu_name: str = ""
    gpu_name: str = ""
    cpu_cores: int = 0
    layer_overhead_us: float = 0.0  # per decoder layer: host-side op dispatch / kernel launches
                                    # not hidden behind device work (eager PyTorch)
    cpu_kernel_gbps: float = 0.0  # measured expert-kernel read rate on the calibrated model's
                                  # experts (GB/s); 0: cpu_read_gbps x cpu_kernel_efficiency.
                                  # Small experts sit in cache and beat RAM, so this can exceed
                                  # cpu_read_gbps
    gpu_expert_overhead_us: float = 0.0  # per cached expert a step uses: launching its matmuls
    gpu_cache_layer_us: float = 0.0      # per MoE layer holding cached experts: the cache's
                                         # fixed work (slot lookup, sort, one host sync)
    gpu_present: bool = True      # False: the "GPU" part is torch on the same CPU
    device_overlaps_cpu: bool | None = None  # does the cached experts' device work run while
                                  # the CPU engine works? None: exactly when there is a GPU.
                                  # Without one it does only when torch's threads and the
                                  # engine's fit in the cores side by side (calibrate.py
                                  # decides); otherwise they take turns and the parts add up
    sources: dict = field(default_factory=dict)   # parameter -> where its value came from

    def __post_init__(self):
        for f in ("cpu_read_gbps", "cpu_matmul_tops", "gpu_mem_gbps", "gpu_tflops", "pcie_gbps"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"machine {self.name!r}: {f} must be a positive number, got {v!r}")
        if not 0 < self.cpu_kernel_efficiency <= 1:
            raise ValueError(f"machine {self.name!r}: cpu_kernel_efficiency must be in (0, 1], "
                             f"got {self.cpu_kernel_efficiency!r}")
        for f in ("sync_us", "layer_overhead_us", "cpu_kernel_gbps", "gpu_expert_overhead_us",
                  "gpu_cache_layer_us"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"machine {self.name!r}: {f} must be a number >= 0, got {v!r}")
        self.vram_bytes = parse_bytes(self.vram_bytes, f"machine {self.name!r} vram_bytes")
        self.ram_bytes = parse_bytes(self.ram_bytes, f"machine {self.name!r} ram_bytes")

    @property
    def overlaps(self) -> bool:
        return self.gpu_present if self.device_overlaps_cpu is None else self.device_overlaps_cpu

    @property
    def cpu_effective_gbps(self) -> float:
        """The expert kernel's read rate: measured when calibrated, else RAM x efficiency."""
        if self.cpu_kernel_gbps > 0:
            return self.cpu_kernel_gbps
        return self.cpu_read_gbps * self.cpu_kernel_efficiency

    def summary(self) -> dict:
        """Everything, with the per-parameter sources last (profiles show where numbers came
        from)."""
        d = asdict(self)
        d["sources"] = d.pop("sources")
        return d

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "machine") -> "MachineSpec":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping of machine fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
        required = {"name", "cpu_read_gbps", "cpu_kernel_efficiency", "cpu_matmul_tops",
                    "gpu_mem_gbps", "gpu_tflops", "pcie_gbps", "sync_us", "vram_bytes",
                    "ram_bytes"}
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str) -> "MachineSpec":
        import yaml

        with open(path) as f:
            d = yaml.safe_load(f)
        if isinstance(d, dict) and "machine" in d and isinstance(d["machine"], dict):
            d = d["machine"]
        return cls.from_dict(d, where=path)


def reference_workstation(vram_bytes="24GiB") -> MachineSpec:
    """The machine the shipped profiles are made for. Sources of each number in `sources`."""
    return MachineSpec(
        name="reference workstation",
        cpu_read_gbps=300.0, cpu_kernel_efficiency=0.75, cpu_matmul_tops=40.0,
        gpu_mem_gbps=900.0, gpu_tflops=150.0, pcie_gbps=25.0, sync_us=40.0,
        layer_overhead_us=100.0, vram_bytes=vram_bytes, ram_bytes=parse_bytes("768GiB"),
        cpu_name="server CPU, 8-channel DDR5-4800 (e.g. Xeon w/ AMX)",
        gpu_name="24 GB class GPU on PCIe 4.0 x16 (e.g. RTX 4090)", cpu_cores=32,
        sources={
            "cpu_read_gbps": "assumed: 8 channels x 4800 MT/s x 8 B = 307 GB/s peak; ~300 GB/s "
                             "streaming read (the project's reference figure)",
            "cpu_kernel_efficiency": "assumed: INT4 GEMV reaching 75% of streaming read; "
                                     "`hybrid doctor` measures it on a real machine",
            "cpu_matmul_tops": "assumed: 32 cores AMX int8 ~130 TOPS peak, ~30% sustained in MoE "
                               "GEMM with dequant",
            "gpu_mem_gbps": "assumed: RTX 4090 1008 GB/s peak, ~90% achievable",
            "gpu_tflops": "assumed: RTX 4090 165 TFLOP/s dense bf16 (fp32 acc) peak, ~90%",
            "pcie_gbps": "assumed: PCIe 4.0 x16 32 GB/s peak, ~25 GB/s pinned copies",
            "sync_us": "assumed: stream sync + CPU pool wake + two small copies per MoE layer",
            "layer_overhead_us": "assumed: eager PyTorch, ~40 kernel launches per layer, partly "
                                 "hidden behind GPU work; `hybrid profile --calibrate` fits "
                                 "it on a real machine",
            "cpu_kernel_gbps": "not set: cpu_read_gbps x cpu_kernel_efficiency",
            "gpu_expert_overhead_us": "assumed 0: a cached expert's launches queue behind GPU "
                                      "work; `hybrid profile --calibrate` measures it",
            "gpu_cache_layer_us": "assumed 0 (as above); `hybrid profile --calibrate` fits it",
            "vram_bytes": "the budget being planned for",
        },
    )


def local_machine(measure: bool = True, info: dict | None = None) -> MachineSpec:
    """This machine: RAM, cores, GPU and, when `measure`, the RAM read bandwidth, all from
    hybrid.hardware (through hostinfo.collect). Kernel efficiency and GPU rates stay assumptions unless a GPU is
    present (then its name and memory are real, its rates still nominal)."""
    from hybrid.planner import hostinfo

    if info is None:
        info = hostinfo.collect(measure_bandwidth=measure)
    src = {"ram_bytes": "psutil", "cpu_cores": "os / psutil"}
    bw = info.get("ram_read_gbps")
    if bw:
        src["cpu_read_gbps"] = f"measured ({info.get('ram_read_source', 'probe')})"
    else:
        bw = 20.0 * max(1, info.get("memory_channels_guess", 2))
        src["cpu_read_gbps"] = "not measured: 20 GB/s per assumed channel"
    gpus = info.get("gpus") or []
    vram = gpus[0]["total_bytes"] if gpus else 0
    src["vram_bytes"] = "torch.cuda" if gpus else "no CUDA GPU found"
    eff, kern = 0.7, info.get("expert_kernel_gbps")
    src.update({
        "cpu_kernel_efficiency": "assumed 0.7 (run `hybrid doctor` to measure)",
        "cpu_matmul_tops": "assumed: 0.5 T op/s per core",
        "gpu_mem_gbps": "assumed nominal", "gpu_tflops": "assumed nominal",
        "pcie_gbps": "assumed nominal",
        "sync_us": "assumed (`hybrid profile --calibrate` measures it)",
        "layer_overhead_us": "assumed (`hybrid profile --calibrate` fits it from real runs)",
    })
    if kern and info.get("ram_read_gbps"):
        eff = min(1.0, kern / bw)
        src["cpu_kernel_efficiency"] = "measured: expert kernel GB/s / RAM read GB/s"
    cores = int(info.get("physical_cores") or info.get("logical_cores") or 1)
    if not gpus:
        # Decode reads the device weights with the native bf16 GEMV (csrc/core/dense.h), which streams
        # like the expert kernel (measured 17-32 GB/s on a 23.7 GB/s machine), and a decode layer
        # costs ~150 us of calls and small ops on top (demo model, 2-vCPU dev box: 1.25 ms per
        # 5-layer step, ~0.25 ms of it weight reads).
        src["gpu_mem_gbps"] = ("no GPU: the native GEMV on the CPU reads device weights at the expert "
                               "kernel's efficiency")
        src["gpu_tflops"] = "no GPU: assumed 0.1 TFLOP/s per core for torch matmuls"
        src["layer_overhead_us"] = "no GPU: assumed 150 us per layer of native calls and small ops"
    return MachineSpec(
        name="this machine", cpu_read_gbps=float(bw), cpu_kernel_efficiency=eff,
        cpu_matmul_tops=0.5 * cores, gpu_mem_gbps=900.0 if gpus else eff * float(bw),
        gpu_tflops=100.0 if gpus else 0.1 * cores, pcie_gbps=25.0 if gpus else 50.0,
        sync_us=40.0 if gpus else 10.0, layer_overhead_us=100.0 if gpus else 150.0,
        vram_bytes=vram,
        ram_bytes=int(info.get("ram_total_bytes") or 0), cpu_name=str(info.get("cpu_model", "")),
        gpu_name=gpus[0]["name"] if gpus else "", cpu_cores=cores, gpu_present=bool(gpus),
        sources=src)


def machine_from_arg(arg: str | None, vram: int | None = None, measure: bool = True) -> MachineSpec:
    """--machine: 'reference' (default), 'local', or a YAML file. `vram` overrides the budget."""
    if arg in (None, "reference"):
        m = reference_workstation(vram if vram is not None else "24GiB")
    elif arg == "local":
        m = local_machine(measure=measure)
    elif os.path.isfile(arg):
        m = MachineSpec.from_yaml(arg)
    else:
        raise ValueError(f"--machine {arg!r}: expected 'reference', 'local' or a YAML file path")
    if vram is not None:
        if not m.gpu_present:
            raise ValueError(f"--machine {arg}: this machine has no GPU, so there is no VRAM to "
                             f"plan for; use --machine reference or a machine YAML describing "
                             f"the GPU you mean")
        m.vram_bytes = int(vram)
        m.sources["vram_bytes"] = "given on the command line"
    return m


# ---------------------------------------------------------------------------------------------

@dataclass
class LayerCosts:
    """Per-layer cost pieces for one batch size, all in seconds per step (arrays over L MoE
    layers, [L, E] for per-expert terms). time_l(S) = serial + sync + max(cpu_fix + sum_{e not
    in S} cpu, gpu_fix + sum_{e in S} gpu)."""
    cpu: np.ndarray       # [L, E]
    gpu: np.ndarray       # [L, E]
    cpu_fix: np.ndarray   # [L]
    gpu_fix: np.ndarray   # [L]
    serial: np.ndarray    # [L]
    sync: float
    other: float          # dense layers, LM head: once per step
    batch: int
    overlap: bool = True  # False without a GPU: the two parts add up
    cache_fix: np.ndarray | None = None  # [L] added to the GPU part of a layer that holds
                                         # any cached expert (None: nothing)

    def layer_times(self, mask: np.ndarray) -> np.ndarray:
        """[L] seconds for a cache mask [L, E] bool."""
        cpu = self.cpu_fix + np.where(mask, 0.0, self.cpu).sum(axis=1)
        gpu = self.gpu_fix + np.where(mask, self.gpu, 0.0).sum(axis=1)
        if self.cache_fix is not None:
            gpu = gpu + np.where(mask.any(axis=1), self.cache_fix, 0.0)
        both = np.maximum(cpu, gpu) if self.overlap else cpu + gpu
        return self.serial + self.sync + both

    def step_time(self, mask: np.ndarray) -> float:
        return float(self.other + self.layer_times(mask).sum())


@dataclass
class CostModel:
    model: ModelSpec
    machine: MachineSpec
    # What the GPU cache holds: None means the experts' storage format (gpu_cache.py keeps
    # int4/int8 experts in their own bits; a bf16 model's in the compute dtype, bf16 or fp32).
    gpu_expert_format: str | None = None
    device_weight_format: str = "bf16"  # attention / shared / dense / LM head on the GPU
    kv_tokens: int = 4096               # context length at which decode is predicted
    prefill_chunk: int = 2048
    # Layerwise prefill (prefill()): whether the runtime may stream whole layers to the GPU; the
    # planner turns it on when its two layer buffers fit the VRAM (plan.compute_budget).
    layerwise_prefill: bool = False

    def __post_init__(self):
        if self.gpu_expert_format is None:
            fmt = self.model.expert_format
            # GGUF block types ("gguf"): the cache holds those experts dequantised, in bf16
            # (PackedLayer.compact_expert); the formats below it holds in their own bits.
            self.gpu_expert_format = fmt if fmt in ("int4_g32", "int8_g32", "bf16", "fp32") else "bf16"

    @property
    def cpu_expert_bytes(self) -> int:
        return self.model.expert_bytes()

    @property
    def gpu_expert_bytes(self) -> int:
        return self.model.expert_bytes(self.gpu_expert_format)

    def costs(self, freq: np.ndarray, batch: int = 1, prefill: bool = False) -> LayerCosts:
        """freq [L, E]: per-token pick probability of each expert (Trace.frequencies()).
        Decode: `batch` sequences, one new token each, each at `kv_tokens` of context.
        prefill=True: one chunk of `batch` tokens of one prompt (the first: on average each
        token attends to batch / 2 earlier ones)."""
        m, mc = self.model, self.machine
        L = len(m.moe_layers)
        if freq.shape != (L, m.num_experts):
            raise ValueError(f"frequencies have shape {tuple(freq.shape)}, the model has "
                             f"[{L} MoE layers, {m.num_experts} experts]")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        p = np.clip(freq.astype(np.float64), 0.0, 1.0)
        touched = -np.expm1(batch * np.log1p(-np.minimum(p, 1 - 1e-12)))   # 1 - (1 - p)^B
        flops = m.expert_flops_per_token
        cpu_bw = mc.cpu_effective_gbps * GB
        gpu_bw = mc.gpu_mem_gbps * GB
        cpu = np.maximum(touched * self.cpu_expert_bytes / cpu_bw,
                         batch * p * flops / (mc.cpu_matmul_tops * 1e12))
        gpu = np.maximum(touched * self.gpu_expert_bytes / gpu_bw,
                         batch * p * flops / (mc.gpu_tflops * 1e12)) \
            + touched * mc.gpu_expert_overhead_us * 1e-6

        wb = m.device_bytes_per_param(self.device_weight_format)
        # A GGUF's blocks (CPU device) run in the expert engine's int8 kernels, not torch's matmuls.
        dev_tops = mc.cpu_matmul_tops if self.device_weight_format == "blocks" else mc.gpu_tflops

        def gpu_op(params: float, tokens: int) -> float:   # weights read once, or FLOP-bound
            return max(params * wb / gpu_bw, 2.0 * params * tokens / (dev_tops * 1e12))

        # Attention over the latent KV cache (MLA, absorbed form): every token reads ctx latent
        # rows of (kv_lora + rope) and does QK and AV over them in all heads.
        kv_row = m.kv_bytes_per_token / m.num_layers                        # bytes per layer
        ctx = batch / 2 if prefill else self.kv_tokens
        kv_read = (1 if prefill else batch) * ctx * kv_row / gpu_bw      # each sequence its own
        kv_flops = float(m.attention_flops_per_key) * ctx * batch
        kv_time = max(kv_read, kv_flops / (mc.gpu_tflops * 1e12))
        host = mc.layer_overhead_us * 1e-6
        attn = gpu_op(m.attention_params_per_layer + m.router_params_per_layer, batch) + kv_time
        shared = gpu_op(m.shared_params_per_layer, batch) if m.shared_experts else 0.0
        if mc.gpu_present:   # the shared expert runs beside the CPU experts
            serial, gpu_fix = np.full(L, attn + host), np.full(L, shared)
        else:                # MoELayer runs it before submitting the CPU experts
            serial, gpu_fix = np.full(L, attn + host + shared), np.zeros(L)
        # Hidden states to host and the CPU result back (bf16), over PCIe.
        cpu_fix = np.full(L, 2 * batch * m.hidden * 2 / (mc.pcie_gbps * GB))
        dense = m.num_dense_layers * (gpu_op(m.attention_params_per_layer, batch) + kv_time
                                      + gpu_op(m.dense_mlp_params, batch) + host)
        head = gpu_op(m.lm_head_params or m.embedding_params, batch)
        cache_fix = np.full(L, mc.gpu_cache_layer_us * 1e-6)
        return LayerCosts(cpu=cpu, gpu=gpu, cpu_fix=cpu_fix, gpu_fix=gpu_fix,
                          cache_fix=cache_fix, serial=serial,
                          sync=mc.sync_us * 1e-6, other=dense + head, batch=batch,
                          overlap=mc.overlaps)

    # ---- predictions -------------------------------------------------------------------------
    def decode_tok_s(self, freq: np.ndarray, mask: np.ndarray, batch: int = 1) -> float:
        c = self.costs(freq, batch)
        return batch / c.step_time(mask)

    def prefill(self, freq: np.ndarray, mask: np.ndarray, tokens: int | None = None) -> dict:
        """One prefill chunk of `tokens` (default prefill_chunk) and the mode that runs it: "cpu"
        (the CPU engine's GEMM path beside the cached experts, as in decode) or, when
        layerwise_prefill is on and it is faster, "layerwise" (every MoE layer's routed experts
        streamed to the GPU, double-buffered; layerwise_time). The runtime runs the mode named
        here (hybrid/runtime/layerwise.py asks prefill_mode)."""
        T = self.prefill_chunk if tokens is None else int(tokens)
        c = self.costs(freq, T, prefill=True)
        cpu = float(c.other + c.layer_times(mask).sum())
        out = {"chunk": T, "cpu_s": cpu, "tok_s_cpu": T / cpu}
        lw = self.layerwise_time(c) if self.layerwise_prefill else None
        if lw is not None:
            out.update(layerwise_s=lw, tok_s_layerwise=T / lw)
        mode = "layerwise" if lw is not None and lw < cpu else "cpu"
        out.update(mode=mode, tok_s=T / min(cpu, lw if lw is not None else cpu))
        return out

    def prefill_mode(self, freq: np.ndarray, mask: np.ndarray, tokens: int) -> str:
        """"cpu" or "layerwise": what runs a chunk of `tokens` (prefill()'s choice)."""
        return self.prefill(freq, mask, tokens)["mode"]

    def layerwise_time(self, c: LayerCosts) -> float:
        """Seconds of one chunk (LayerCosts of prefill=True) in layerwise mode, all but the
        dense layers and the head. Per MoE layer three stages run side by side, each on the
        next layer's experts while the one after it computes: the CPU copies the layer's packed
        experts (all E) from the mmapped file into pinned memory (a memcpy: read + write, half
        the RAM read rate), the PCIe copy and the device-side unpack into the kernel's layout
        (about 4 passes over the bytes at GPU memory speed), and the layer's compute (attention,
        the shared expert, every touched expert on the GPU). The slowest stage sets the pace;
        the first layer's copy is not hidden."""
        mc, E = self.machine, self.model.num_experts
        nbytes = E * self.cpu_expert_bytes
        fill = nbytes / (mc.cpu_read_gbps * GB / 2)
        copy = nbytes / (mc.pcie_gbps * GB) + 4 * nbytes / (mc.gpu_mem_gbps * GB)
        compute = c.serial + c.gpu_fix + c.gpu.sum(axis=1)                       # [L]
        stage = np.maximum(np.maximum(fill, copy), compute)
        return float(stage.sum() + fill + copy)

    def layerwise_threshold(self, freq: np.ndarray, mask: np.ndarray,
                            max_tokens: int = 1 << 20) -> int | None:
        """The smallest chunk (tokens) that prefill() runs layerwise, or None when none up to
        max_tokens does (or layerwise_prefill is off). The copy is fixed per chunk and the CPU's
        time grows with the tokens, so the chunks above it are layerwise too."""
        if not self.layerwise_prefill:
            return None

        def streamed(t: int) -> bool:
            return self.prefill_mode(freq, mask, t) == "layerwise"

        hi = 1
        while not streamed(hi):
            if hi >= max_tokens:
                return None
            hi = min(2 * hi, max_tokens)
        lo = hi // 2   # not streamed (or 0)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if streamed(mid) else (mid, hi)
        return hi

    def hit_rate(self, freq: np.ndarray, mask: np.ndarray) -> float:
        """Fraction of (token, expert) picks that land on a cached expert."""
        return float((freq * mask).sum() / freq.sum())

    def describe(self) -> dict:
        return {"gpu_expert_format": self.gpu_expert_format,
                "gpu_expert_bytes": self.gpu_expert_bytes,
                "cpu_expert_format": self.model.expert_format,
                "cpu_expert_bytes": self.cpu_expert_bytes,
                "device_weight_format": self.device_weight_format,
                "decode_predicted_at_context": self.kv_tokens,
                "prefill_chunk": self.prefill_chunk,
                "layerwise_prefill": self.layerwise_prefill}
