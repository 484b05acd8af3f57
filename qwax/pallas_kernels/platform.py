"""Which platform the ops run on, and which compiled Pallas kernel family it can run: the inputs of the one
implementation resolver (`dispatch.resolve_impl`)."""

from __future__ import annotations

import jax

PLATFORMS = ("cpu", "gpu", "tpu")


def current_platform() -> str:
    """The default backend's platform: "cpu", "gpu" or "tpu"."""
    return jax.default_backend()


def is_hopper() -> bool:
    """Whether the first device is a Hopper GPU (compute capability 9.x).

    qwax's Mosaic GPU kernels use warpgroup matmuls (wgmma), which older GPUs lack and Blackwell (10.x, tcgen05)
    does not run."""
    cc = str(getattr(jax.devices()[0], "compute_capability", ""))
    return cc.split(".")[0] == "9"


def pallas_platform(platform: str | None = None) -> str | None:
    """"tpu" or "gpu" when `platform` runs qwax's compiled Pallas kernels, else None (the CPU, where Pallas only
    interprets, and GPUs other than Hopper).

    platform: one of PLATFORMS, or None for the current devices (a GPU is then checked for Hopper). An explicit
    "gpu" describes a device that is not at hand, and is taken to be a Hopper GPU.
    """
    if platform is None:
        platform = current_platform()
        if platform == "gpu" and not is_hopper():
            return None
    elif platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r}: expected one of {PLATFORMS}, or None for the current devices")
    return platform if platform in ("tpu", "gpu") else None
