"""What XLA's compiler makes of a loop over a stacked 4-bit array: its temporaries, from the
compiled program (``memory_analysis()``; nothing is allocated).

A ``lax.scan`` reads one layer of a ``(layers, n)`` stack per iteration and sums it against a
float vector. The same values held as ``uint4`` (``jnp.uint4``, two per byte in memory), as
``uint8`` bytes that pack two values each (``lrtt.quantize(..., packed=True)``'s form, unpacked
by a bitcast inside the loop), and as one ``uint8`` per value:

    python benchmarks/uint4_scan.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LAYERS, N = 16, 4096 * 1024


def _scan(unpack):
    def f(stack, x):
        def body(total, layer):
            return total + jnp.sum(unpack(layer).astype(jnp.float32) * x), None
        return jax.lax.scan(body, 0.0, stack)[0]
    return f


def _temp_mib(f, stack) -> tuple[float, float]:
    x = jax.ShapeDtypeStruct((N,), jnp.float32)
    analysis = jax.jit(f).lower(stack, x).compile().memory_analysis()
    return analysis.argument_size_in_bytes / 2**20, analysis.temp_size_in_bytes / 2**20


def main() -> None:
    cases = {
        "uint4 values": (jax.ShapeDtypeStruct((LAYERS, N), jnp.uint4), lambda v: v),
        "uint8 bytes, two values each": (jax.ShapeDtypeStruct((LAYERS, N // 2), jnp.uint8),
                                         lambda b: jax.lax.bitcast_convert_type(b, jnp.uint4).reshape(N)),
        "uint8, one value each": (jax.ShapeDtypeStruct((LAYERS, N), jnp.uint8), lambda v: v),
    }
    print(f"a scan over {LAYERS} layers of {N:,} values (jax {jax.__version__}, {jax.default_backend()})")
    print("| stored as | arguments MiB | XLA temporaries MiB |")
    print("|---|---|---|")
    for name, (stack, unpack) in cases.items():
        arguments, temp = _temp_mib(_scan(unpack), stack)
        print(f"| {name} | {arguments:.1f} | {temp:.1f} |")


if __name__ == "__main__":
    main()
