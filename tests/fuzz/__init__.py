"""A seeded fuzz corpus for everything hybrid reads from outside: config.json, safetensors
headers and data, the shard index, packed layer files, GGUF files, the native boundary's
arguments and the HTTP request bodies (areas.py says what each area mutates and runs).

    python -m tests.fuzz --cases 10000           # before a release (about an hour on 2 cores)
    python -m tests.fuzz --cases 80 --seed 0     # what tests/test_fuzz.py runs in CI
    python -m tests.fuzz --area packed --index 17 --seed 0 -v   # one case again

Case i of area A under seed S is always the same input (random.Random(f"{S}:{A}:{i}")), so a
failure is reproduced by its three numbers. Each case runs in a forked child with an
address-space limit and a deadline (harness.py) and must end in a correct result or a clean
error naming what was wrong; a signal, a hang, or any other exception is a failure.
"""
