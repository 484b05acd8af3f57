"""Device meshes from a short spec string: "data=2,fsdp=2,expert=2,tensor=1", "fsdp=-1" or "auto".

qwax meshes always carry the five axes of `MESH_AXES`, in that order (outermost first), so the rule tables can
name them whether or not a strategy uses them; an axis left out of the spec has size 1. Tensor parallelism is the
innermost axis because it communicates most (every layer, activations), data parallelism the outermost because it
communicates least (once per step, gradients). `context` splits the sequence (context parallelism,
qwax.sharding.context_parallel): it exchanges a state or KV blocks with its neighbours in every mixer layer, so
it sits inside the batch axes and outside tensor.

Several slices (TPU multislice, or several GPU hosts joined by a slower network): `dcn=N` in the spec says that
the devices form N slices joined by the data-centre network. The DCN factor multiplies the outermost axis named
by `dcn_axis` (default "data"), so the slow links only carry that axis' collectives; the device order within each
slice comes from `jax.experimental.mesh_utils.create_hybrid_device_mesh`. The mesh axis names do not change,
so the rule tables need no DCN entry.

All meshes use `AxisType.Auto` (GSPMD propagation from the parameter and input shardings), not explicit sharding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
# Axes over which the rows of a batch are split (context splits each row's tokens instead; tensor ranks share
# their tokens).
BATCH_AXES = ("data", "fsdp", "expert")


def parse_mesh_spec(spec: str | dict[str, int], num_devices: int | None = None) -> dict[str, int]:
    """"data=2,fsdp=-1" -> {"data": 2, "fsdp": N/2, "expert": 1, "context": 1, "tensor": 1, "dcn": 1}.

    One axis may be -1: it takes the devices the others leave. "auto" puts every device on fsdp (fully sharded
    data parallelism: the strategy that fits the largest model without changing the layers' math), and, when the
    devices span several slices, the slices on data. `num_devices` (default: all devices) checks the product and
    resolves -1 and "auto".
    """
    if isinstance(spec, dict):
        items = dict(spec)
    elif spec.strip() == "auto":
        if num_devices is None:
            num_devices = jax.device_count()
        slices = num_slices()
        return {"data": slices, "fsdp": num_devices // slices, "expert": 1, "context": 1, "tensor": 1, "dcn": slices}
    else:
        items = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in MESH_AXES + ("dcn",):
                raise ValueError(f"mesh spec entry {part!r}: expected NAME=SIZE with NAME in {MESH_AXES + ('dcn',)}")
            if name in items:
                raise ValueError(f"mesh spec {spec!r} names axis {name!r} twice")
            try:
                items[name] = int(value)
            except ValueError:
                raise ValueError(f"mesh spec entry {part!r}: size {value!r} is not an integer") from None
    sizes = {name: int(items.get(name, 1)) for name in MESH_AXES}
    dcn = int(items.get("dcn", 1))
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh spec {spec!r}: at most one axis may be -1, got {free}")
    bad = {name: size for name, size in {**sizes, "dcn": dcn}.items() if size < 1 and name not in free}
    if bad:
        raise ValueError(f"mesh spec {spec!r}: axis sizes must be >= 1 (or one -1), got {bad}")
    if free:
        if num_devices is None:
            num_devices = jax.device_count()
        known = math.prod(s for s in sizes.values() if s != -1)
        if num_devices % known:
            raise ValueError(f"mesh spec {spec!r}: {num_devices} devices are not a multiple of the other axes ({known})")
        sizes[free[0]] = num_devices // known
    if num_devices is not None and math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh spec {spec!r} has {math.prod(sizes.values())} devices, but there are {num_devices}")
    return {**sizes, "dcn": dcn}


def num_slices(devices: Sequence[jax.Device] | None = None) -> int:
    """Number of distinct slices (`device.slice_index`) among the devices; 1 where the attribute is missing."""
    devices = jax.devices() if devices is None else devices
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(spec: str | dict[str, int] = "auto", devices: Sequence[jax.Device] | None = None,
              dcn_axis: str = "data") -> Mesh:
    """A `Mesh` with axes MESH_AXES over `devices` (default: all devices of all processes).

    With `dcn=N` in the spec (or several slices detected by "auto"), axis `dcn_axis` is split as N slices x
    (size / N) devices within a slice, slice-major, through `create_hybrid_device_mesh`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    dcn = sizes["dcn"]
    if dcn > 1:
        if dcn_axis not in MESH_AXES:
            raise ValueError(f"dcn_axis {dcn_axis!r}: expected one of {MESH_AXES}")
        if sizes[dcn_axis] % dcn:
            raise ValueError(f"mesh spec {spec!r}: axis {dcn_axis}={sizes[dcn_axis]} is not divisible by dcn={dcn}")
        ici = tuple(s // dcn if a == dcn_axis else s for a, s in zip(MESH_AXES, shape))
        dcn_shape = tuple(dcn if a == dcn_axis else 1 for a in MESH_AXES)
        if num_slices(devices) == dcn:
            grid = _hybrid_mesh(ici, dcn_shape, devices)
        else:  # simulated slices (tests, CPU): consecutive device blocks stand for slices
            grid = np.asarray(devices).reshape(shape)
    else:
        try:
            from jax.experimental import mesh_utils
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _hybrid_mesh(ici: tuple[int, ...], dcn: tuple[int, ...], devices: list[jax.Device]) -> np.ndarray:
    from jax.experimental import mesh_utils
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)


def abstract_mesh(spec: str | dict[str, int], num_devices: int | None = None) -> AbstractMesh:
    """A device-free `AbstractMesh` of the spec (for planning pods from one CPU). "auto" needs num_devices."""
    if isinstance(spec, str) and spec.strip() == "auto" and num_devices is None:
        raise ValueError("an abstract 'auto' mesh needs num_devices")
    sizes = parse_mesh_spec(spec, num_devices)
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_sizes(mesh: Mesh | AbstractMesh) -> dict[str, int]:
    """{axis name: size} of a concrete or abstract mesh."""
    return dict(zip(mesh.axis_names, mesh.axis_sizes))
