"""Fast backends for :mod:`ul_fast.ops`.

Each backend module exports ``KERNELS: dict[tuple[str, str], Kernel]``, keyed by ``(op, device type)``
(empty when the backend cannot run here: ``ul_fast._C`` not built, triton missing); :mod:`ul_fast.ops.dispatch`
imports the modules and merges their tables:

- :mod:`ul_fast.kernels.extension_ops`: the C++/CUDA extension ``ul_fast._C`` (noise, loss, log-SNR embedding),
  loaded by :mod:`ul_fast.kernels.extension_loader`;
- :mod:`ul_fast.kernels.triton_attention`, :mod:`ul_fast.kernels.triton_adaln`: Triton kernels for CUDA.

Kernels assume arguments that passed the checks in :mod:`ul_fast.ops`; their ``torch.ops.ul_fast.*`` entry
points check only what memory safety needs. This package never imports :mod:`ul_fast.ops`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


def any_valid_input(*args: object) -> bool:
    """The ``supports`` of a kernel that handles every input :mod:`ul_fast.ops` accepts."""
    return True


class Kernel(NamedTuple):
    """A fast implementation of one op on one device type.

    ``fn`` has the signature of the op's reference in :mod:`ul_fast.ops.reference`; ``supports`` takes the
    same arguments and says whether ``fn`` handles them (else the reference runs).
    """

    fn: Callable
    supports: Callable[..., bool] = any_valid_input
