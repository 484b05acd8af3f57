"""Generation on a 2 x 4 simulated device mesh equals generation on one device (greedy tokens)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from flax import nnx
    import qwax
    from qwax.sharding.mesh import make_mesh

    assert len(jax.devices()) == 8
    cfg = qwax.get_preset("tiny-moe", num_hidden_layers=8, initializer_range=0.1)
    model = qwax.QwaxForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    single = qwax.generate(model, ids, attention_mask=mask, max_new_tokens=12)
    for spec, strategy in (("data=2,tensor=4", "fsdp_tp"), ("data=2,fsdp=4", "fsdp")):
        sharded = qwax.generate(model, ids, attention_mask=mask, max_new_tokens=12, mesh=make_mesh(spec),
                                rules=strategy)
        assert np.array_equal(sharded, single), (spec, sharded, single)
    print("OK")
""")


def test_generate_on_a_2x4_mesh_equals_one_device():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-4000:]
