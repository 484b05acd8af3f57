"""One script for a real accelerator: every Pallas kernel against its reference, timed against the XLA path, then
a tiny model's forward, train step and decode on the device compared with the CPU.

    python benchmarks/device_check.py                 # on a GPU or TPU host: real sizes (under 5 minutes on an H100)
    python benchmarks/device_check.py --size tiny     # anywhere; on the CPU the kernels run in interpret mode
    python benchmarks/device_check.py --json out.json # also write every row as JSON

Kernels (the family follows the backend: Mosaic GPU kernels on a GPU, Mosaic TPU kernels on a TPU; on the CPU
`--family gpu|tpu` picks which one runs in interpret mode):
  * gated delta rule, chunked forward and backward (`impl="pallas"`), against the per-token reference (values)
    and the XLA chunked path (gradients of every input, initial state included);
  * gated delta rule decode step, against the jnp step;
  * grouped matmul and tgmm, against the dense reference (values and gradients).
Each is timed against the XLA path of the same op (median of `--repeats` runs after a warm-up) and reported as
GFLOP/s and GB/s, with the fraction of the device's published peak bf16 FLOP/s and HBM bandwidth. The GDN kernels
compute in float32, so a fraction of the bf16 peak is an upper bound on what they could reach.

Model: a tiny Qwen3.5-MoE-shaped model with `impl="auto"` kernels on the device (Pallas on TPU/GPU) and the XLA
path on the CPU, the same parameters: logits, one AdamW train step (loss and gradient norm), and 8 greedy tokens.
The model computes in float32, so on a GPU its routed experts take the XLA path (`ragged_dot`: the Mosaic GPU
grouped matmul takes bf16/f16 only; it is checked above as an op). On the CPU the "device" model runs the GDN
Pallas kernels in interpret mode and the MoE on XLA (interpret-mode megablox would take minutes). Exit status 1 if
any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from qwax.pallas_kernels import gated_delta_rule, gated_delta_rule_step, grouped_matmul, tgmm
from qwax.train.metrics import peak_flops

# Published HBM bandwidth (bytes/s) per JAX device, matched in this order against `device.device_kind`.
PUBLISHED_BANDWIDTH = (
    ("TPU v4", 1.2e12), ("TPU v5 lite", 8.19e11), ("TPU v5", 2.765e12), ("TPU v6 lite", 1.64e12),
    ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H200", 4.8e12), ("A100", 2.0e12), ("B200", 8.0e12),
)

SIZES = {
    # GDN: B, L, Hk, Hv, dk, dv; decode batch; gmm: M rows, K, N, G groups.
    "tiny": dict(gdn=(1, 128, 1, 2, 64, 64), decode_b=2, gmm=(256, 128, 128, 4)),
    "full": dict(gdn=(2, 4096, 8, 16, 128, 128), decode_b=64, gmm=(16384, 2048, 1024, 64)),
}


@dataclass
class Row:
    name: str
    ok: bool
    max_err: float
    tol: float
    ms_pallas: float | None = None
    ms_xla: float | None = None
    flops: float | None = None
    bytes: float | None = None


def time_ms(fn: Callable, *args, repeats: int) -> float:
    """Median wall time of `fn(*args)` in ms after one warm-up call (compile)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def max_rel_err(got: Any, want: Any) -> float:
    """max |got - want| / max(1, max |want|) over the leaves of two pytrees, in float32 on the host."""
    errs = [float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
            / max(1.0, float(np.max(np.abs(np.asarray(b, np.float32)))))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    return max(errs)


def compare(name: str, make: Callable[[dict], Callable], args: tuple, *, pallas: dict, oracle: dict, tol: float,
            repeats: int, flops: float, nbytes: float) -> Row:
    """One row: `make(impl kwargs)` -> a jitted function of `args`; Pallas against `oracle` (values), timed against
    the XLA path."""
    f_pallas, f_oracle, f_xla = make(pallas), make(oracle), make(dict(impl="xla"))
    err = max_rel_err(f_pallas(*args), f_oracle(*args))
    return Row(name, err <= tol, err, tol, time_ms(f_pallas, *args, repeats=repeats),
               time_ms(f_xla, *args, repeats=repeats), flops, nbytes)


def gdn_inputs(b: int, l: int, hk: int, hv: int, dk: int, dv: int, dtype) -> tuple:
    keys = jax.random.split(jax.random.key(0), 7)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(jax.random.normal(keys[0], (b, l, hk, dk))).astype(dtype)
    k = unit(jax.random.normal(keys[1], (b, l, hk, dk))).astype(dtype)
    v = jax.random.normal(keys[2], (b, l, hv, dv)).astype(dtype)
    g = -jax.nn.softplus(jax.random.normal(keys[3], (b, l, hv)))
    beta = jax.nn.sigmoid(jax.random.normal(keys[4], (b, l, hv)))
    s0 = 0.1 * jax.random.normal(keys[5], (b, hv, dk, dv))
    return q, k, v, g, beta, s0


def check_gdn(size: dict, family: str, dtype, repeats: int) -> list[Row]:
    b, l, hk, hv, dk, dv = size["gdn"]
    q, k, v, g, beta, s0 = gdn_inputs(b, l, hk, hv, dk, dv, dtype)
    pallas = dict(impl="pallas", backend=family)  # interpret=None: interpret mode on the CPU only

    def fwd(impl_kw):
        return jax.jit(lambda *a: gated_delta_rule(*a[:5], initial_state=a[5], **impl_kw))

    def loss(impl_kw):
        def f(q, k, v, g, beta, s0):
            o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, **impl_kw)
            return jnp.sum(o.astype(jnp.float32) * jnp.cos(o.astype(jnp.float32))) + jnp.sum(s * s)
        return jax.jit(jax.grad(f, argnums=tuple(range(6))))

    args = (q, k, v, g, beta, s0)
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3
    itemsize = jnp.dtype(dtype).itemsize
    c = 64
    flops = b * l * hv * (3 * 2 * dk * dv + 2 * c * (3 * dk + 2 * dv))
    io = b * l * (2 * hk * dk + 2 * hv * dv) * itemsize + b * hv * dk * dv * 4 * 2
    common = dict(pallas=pallas, repeats=repeats)
    rows = [compare("gdn forward", fwd, args, oracle=dict(impl="reference"), tol=tol, flops=flops, nbytes=io,
                    **common),
            compare("gdn forward+backward", loss, args, oracle=dict(impl="xla"), tol=5 * tol, flops=3 * flops,
                    nbytes=3 * io, **common)]

    bd = size["decode_b"]
    qd, kd, vd, gd, bed = (x[:, 0] for x in gdn_inputs(bd, 1, hk, hv, dk, dv, dtype)[:5])
    sd = 0.1 * jax.random.normal(jax.random.key(1), (bd, hv, dk, dv))
    step = lambda kw: jax.jit(lambda *a: gated_delta_rule_step(*a, **kw))  # noqa: E731
    rows.append(compare("gdn decode step", step, (qd, kd, vd, gd, bed, sd), oracle=dict(impl="xla"), tol=tol,
                        flops=bd * hv * 6 * dk * dv, nbytes=bd * hv * dk * dv * 4 * 2, **common))
    return rows


