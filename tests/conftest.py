"""Shared test set-up: 8 simulated CPU devices (for sharding tests), fp32 matmuls, fast compiles
(fast_compile.py)."""
import os

from fast_compile import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(devices=8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The test files that take longest on 2 CPU cores, longest first (measured with --durations).
# CI runs `pytest -n 2 --dist loadfile --no-loadscope-reorder`: each file goes whole to one
# worker, in collection order, so starting the longest first lets the two workers finish
# together (xdist's default order, by number of tests, started a 9-minute file of 9 tests
# after 12 others). Files not named here follow, in their usual order.
LONGEST_FIRST = [
    "test_reliability.py",
    "test_t5x_interop.py",
    "test_user_errors.py",
    "test_t5x_interop_models.py",
    "test_network.py",
    "test_binaries.py",
    "test_plan.py",
    "test_multihost.py",
    "test_benchmarks.py",
    "test_layout.py",
    "test_long_context.py",
    "test_gpu_benchmark.py",
    "test_long_lm.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file


@pytest.fixture(scope="session")
def binaries_compile_cache(tmp_path_factory) -> dict:
    """Environment variables for the binaries a test file starts (subprocesses): one JAX
    compilation cache per xdist worker, so that a binary started again with the same model and
    settings loads the XLA programs the first start compiled (about 4 s of a tiny run's 12)
    instead of compiling them again. A program that differs in anything misses the cache and
    is compiled, so what a run computes is the same; the cache lives in this session's
    basetemp only."""
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_compilation_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
