"""Load a model for a frontend: visible progress, and a clear message instead of a traceback.

Shared by `hybrid chat` and `hybrid serve`. Loading a real checkpoint takes seconds to minutes
(mmap, packing, moving weights to the GPU), so the user sees a spinner with the elapsed time
and, when the loader reports them, its steps.
"""

from __future__ import annotations

import sys
import time


def describe(path: str | None) -> str:
    return path if path else "the embedded demo model"


def load_model_or_explain(path: str | None, prog: str, **options):
    """hybrid.load(path) with progress on stderr; on failure print why and return None."""
    from rich.console import Console

    import hybrid

    console = Console(stderr=True, highlight=False)
    start = time.monotonic()
    what = describe(path)
    status = console.status(f"Loading {what}...", spinner="dots") if console.is_terminal else None

    def progress(message: str, *args, **kwargs) -> None:
        # Loaders report steps as text; show the latest one beside the elapsed time.
        text = f"Loading {what}: {message} ({time.monotonic() - start:.0f} s)"
        if status is not None:
            status.update(text)

    if status is not None:
        status.start()
    else:
        print(f"{prog}: loading {what}...", file=sys.stderr, flush=True)
    try:
        try:
            model = hybrid.load(path, progress=progress, **options)
        except TypeError as e:
            if "progress" not in str(e):
                raise
            model = hybrid.load(path, **options)  # a loader without progress reports
    except KeyboardInterrupt:
        if status is not None:
            status.stop()
        print(f"{prog}: loading interrupted", file=sys.stderr)
        return None
    except (OSError, ValueError, RuntimeError, MemoryError, KeyError, ImportError) as e:
        if status is not None:
            status.stop()
        print(f"{prog}: cannot load {what}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    if status is not None:
        status.stop()
    print(f"{prog}: loaded {what} in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
    return model
