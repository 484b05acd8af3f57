"""Which compiled Pallas kernel family the current devices can run, shared by every op's `impl="auto"`."""

from __future__ import annotations

import jax


def is_hopper() -> bool:
    """Whether the first device is a Hopper GPU (compute capability 9.x).

    qwax's Mosaic GPU kernels use warpgroup matmuls (wgmma), which older GPUs lack and Blackwell (10.x, tcgen05)
    does not run."""
    cc = str(getattr(jax.devices()[0], "compute_capability", ""))
    return cc.split(".")[0] == "9"


def pallas_platform() -> str | None:
    """"tpu" or "gpu" when the default backend runs qwax's compiled Pallas kernels (any TPU, a Hopper GPU), else
    None (the CPU, where Pallas only interprets, and other GPUs): `impl="auto"` then takes the XLA path."""
    platform = jax.default_backend()
    if platform == "tpu" or (platform == "gpu" and is_hopper()):
        return platform
    return None
