"""Fast backends for :mod:`ul_fast.ops`.

Each module listed here registers implementations with :func:`ul_fast.ops.dispatch.register` when
imported; the dispatcher imports them lazily, once, and falls back to the reference with a warning if
one fails to load.
"""

BACKEND_MODULES: tuple[str, ...] = (
    "ul_fast.kernels.triton_attention",
    "ul_fast.kernels.triton_adaln",
    "ul_fast.kernels.compiled",
)
