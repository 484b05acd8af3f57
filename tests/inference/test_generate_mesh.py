"""Generation on 2 x 4 simulated device meshes equals generation on one device (greedy tokens), for plain text
generation and for MTP speculative decoding (parameters, main cache and MTP cache all on the mesh)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from flax import nnx
    import qwax
    from qwax.sharding.mesh import make_mesh

    assert len(jax.devices()) == 8
""")

TEXT = PRELUDE + textwrap.dedent("""
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

MTP = PRELUDE + textwrap.dedent("""
    from qwax.inference import speculative

    cfg = qwax.get_preset("tiny-moe", num_hidden_layers=8, initializer_range=0.1, mtp_num_hidden_layers=1)
    model = qwax.QwaxForCausalLM(cfg, rngs=nnx.Rngs(1))
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    plain = qwax.generate(model, ids, attention_mask=mask, max_new_tokens=14)
    calls = []

    def oracle(mtp_logits, generated):
        # Right on every other draft, so the mesh run takes both the accept and the rollback branch.
        calls.append(generated)
        right = plain[:, 20 + generated]
        return right if len(calls) % 2 else (right + 1) % cfg.vocab_size

    speculative._draft_tokens = oracle
    single_stats, sharded_stats = {}, {}
    single = speculative.generate_mtp(model, ids, attention_mask=mask, max_new_tokens=14, stats=single_stats)
    assert np.array_equal(single, plain), (single, plain)
    for spec, strategy in (("data=2,tensor=4", "fsdp_tp"), ("data=2,fsdp=4", "fsdp")):
        sharded_stats = {}
        sharded = speculative.generate_mtp(model, ids, attention_mask=mask, max_new_tokens=14,
                                           mesh=make_mesh(spec), rules=strategy, stats=sharded_stats)
        assert np.array_equal(sharded, plain), (spec, sharded, plain)
        assert 0 < sharded_stats["accepted"] < sharded_stats["drafts"], sharded_stats
        via_generate = qwax.generate(model, ids, attention_mask=mask, max_new_tokens=14, speculative="mtp",
                                     mesh=make_mesh(spec), rules=strategy)
        assert np.array_equal(via_generate, plain), (spec, via_generate, plain)
    print("OK")
""")


def run_with_8_devices(script: str) -> None:
    """Run `script` in a fresh interpreter that sees 8 simulated CPU devices; it must print OK."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_generate_on_a_2x4_mesh_equals_one_device():
    run_with_8_devices(TEXT)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_speculative_mtp_on_a_2x4_mesh_equals_one_device():
    run_with_8_devices(MTP)
