"""bench/gpu_check.py's rows for layerwise prefill and CPU/GPU overlap (run from there, or alone:
`python bench/gpu_check_layerwise.py [--dry-run]`).

layerwise_rows(model, tokens)   a model loaded with layerwise_prefill=True: per chunk size, the
    cost model's mode and tok/s for each mode (LayerwisePrefill.predict), the measured tok/s of
    each mode (the same chunk forced through streaming() and through the CPU path), and the
    layerwise logits against the CPU path's (rel_err, top1).
stream_layer(E, H, I, T, layers)   the streamer alone at K2.5 width (H 7168, I 2048; E experts of
    random INT4, the same packed layer as each of `layers` MoE layers): seconds per layer measured
    (begin, then acquire -> grouped kernel -> release per layer, one synchronize at the end) vs the
    cost model's stage times (pinned fill, PCIe + unpack, compute), and the streamed GB/s.
overlap(model, fraction, tokens)   overlap efficiency of the first MoE layer = CPU expert time
    hidden under GPU work / CPU expert time, with `fraction` of its experts cached:
      t_layer  the whole MoELayer call (synchronized)          t_cpu  the host job alone
      t_dev    shared expert + cached experts alone            t_serial  router + host copies
      hidden = t_serial + t_cpu + t_dev - t_layer (clamped to [0, t_cpu]); efficiency = hidden / t_cpu
    (at most min(t_dev, t_cpu) / t_cpu: the GPU work bounds what can hide the CPU's).

Legend: E experts, H hidden, I expert width, T tokens.
"""

from __future__ import annotations

import time

import torch


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, reps: int) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


@torch.inference_mode()
def layerwise_rows(model, tokens=(512, 2048), timed: bool = True) -> list[dict]:
    from hybrid.experts.layer_stream import streaming

    lw = model.layerwise()
    if lw is None:
        return []
    moes = list(model.moe_layers().values())
    dev = model.device
    rows = []
    for T in tokens:
        ids = torch.tensor([3 + (i * 7) % 1000 for i in range(T)], device=dev) % model.config.vocab_size
        pos = torch.arange(T, device=dev)

        def run(stream: bool):
            cache = model.make_cache(1, T)
            if stream:
                with streaming(moes, lw.streamer):
                    return model.network.forward(ids, pos, torch.zeros_like(pos), cache)
            return model.network.forward(ids, pos, torch.zeros_like(pos), cache)

        got, ref = run(True).float(), run(False).float()
        pred = lw.predict(T)
        rows.append({"tokens": T, "dtype": str(model.dtype).removeprefix("torch."),
                     "mode": pred["mode"], "threshold": lw.threshold,
                     "predicted_tok_s_cpu": pred["tok_s_cpu"],
                     "predicted_tok_s_layerwise": pred["tok_s_layerwise"],
                     "tok_s_cpu": T / _timed(lambda: run(False), dev, 2) if timed else None,
                     "tok_s_layerwise": T / _timed(lambda: run(True), dev, 2) if timed else None,
                     "rel_err": float((got - ref).abs().max() / ref.abs().max()),
                     "top1": float((got.argmax(-1) == ref.argmax(-1)).float().mean())})
    return rows


