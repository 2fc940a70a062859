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

    def stats(self) -> dict:
        return {"ops": self.ops.name, "experts": dict(self.experts.stats)}


def build_model(path: str | Path, device="cpu", dtype=torch.bfloat16, *, experts_backend: str = "torch",
                expert_format: str | None = None, device_formats: dict[str, str] | None = None,
                packed_cache: bool = False, threads: int | None = None, progress: bool = True,
                max_len: int = 4096, max_vram: int | None = None, profile=None, online=None,
                device_ops: str | None = None, mode: str | None = None, config=None,
                split_threads: bool = True) -> Built:
    """See hybrid.api.load for what the options mean."""
    from hybrid.loaders.gguf_file import GGUFFile, is_gguf_path
    from hybrid.loaders.gguf_source import GGUFSource
    from hybrid.loaders.safetensors_files import SafetensorsFiles
    from hybrid.loaders.source import WeightSource
    from hybrid.models import config_from_dir, model_class
    from hybrid.ops import select_ops
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
    prof = placer = None
    gpu_expert_bytes = 0
    if profile is not None:
        if experts_backend != "cpu":
            raise ValueError("profile= caches experts on the device beside the CPU engine: it needs "
                             "experts_backend='cpu'")
        prof, spec = placement.load_checked_profile(profile, path, device, max_vram)
        placer = placement.online_placer(prof, spec, online)
        gpu_expert_bytes = prof.num_cached * facts.expert_params * itemsize(dtype)
    check_fits(facts, path, device, dtype, device_formats or {}, max_len=max_len, num_slots=1,
               max_vram=max_vram, experts_on_device=(experts_backend == "torch"), extra=gpu_expert_bytes)
    if experts_backend == "cpu" and split_threads:
        split(device, threads)

    ops = select_ops(device, dtype, device_ops)
    # With no GPU the Python thread only waits while the experts run: it computes a share
    # (CpuMoE caller=), and split_threads gives the pool one worker fewer.
    expert_kw = dict(threads=threads, mode=mode or ("precise" if dtype == torch.float32 else "fast"),
                     caller=device.type == "cpu")
    if is_gguf_path(path):  # a .gguf file (or the first of a split set): mapped, sizes checked
        files = GGUFFile(path)
        source = GGUFSource(config, files, device, dtype)
        experts = GGUFExpertLoader(experts_backend, expert_format, packed_cache=packed_cache, **expert_kw)
    else:
        files = SafetensorsFiles(path)
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
    live = None
    if prof is not None:
        placement.attach_device_experts(network, prof, device, dtype)
        if placer is not None:
            live = placement.attach_online(network, placer)
    return Built(config, network, facts, ops, experts, live)
