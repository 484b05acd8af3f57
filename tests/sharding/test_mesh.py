"""Mesh specs: parsing, -1 / auto resolution, errors, abstract meshes (no devices needed)."""

import pytest

from qwax.sharding import MESH_AXES, abstract_mesh, parse_mesh_spec
from qwax.sharding.mesh import mesh_sizes


def test_spec_lists_all_axes_in_mesh_order_with_missing_axes_of_size_1():
    sizes = parse_mesh_spec("expert=2,data=2,fsdp=2", num_devices=8)
    assert sizes == {"data": 2, "fsdp": 2, "expert": 2, "context": 1, "tensor": 1, "dcn": 1}
    assert MESH_AXES == ("data", "fsdp", "expert", "context", "tensor")


def test_minus_one_takes_the_remaining_devices():
    assert parse_mesh_spec("data=2,fsdp=-1,tensor=4", num_devices=512)["fsdp"] == 64


def test_auto_puts_every_device_on_fsdp():
    sizes = parse_mesh_spec("auto", num_devices=16)
    assert sizes["fsdp"] == 16 and sizes["data"] * sizes["expert"] * sizes["tensor"] == 1


@pytest.mark.parametrize("spec, message", [
    ("data=2,pipeline=2", "pipeline"),
    ("data=two", "not an integer"),
    ("data=2,data=2", "twice"),
    ("data=-1,fsdp=-1", "at most one"),
    ("data=3", "3 devices"),
    ("fsdp=0", ">= 1"),
])
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh_spec(spec, num_devices=8)


def test_abstract_mesh_for_a_pod_needs_no_devices():
    mesh = abstract_mesh("data=2,fsdp=32,expert=8")
    assert mesh.size == 512
    assert mesh_sizes(mesh) == {"data": 2, "fsdp": 32, "expert": 8, "context": 1, "tensor": 1}