def _int4_layer(E: int, H: int, I: int, seed: int = 0):
    """A packed INT4 layer of E copies of one random expert (fast to make at K2.5 width)."""
    from hybrid.experts.cpu_moe import PackedLayer

    g = torch.Generator().manual_seed(seed)

    def mat(n, k):
        return (torch.randint(-2**31, 2**31 - 1, (n, k // 8), generator=g, dtype=torch.int32),
                (torch.rand(n, k // 32, generator=g) * 1e-3 + 1e-3).to(torch.bfloat16))

    (gq, gs), (uq, us), (dq, ds) = mat(I, H), mat(I, H), mat(H, I)
    return PackedLayer.from_compressed_int4([gq] * E, [gs] * E, [uq] * E, [us] * E, [dq] * E, [ds] * E)


@torch.inference_mode()
def stream_layer(device, E=64, H=7168, I=2048, T=4096, layers=4, machine=None) -> dict:
    import numpy as np

    from hybrid.experts.layer_stream import LayerStreamer
    from hybrid.planner.cost import CostModel
    from hybrid.planner.model_spec import ModelSpec
    from hybrid.runtime.layerwise import machine_for

    packed = _int4_layer(E, H, I)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    st = LayerStreamer([packed] * layers, device, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    ids = torch.randint(0, E, (T, 8), generator=g).to(device)
    w = torch.rand(T, 8, generator=g).to(device)

    def chunk():
        st.begin()
        for j in range(layers):
            ex = st.executor(j)
            ex.submit(x, ids, w)
            ex.sync()

    sec = _timed(chunk, device, 2) / layers
    spec = ModelSpec("stream-check", H, 4 * I, I, E, 8, 0, layers, tuple(range(layers)))
    m = machine or machine_for(None, device)   # on CUDA: the measured H2D rate
    cost = CostModel(spec, m, layerwise_prefill=True)
    c = cost.costs(np.full((layers, E), 8 / E), T, prefill=True)
    nbytes = E * cost.cpu_expert_bytes
    return {"experts": E, "hidden": H, "intermediate": I, "tokens": T, "layers": layers,
            "layer_bytes": nbytes, "s_per_layer": sec, "streamed_gbps": nbytes / sec / 1e9,
            "predicted_s_per_layer": cost.layerwise_time(c) / layers,
            "machine_pcie_gbps": m.pcie_gbps}


@torch.inference_mode()
def overlap(model, fraction: float = 0.25, tokens: int = 1, reps: int = 20) -> dict:
    from hybrid.experts.gpu_cache import GpuExpertCache

    moe = next(iter(model.moe_layers().values()))
    host = moe.host_experts()
    E = host.num_experts
    n = int(E * fraction)
    cache = GpuExpertCache.from_packed(host, list(range(n)), model.device, model.dtype) if n else None
    moe.set_device_experts(cache)
    dev = model.device
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, model.config.hidden_size, generator=g).to(dev, model.dtype)
    ids, w = moe.router(x)
    xh, idsh, wh = x.cpu(), ids.cpu().int(), w.cpu().float()
    skip = cache.held_mask() if cache is not None else None

    def cpu_job():
        host.submit(xh, idsh, wh, skip)
        host.sync()

    def dev_work():
        if moe.shared is not None:
            moe.shared(x)
        if cache is not None:
            cache.submit(x, ids, w)
            cache.sync()

    def serial():
        i, ww = moe.router(x)
        i.cpu(), ww.cpu(), x.cpu()

    t = {"t_layer": _timed(lambda: moe(x), dev, reps), "t_cpu": _timed(cpu_job, dev, reps),
         "t_dev": _timed(dev_work, dev, reps), "t_serial": _timed(serial, dev, reps)}
    moe.set_device_experts(None)
    hidden = min(max(0.0, t["t_serial"] + t["t_cpu"] + t["t_dev"] - t["t_layer"]), t["t_cpu"])
    return {"cache_fraction": fraction, "tokens": tokens, **t, "hidden": hidden,
            "efficiency": hidden / t["t_cpu"] if t["t_cpu"] > 0 else 0.0,
            "bound": min(t["t_dev"], t["t_cpu"]) / t["t_cpu"] if t["t_cpu"] > 0 else 0.0}


def check(path, device, dry_run: bool, log=print) -> dict:
    """The three measurements on the checkpoint at `path` (None: the demo model)."""
    import hybrid

    def load(dtype):
        return hybrid.load(path, device=device, dtype=dtype, progress=False, max_len=4096,
                           decode_steps="eager", layerwise_prefill=True,
                           device_ops="torch" if device == "cpu" else None)

    model = load(torch.float32)   # the correctness row: the same math in another order
    rows = layerwise_rows(model, (256,), timed=False)
    del model
    model = load(torch.bfloat16)  # what runs: timed rows, overlap
    out = {"threshold": model.layerwise().threshold,
           "layerwise": rows + layerwise_rows(model, (64, 256) if dry_run else (512, 2048)),
           "overlap": [overlap(model, f, b) for f in (0.0, 0.25) for b in (1, 4)]}
    out["ok"] = all(r["rel_err"] <= 1e-3 for r in rows)
    log(f"  layerwise: threshold {out['threshold']}, "
        + ", ".join(f"{r['dtype']} {r['tokens']} tok: rel_err {r['rel_err']:.1e}"
                    + (f", {r['tok_s_layerwise']:.0f} tok/s streamed" if r["tok_s_layerwise"] else "")
                    for r in out["layerwise"]))
    del model
    shape = dict(E=8, H=256, I=128, T=64) if dry_run else dict(E=64, H=7168, I=2048, T=4096)
    out["stream_layer"] = stream_layer(device, **shape)
    s = out["stream_layer"]
    log(f"  stream layer E={s['experts']} H={s['hidden']}: {s['s_per_layer'] * 1e3:.1f} ms/layer, "
        f"{s['streamed_gbps']:.1f} GB/s (predicted {s['predicted_s_per_layer'] * 1e3:.1f} ms)")
    return out


def table(r: dict) -> str:
    def num(v):
        return "-" if v is None else f"{v:.0f}"

    lines = [f"layerwise prefill (threshold {r['threshold']} tokens):",
             "| dtype | tokens | mode chosen | pred tok/s cpu | pred tok/s layerwise | tok/s cpu | "
             "tok/s layerwise | rel_err | top1 |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["layerwise"]:
        lines.append(f"| {x['dtype']} | {x['tokens']} | {x['mode']} | {x['predicted_tok_s_cpu']:.0f} | "
                     f"{x['predicted_tok_s_layerwise']:.0f} | {num(x['tok_s_cpu'])} | "
                     f"{num(x['tok_s_layerwise'])} | {x['rel_err']:.2e} | {x['top1']:.2f} |")
    s = r["stream_layer"]
    lines += ["", f"stream one layer (E={s['experts']}, H={s['hidden']}, I={s['intermediate']}, "
                  f"T={s['tokens']}): {s['s_per_layer'] * 1e3:.2f} ms/layer measured, "
                  f"{s['predicted_s_per_layer'] * 1e3:.2f} ms predicted (PCIe {s['machine_pcie_gbps']:.1f} GB/s), "
                  f"{s['streamed_gbps']:.1f} GB/s streamed",
              "", "| overlap: cache | B | t_layer ms | t_cpu ms | t_dev ms | efficiency | bound |",
              "|---|---|---|---|---|---|---|"]
    for o in r["overlap"]:
        lines.append(f"| {o['cache_fraction']:.0%} | {o['tokens']} | {o['t_layer'] * 1e3:.3f} | "
                     f"{o['t_cpu'] * 1e3:.3f} | {o['t_dev'] * 1e3:.3f} | {o['efficiency']:.2f} | {o['bound']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    dev = "cpu" if a.dry_run else "cuda"
    print(table(check(None, dev, a.dry_run)))
