"""XLA flags for every program the test suite compiles: in this process (conftest.py sets them
before JAX starts) and in the binaries the tests start (their environments take `xla_flags`).

The suite is compile-bound: its models are tiny, and most of a test's seconds are XLA
compiling them. These flags turn off LLVM's optimization of the generated machine code
(on a 2-core CPU: test_network.py 159 -> 109 s, a 12-step tiny olmax.train 18.5 -> 16 s).
The HLO passes and the buffer assignment are those of a default build, so every compiled
memory and cost figure a test reads is unchanged; what runs is the same program, slower
per step and sooner compiled. The binaries' users get the default build (benchmarks/gpu.py's
--smoke run makes the same trade for itself).
"""

FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a program of the suite: FLAGS, and `devices` simulated CPU devices if given."""
    return FLAGS if devices is None else f"--xla_force_host_platform_device_count={devices} {FLAGS}"
