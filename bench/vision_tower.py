"""Time of Kimi K2.5's vision tower (MoonViT + projector) per image on this machine, random weights.

    python bench/vision_tower.py                      # K2.5 size (27 x 1152, transformers' defaults), 1024x1024
    python bench/vision_tower.py --layers 4 --size 512  # smaller; the full-size time is extrapolated by FLOPs

The tower's dimensions are transformers' Kimi_K25VisionConfig defaults (the release's vt_* values);
the image is preprocessed by K2.5's own rule (1024x1024 -> 1036x1036, 74 x 74 patches, 1369 LLM
tokens). Weights are random, drawn straight into the compute dtype (no checkpoint on disk). Prints
the weights' memory, peak RSS, time per image, achieved GFLOP/s and, when run smaller than full
size, the full-size time at the same GFLOP/s.
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch


class RandomFiles:
    """What MoonViT reads a checkpoint through (name -> tensor), filled with seeded random
    values of the asked shape: weights ~ N(0, 1/fan_in), norms 1, biases 0."""

    path = "<random weights>"

    def __init__(self, dtype, seed: int = 0):
        self.dtype, self.g = dtype, torch.Generator().manual_seed(seed)

    def __contains__(self, name: str) -> bool:
        from hybrid.models.moonvit import RELEASE

        return name == RELEASE["pos"]

    def get(self, name, shape, dtypes=None):
        if name.endswith("bias"):
            return torch.zeros(shape, dtype=self.dtype)
        if "norm" in name:
            return torch.ones(shape, dtype=self.dtype)
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        return (torch.randn(shape, generator=self.g) / math.sqrt(fan_in)).to(self.dtype)


def flops(vc, n: int) -> float:
    """Multiply-adds x 2 of one image of n patches: linears of every block, attention (QK^T and
    PV), the patch embedding and the projector."""
    D, I, P, k = vc.hidden_size, vc.intermediate_size, vc.patch_size, vc.merge_area
    block = 2 * n * (4 * D * D + 2 * D * I) + 4 * n * n * D
    m = n // k
    return vc.num_layers * block + 2 * n * 3 * P * P * D + 2 * m * ((k * D) ** 2 + k * D * vc.text_hidden_size)


def main() -> None:
    from hybrid.models.moonvit import MoonViT
    from hybrid.models.moonvit_config import VisionConfig
    from hybrid.models.moonvit_images import ImageRule, prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None, help="tower layers (default: K2.5's 27)")
    ap.add_argument("--size", type=int, default=1024, help="square image side in pixels (default 1024)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs (default 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    full = VisionConfig.from_dict({"vision_config": {}}, text_hidden_size=7168)  # transformers' defaults
    raw = {"vision_config": {} if args.layers is None else {"vt_num_hidden_layers": args.layers}}
    vc = VisionConfig.from_dict(raw, text_hidden_size=7168)
    t0 = time.perf_counter()
    tower = MoonViT(vc, RandomFiles(dtype), "cpu", dtype)
    load_s = time.perf_counter() - t0
    weights = MoonViT.parameter_count(vc) * dtype.itemsize
    from PIL import Image

    rule = ImageRule.from_dict({})  # K2.5's media_proc_cfg
    pic = Image.new("RGB", (args.size, args.size), (120, 80, 200))
    image = prepare(pic, rule)
    n = image.pixels.shape[0]
    for _ in range(args.warmup):
        tower.encode(image.pixels, [image.grid])
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        out = tower.encode(image.pixels, [image.grid])[0]
        times.append(time.perf_counter() - t)
    best = min(times)
    f = flops(vc, n)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(f"tower: {vc.num_layers} layers x {vc.hidden_size} wide, {vc.num_heads} heads, MLP {vc.intermediate_size}, "
          f"{MoonViT.parameter_count(vc) / 1e6:.0f} M parameters ({weights / 2**20:.0f} MiB in {args.dtype}); "
          f"built in {load_s:.1f} s; torch threads {torch.get_num_threads()}")
    print(f"image {args.size}x{args.size} -> grid {image.grid[0]}x{image.grid[1]} = {n} patches -> "
          f"{out.shape[0]} tokens x {out.shape[1]}")
    print(f"time per image: {best:.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)}); "
          f"{f / 1e9:.0f} GFLOP -> {f / best / 1e9:.1f} GFLOP/s; peak RSS {rss:.0f} MiB")
    if vc.num_layers != full.num_layers or args.size != 1024:
        pf = ImageRule.from_dict({})
        big = prepare(Image.new("RGB", (1024, 1024)), pf).pixels.shape[0]
        ff = flops(full, big)
        print(f"K2.5 size, one 1024x1024 image: {ff / 1e9:.0f} GFLOP -> about {ff / (f / best):.1f} s at the "
              f"same GFLOP/s; weights {MoonViT.parameter_count(full) * dtype.itemsize / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
