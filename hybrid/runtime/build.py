"""The one builder: a checkpoint directory (or a GGUF file) -> a ready network with its expert executors,
placement and online policy (DESIGN.md "Layers of the code": runtime).

    built = build_model(path, device, dtype, experts_backend="cpu", ...)
    built.config, built.network, built.online, built.stats()

Order: config (the architecture's own) -> facts -> memory check (refused with the numbers
before anything is read) -> thread split -> op set -> weight source + expert factory -> the
model file builds itself from the context -> placement (device experts) -> online policy.
Progress is shown per layer (tqdm on stderr) because a real checkpoint takes minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Built:
    config: object
    network: object
    facts: object
    ops: object
    experts: object          # the ExpertFactory that made the host executors
    online: object = None    # planner/online.py LiveReplacement, or None
    vision: object = None    # hybrid/models/vision.py Vision (image input), or None
    layerwise: object = None  # runtime/layerwise.py LayerwisePrefill, or None (off)
    device_formats: dict = None  # {group: format} the device linears were asked in

    def stats(self) -> dict:
        return {"ops": self.ops.name, "experts": dict(self.experts.stats),
                "device_weights": dict(self.device_formats or {})}


def build_model(path: str | Path, device="cpu", dtype=torch.bfloat16, *, experts_backend: str = "torch",
                expert_format: str | None = None, device_formats: dict[str, str] | None = None,
                packed_cache: bool = False, threads: int | None = None, progress: bool = True,
                max_len: int = 4096, max_vram: int | None = None, profile=None, online=None,
                device_ops: str | None = None, mode: str | None = None, config=None,
                split_threads: bool = True, images_enabled: bool = True,
                defer_experts: int = 0, layerwise_prefill="auto", gguf_file=None, mmproj=None) -> Built:
    """See hybrid.api.load for what the options mean. gguf_file: `path` already open as a
    GGUFFile (its metadata parsed once by the caller), else it is opened here."""
    from hybrid.loaders.gguf_file import GGUFFile, is_gguf_path
    from hybrid.loaders.gguf_source import GGUFSource
    from hybrid.loaders.safetensors_files import SafetensorsFiles
    from hybrid.loaders.source import WeightSource
    from hybrid.models import config_from_dir, model_class
    from hybrid.models.vision import checkpoint_vision_config
    from hybrid.ops import select_ops
    from hybrid.planner.device_memory import activation_bytes
    from hybrid.runtime import placement
    from hybrid.runtime.context import BuildContext
    from hybrid.runtime.expert_factory import ExpertLoader
    from hybrid.runtime.gguf_experts import GGUFExpertLoader
    from hybrid.runtime.memory import check_fits, itemsize
    from hybrid.runtime.threads import split_threads as split

    path, device = Path(path), torch.device(device)
    config = config or config_from_dir(path)
    cls = model_class(config.model_type)
    facts = cls.facts(config)
    if isinstance(defer_experts, bool) or not isinstance(defer_experts, int) or not 0 <= defer_experts < facts.top_k:
        raise ValueError(f"defer_experts must be an integer in 0..{facts.top_k - 1} (the model picks "
                         f"{facts.top_k} experts per token), got {defer_experts!r}")
    prof = placer = None
    gpu_expert_bytes = 0
    if profile is not None:
        if experts_backend != "cpu":
            raise ValueError("profile= caches experts on the device beside the CPU engine: it needs "
                             "experts_backend='cpu'")
        prof, spec = placement.load_checked_profile(profile, path, device, max_vram)
        placer = placement.online_placer(prof, spec, online)
        # What the planner counted (its gpu_expert_format); the built caches are checked below.
        gpu_expert_bytes = prof.num_cached * prof.bytes_per_expert
    gguf = is_gguf_path(path)  # a .gguf file (or the first of a split set): mapped, sizes checked
    files = (gguf_file or GGUFFile(path)) if gguf else SafetensorsFiles(path)
    # A GGUF holds the text model only: llama.cpp keeps the vision tower in its own mmproj file.
    mm = None
    if not images_enabled:
        vision_cfg = None
    elif gguf:
        mm, vision_cfg, mm_named = _mmproj(path, config, files, mmproj)
    else:
        if mmproj not in (None, "auto", False):
            raise ValueError(f"mmproj={mmproj}: an mmproj file goes with a GGUF text model; the checkpoint "
                             f"directory {path} carries its own vision tower")
        vision_cfg = checkpoint_vision_config(path, config, files)
    vision_params = 0
    if vision_cfg is not None:
        from hybrid.models.moonvit import MoonViT

        vision_params = MoonViT.parameter_count(vision_cfg)
    need = check_fits(facts, path, device, dtype, device_formats or {}, max_len=max_len, num_slots=1,
                      max_vram=max_vram, experts_on_device=(experts_backend == "torch"),
                      extra=gpu_expert_bytes, vision_params=vision_params)
    if experts_backend == "cpu" and split_threads:
        split(device, threads)

    ops = select_ops(device, dtype, device_ops)
    # With no GPU the Python thread only waits while the experts run: it computes a share
    # (CpuMoE caller=), and split_threads gives the pool one worker fewer.
    expert_kw = dict(threads=threads, mode=mode or ("precise" if dtype == torch.float32 else "fast"),
                     caller=device.type == "cpu")
    if gguf and not device_formats and device.type == "cpu" and ops.name == "native" and expert_kw["mode"] == "fast":
        # A GGUF on a CPU device (bf16, fast mode): its non-expert tensors run in their own blocks
        # (device_weights="blocks"), the bytes llama.cpp reads, not a 2-3.5x larger bf16 copy.
        from hybrid.models.facts import GROUPS

        device_formats = {g: "blocks" for g in GROUPS}
    if gguf:
        source = GGUFSource(config, files, device, dtype)
        experts = GGUFExpertLoader(experts_backend, expert_format, packed_cache=packed_cache, **expert_kw)
    else:
        files.file_sizes_ok()
        source = WeightSource(config, files, device, dtype)
        experts = ExpertLoader(experts_backend, expert_format, packed_cache=packed_cache, checkpoint_dir=path,
                               **expert_kw)
    ctx = BuildContext(source, ops, experts, device_formats)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.num_hidden_layers, desc=f"loading {path.name}", unit="layer", leave=False)

    def step(done, total):
        if bar is not None:
            bar.update(1)

    try:
        network = cls(config, ctx, progress=step)
    finally:
        if bar is not None:
            bar.close()
    vision = None
    if vision_cfg is not None:
        from hybrid.models.vision import Vision

        if mm is not None:
            vision = _mmproj_tower(mm, vision_cfg, mm_named, path, device, dtype)
        else:
            vision = Vision.load(path, files, vision_cfg, device, dtype)
    attach_deferral(network, defer_experts)
    live = None
    if prof is not None:
        held = placement.attach_device_experts(network, prof, device, dtype)
        if held > gpu_expert_bytes and (max_vram is not None or device.type == "cuda"):
            raise MemoryError(f"{profile}: the cached experts take {held} bytes on {device}, the "
                              f"profile counted {gpu_expert_bytes} ({prof.num_cached} x "
                              f"{prof.gpu_expert_format}); make the profile for these experts' "
                              f"format (hybrid plan --gpu-format)")
        if placer is not None:
            live = placement.attach_online(network, placer)

    def extra_activations(tokens: int) -> int:   # a long layerwise chunk's, beyond those counted
        return activation_bytes(facts, tokens, itemsize(dtype), device_formats) - need.activations

    layerwise = _layerwise(network, layerwise_prefill, path, device, dtype, prof, max_vram, need,
                           extra_activations)
    return Built(config, network, facts, ops, experts, live, vision, layerwise, ctx.formats)


def _layerwise(network, option, path: Path, device, dtype, prof, max_vram, need, extra_activations):
    """Layerwise prefill (hybrid/runtime/layerwise.py), or None. extra_activations(tokens): the
    device bytes a forward of `tokens` needs beyond the activations `need` counted."""
    from hybrid.runtime import layerwise as lw

    if option is False or (option == "auto" and torch.device(device).type != "cuda"):
        return None
    if path.suffix == ".gguf":
        if option is True:
            raise ValueError("layerwise_prefill=True: a GGUF's experts stay on the CPU path in prefill")
        return None
    from hybrid.config import read_config_json
    from hybrid.models.spec import spec_from_config

    raw, where = read_config_json(path)
    spec = spec_from_config(raw, model_id=path.name, where=where)
    mask = prof.mask(spec.moe_layers) if prof is not None else None
    return lw.attach_layerwise(network, option, device, dtype, lw.machine_for(prof, device),
                               lw.vram_left(device, max_vram, need), mask, spec, extra_activations)


def _mmproj(path: Path, config, g, option):
    """(MmprojFile, VisionConfig, named) of a GGUF model's vision tower file, or (None, None,
    False): no image input. A file the user named must fit the model (an error says why not);
    one only found beside the model that does not is skipped with a warning (_skip)."""
    from hybrid.models import moonvit_gguf as gguf_mmproj
    from hybrid.loaders.gguf_file import GGUFError

    found, named = gguf_mmproj.resolve(path, option)
    if found is None:
        return None, None, False
    mm = None
    try:
        mm = gguf_mmproj.MmprojFile(found)
        return mm, mm.vision_config(config.hidden_size, gguf_mmproj.placeholder_id(g)), named
    except GGUFError as e:
        if mm is not None:
            mm.close()
        if named:
            raise
        _skip(found, path, e)
        return None, None, False


def _mmproj_tower(mm, vc, named: bool, path: Path, device, dtype):
    """The Vision of an open mmproj file (closed after: the tower holds its own copies), or None
    when a file only found beside the model has a bad tensor (_skip)."""
    from hybrid.loaders.gguf_file import GGUFError
    from hybrid.models.vision import Vision

    try:
        return Vision.from_mmproj(mm, vc, device, dtype)
    except GGUFError as e:
        if named:
            raise
        _skip(mm.path, path, e)
        return None
    finally:
        mm.close()


def _skip(found: Path, model: Path, e: Exception) -> None:
    import warnings

    warnings.warn(f"not using {found.name} found beside {model.name} for image input: {e} (name a file "
                  "with mmproj= / --mmproj, or pass mmproj=False)")


def attach_deferral(network, k: int) -> None:
    """Expert deferral (hybrid/experts/moe_layer.py): every MoE layer but the last defers its k
    lowest-weight host picks to the next one; k = 0 turns it off."""
    layers = list(network.moe_layers().values())
    for moe in layers:
        moe.set_deferral(0)  # clears any previous setting
    if k == 0:
        return
    previous = None
    for moe in layers[:-1]:
        moe.set_deferral(k, moe.host_experts().twin(), previous)
        previous = moe
    if layers:
        layers[-1].set_deferral(0, None, previous)