def check_moe(size: dict, family: str, dtype, repeats: int) -> list[Row]:
    m, kdim, n, groups = size["gmm"]
    keys = jax.random.split(jax.random.key(2), 4)
    # Ragged groups with one empty group, rows past the sum left over (as routed experts with capacity give).
    weights = np.random.default_rng(0).dirichlet(np.ones(groups))
    sizes = np.floor(weights * (m - m // 8)).astype(np.int32)
    sizes[groups // 2] = 0
    group_sizes = jnp.asarray(sizes)
    lhs = jax.random.normal(keys[0], (m, kdim)).astype(dtype)
    rhs = (jax.random.normal(keys[1], (groups, kdim, n)) * kdim**-0.5).astype(dtype)
    grad = jax.random.normal(keys[2], (m, n)).astype(dtype)
    pallas = dict(impl="pallas", backend=family)  # interpret=None: interpret mode on the CPU only
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-3
    itemsize = jnp.dtype(dtype).itemsize
    used = float(sizes.sum())
    common = dict(pallas=pallas, oracle=dict(impl="reference"), tol=tol, repeats=repeats)
    gmm = lambda kw: jax.jit(lambda a, b, s: grouped_matmul(a, b, s, **kw))  # noqa: E731
    t = lambda kw: jax.jit(lambda a, b, s: tgmm(a, b, s, **kw))  # noqa: E731

    def vjp(kw):
        def f(a, b):
            return jnp.sum(grouped_matmul(a, b, group_sizes, **kw).astype(jnp.float32) * grad.astype(jnp.float32))
        return jax.jit(jax.grad(f, argnums=(0, 1)))

    io = (m * kdim + groups * kdim * n + m * n) * itemsize  # each op reads two of these and writes the third
    return [compare("grouped matmul", gmm, (lhs, rhs, group_sizes), flops=2 * used * kdim * n, nbytes=io, **common),
            compare("tgmm", t, (lhs, grad, group_sizes), flops=2 * used * kdim * n, nbytes=io, **common),
            compare("grouped matmul gradients", vjp, (lhs, rhs), flops=4 * used * kdim * n, nbytes=2 * io,
                    **common)]


def check_model(device_impl: dict) -> list[Row]:
    """A tiny model on the default device (`device_impl` kernels) against the same parameters on the CPU (XLA)."""
    import optax
    from flax import nnx

    import qwax
    from qwax.train.step import LossWeights, make_train_step

    small = dict(hidden_size=64, num_hidden_layers=4, full_attention_interval=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=64, linear_value_head_dim=64, num_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=64, shared_expert_intermediate_size=64, mrope_section=(3, 3, 2),
                 vocab_size=512)
    cpu = jax.devices("cpu")[0]
    accel = jax.devices()[0]
    with jax.default_device(cpu):
        cpu_model = qwax.QwaxForCausalLM(qwax.get_preset("tiny-moe", **small),
                                         qwax.RunOptions(gdn_impl="xla", moe_impl="xla"), rngs=nnx.Rngs(0))
    dev_model = qwax.QwaxForCausalLM(qwax.get_preset("tiny-moe", **small), qwax.RunOptions(**device_impl),
                                     rngs=nnx.Rngs(0))
    nnx.update(dev_model, jax.device_put(nnx.state(cpu_model), accel))

    rng = np.random.default_rng(0)
    ids = rng.integers(0, small["vocab_size"], (2, 128)).astype(np.int32)
    rows = []
    logits = {}
    for name, model, device in (("cpu", cpu_model, cpu), ("device", dev_model, accel)):
        graphdef, params = nnx.split(model)
        with jax.default_device(device):
            logits[name] = jax.jit(lambda p, x: qwax.forward(graphdef, p, x).logits)(params, jnp.asarray(ids))
    err = max_rel_err(logits["device"], logits["cpu"])
    rows.append(Row("model forward logits", err <= 1e-3, err, 1e-3))

    batch = {"input_ids": ids[None, :, :-1], "targets": ids[None, :, 1:],
             "segment_ids": np.ones((1, 2, 127), np.int32), "position_ids": np.broadcast_to(np.arange(127), (1, 2, 127)),
             "weights": np.ones((1, 2, 127), np.float32)}
    metrics = {}
    for name, model, device in (("cpu", cpu_model, cpu), ("device", dev_model, accel)):
        graphdef, params = nnx.split(model)
        opt = optax.adamw(1e-3)
        step = jax.jit(make_train_step(graphdef, opt, LossWeights()))
        with jax.default_device(device):
            b = jax.tree.map(jnp.asarray, batch)
            _, _, m = step(params, opt.init(params), b, jax.random.key(0))
            metrics[name] = (float(m["loss"]), float(m["grad_norm"]))
    err = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(metrics["device"], metrics["cpu"]))
    rows.append(Row("model train step (loss, grad norm)", err <= 1e-3, err, 1e-3))

    tokens = {}
    for name, model, device in (("cpu", cpu_model, cpu), ("device", dev_model, accel)):
        with jax.default_device(device):
            tokens[name] = qwax.generate(model, ids[:, :32], max_new_tokens=8)
    same = bool(np.array_equal(tokens["device"], tokens["cpu"]))
    rows.append(Row("model greedy decode (8 tokens)", same, 0.0 if same else 1.0, 0.0))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="problem sizes (default: full on TPU/GPU, tiny on the CPU)")
    parser.add_argument("--family", choices=("gpu", "tpu"), default=None,
                        help="Pallas kernel family (default: the backend's; gpu on the CPU)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per op (default 10; 1 on the CPU)")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    size = SIZES[args.size or ("tiny" if on_cpu else "full")]
    family = args.family or ("tpu" if backend == "tpu" else "gpu")
    repeats = args.repeats or (1 if on_cpu else 10)
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    flops_peak, flops_source = peak_flops(device)
    bw_peak = next((bw for name, bw in PUBLISHED_BANDWIDTH if name.lower() in device.device_kind.lower()), None)
    print(f"device_check: jax {jax.__version__}, {device.device_kind} ({backend}), kernel family {family}"
          f"{' in interpret mode' if on_cpu else ''}, {args.dtype}, sizes {args.size or ('tiny' if on_cpu else 'full')}")
    print(f"peak {flops_peak / 1e12:.1f} TFLOP/s ({flops_source}); HBM "
          + (f"{bw_peak / 1e12:.2f} TB/s (published)" if bw_peak else "bandwidth: no published number"))

    start = time.perf_counter()
    rows = check_gdn(size, family, dtype, repeats) + check_moe(size, family, dtype, repeats)
    if not args.skip_model:
        impl = dict(gdn_impl="pallas", moe_impl="xla") if on_cpu else dict(gdn_impl="auto", moe_impl="auto")
        rows += check_model(impl)

    header = f"{'check':38s} {'ok':>4s} {'max rel err':>11s} {'tol':>7s} {'pallas ms':>10s} {'xla ms':>9s} " \
             f"{'speed-up':>8s} {'GFLOP/s':>9s} {'%peak':>6s} {'GB/s':>8s} {'%HBM':>6s}"
    print(header)
    for r in rows:
        timing = ""
        if r.ms_pallas is not None:
            gflops = r.flops / r.ms_pallas / 1e6
            gbs = r.bytes / r.ms_pallas / 1e6
            timing = (f" {r.ms_pallas:10.3f} {r.ms_xla:9.3f} {r.ms_xla / r.ms_pallas:8.2f} {gflops:9.1f} "
                      f"{100 * gflops * 1e9 / flops_peak:5.1f}% {gbs:8.1f} "
                      + (f"{100 * gbs * 1e9 / bw_peak:5.1f}%" if bw_peak else "     -"))
        print(f"{r.name:38s} {'yes' if r.ok else 'NO':>4s} {r.max_err:11.2e} {r.tol:7.0e}{timing}")
    failed = [r.name for r in rows if not r.ok]
    print(f"device_check: {len(rows) - len(failed)} of {len(rows)} checks ok in {time.perf_counter() - start:.0f} s"
          + (f"; failed: {failed}" if failed else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "backend": backend, "family": family, "dtype": args.dtype,
                       "peak_flops": flops_peak, "peak_bandwidth": bw_peak, "rows": [vars(r) for r in rows]}, f,
                      indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
