"""hybrid: CPU/GPU heterogeneous inference for giant Mixture-of-Experts models.

Nothing heavy happens at import: torch, the native extension and the model code are imported
only when a function that needs them is called.
"""

__version__ = "0.1.0"


def load(path=None, device=None, dtype=None, **options):
    """Load a checkpoint directory (None: the embedded demo model) and return a Model.

    See hybrid.api.load for the options.
    """
    from hybrid.api import load as _load

    return _load(path, device=device, dtype=dtype, **options)


__all__ = ["load", "__version__"]
