"""Load a checkpoint directory into a ready model: config, files, weight source, architecture.

Progress is shown per layer (tqdm on stderr) because a real checkpoint takes minutes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hybrid.config import ModelConfig
from hybrid.loaders.experts import ExpertLoader
from hybrid.loaders.safetensors_files import SafetensorsFiles
from hybrid.loaders.source import WeightSource


def load_model(path: str | Path, device="cpu", dtype=torch.bfloat16, *, experts_backend: str = "torch",
               expert_format: str | None = None, device_formats: dict[str, str] | None = None,
               packed_cache: bool = False, threads: int | None = None, mode: str = "fast",
               progress: bool = True, config: ModelConfig | None = None):
    """-> (config, model). See hybrid.api.load for what the options mean."""
    from hybrid.models import model_class

    path = Path(path)
    config = config or ModelConfig.from_dir(path)
    files = SafetensorsFiles(path)
    files.file_sizes_ok()
    # With no GPU the Python thread only waits while the experts run: it computes a share
    # (CpuMoE caller=), and hybrid.api gives the pool one worker fewer.
    experts = ExpertLoader(experts_backend, expert_format, threads=threads, mode=mode,
                           packed_cache=packed_cache, checkpoint_dir=path,
                           caller=torch.device(device).type == "cpu")
    src = WeightSource(config, files, device, dtype, device_formats, experts)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.num_hidden_layers, desc=f"loading {path.name}", unit="layer", leave=False)

    def step(done, total):
        if bar is not None:
            bar.update(1)

    try:
        model = model_class(config.model_type)(config, src, progress=step)
    finally:
        if bar is not None:
            bar.close()
    model.experts_loader = experts
    return config, model
