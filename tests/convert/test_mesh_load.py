"""Loading onto 8 simulated devices places every parameter sharded, reading only each device's rows.

The work runs in a subprocess: XLA_FLAGS must request 8 host devices before jax is imported, and the in-process
jax of the test session has exactly one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from qwax.convert import stream

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    from flax import nnx
    import qwax
    from qwax.convert import stream
    from qwax.convert.safetensors_io import CheckpointReader
    from qwax.sharding import make_mesh

    fused, orbax, out = sys.argv[1], sys.argv[2], sys.argv[3]
    assert jax.device_count() == 8
    mesh = make_mesh("fsdp=2,expert=4")

    # Record the largest read of any routed-expert tensor.
    reads = {"experts": 0}
    get, get_slice = CheckpointReader.get, CheckpointReader.get_slice
    def track(result, key):
        if ".mlp.experts." in key:
            reads["experts"] = max(reads["experts"], result.nbytes)
        return result
    CheckpointReader.get = lambda self, key: track(get(self, key), key)
    CheckpointReader.get_slice = lambda self, key, a, b: track(get_slice(self, key, a, b), key)

    reference = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(qwax.load_hf(fused), nnx.Param))}
    reads["experts"] = 0
    report = {}
    for name, load in (("load_hf", lambda: qwax.load_hf(fused, mesh=mesh, rules="fsdp_ep")),
                       ("load_orbax", lambda: stream.load_orbax(orbax, mesh=mesh, rules="fsdp_ep")),
                       ("load_orbax_unscanned", lambda: stream.load_orbax(orbax, mesh=mesh, rules="fsdp_ep",
                                                                          scan_layers=False))):
        model = load()
        params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        stacks = {}
        for path, variable in params.items():
            array = variable.get_value()
            if path[-1] in ("experts_gate_up", "experts_down"):
                full = array.size * array.dtype.itemsize
                per_device = max(s.data.size * s.data.dtype.itemsize for s in array.addressable_shards)
                stacks[".".join(map(str, path))] = [full, per_device, len(array.sharding.device_set)]
            if name != "load_orbax_unscanned":
                assert np.array_equal(np.asarray(array), reference[path]), (name, path)
        report[name] = {"stacks": stacks, "expert_read_bytes": reads["experts"]}
        reads["experts"] = 0
    with open(out, "w") as f:
        json.dump(report, f)
""")


@pytest.mark.multiprocess
def test_loading_onto_8_devices_never_materialises_a_whole_expert_stack(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("qwen3_5_moe_text")
    stream.convert_hf_to_hf(src, tmp_path / "fused", experts="fused")  # the published layout: [E, 2I, H] per layer
    stream.convert_hf_to_orbax(tmp_path / "fused", tmp_path / "orbax")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / "fused"), str(tmp_path / "orbax"),
                             str(tmp_path / "report.json")], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())

    # One layer's fused gate_up tensor: 8 experts x 64 x 64 float32.
    layer_stack = 8 * 64 * 64 * 4
    for name, entry in report.items():
        assert entry["stacks"], name
        for path, (full, per_device, devices) in entry["stacks"].items():
            assert devices == 8, (name, path)
            assert per_device * 8 == full, (name, path, full, per_device)  # experts over 4, embed over 2
    # A device's region of a stack needs 2 of the 8 experts: the safetensors reads never take a whole tensor.
    assert 0 < report["load_hf"]["expert_read_bytes"] <= layer_stack // 4
