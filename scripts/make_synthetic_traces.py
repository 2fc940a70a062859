"""Write synthetic routing traces (K2.5-shaped by default), labelled synthetic everywhere.

    python scripts/make_synthetic_traces.py --out traces/k25_synth.safetensors \
        [--model kimi-k2.5] [--tokens 100000] [--zipf-first 0.6] [--zipf-last 1.0] \
        [--drift-every 0] [--drift-fraction 0.0] [--seed 0] [--counts-only]

How the picks are drawn (Zipf per layer, optional drift) is in hybrid/planner/synthetic.py and
is written into the trace's source string and notes.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--out", required=True, help="trace file to write (.safetensors)")
    ap.add_argument("--model", default="kimi-k2.5", help="checkpoint dir, config.json, or kimi-k2.5")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--zipf-first", type=float, default=0.6, help="exponent, first MoE layer")
    ap.add_argument("--zipf-last", type=float, default=1.0, help="exponent, last MoE layer")
    ap.add_argument("--drift-every", type=int, default=0, help="tokens between ranking changes")
    ap.add_argument("--drift-fraction", type=float, default=0.0,
                    help="transpositions per change, as a fraction of the experts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--counts-only", action="store_true", help="do not keep the token sequence")
    a = ap.parse_args(argv)

    from tqdm import tqdm

    from hybrid.planner import trace as traces
    from hybrid.models.spec import load_model_spec
    from hybrid.planner.synthetic import make_trace

    try:
        model = load_model_spec(a.model)
        bar = tqdm(total=a.tokens, unit="tok", desc="sampling")
        state = {"done": 0}

        def progress(done):
            bar.update(done - state["done"])
            state["done"] = done

        tr = make_trace(model, a.tokens, a.zipf_first, a.zipf_last, a.drift_every,
                        a.drift_fraction, a.seed, keep_sequence=not a.counts_only,
                        progress=progress)
        bar.close()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    traces.save(tr, a.out)
    print(f"wrote {a.out}: {tr.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
