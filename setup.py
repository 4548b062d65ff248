"""Olmax: an optimized, memory-lean language model and its T5X-style trainer in JAX."""
import setuptools

setuptools.setup(
    name="olmax",
    version="0.1.0",
    description="Memory-lean language models in JAX: convolutions, axial MLP-Mixer, "
    "reversible blocks, MoE and AGC, with T5X-style seqio/Gin binaries.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-2-Clause",
    python_requires=">=3.10",
    # Folder names are import names: `olmax.tasks` is olmax/tasks, the Gin files are
    # package data in olmax/gin (found as gin/... by the binaries, checkout or install),
    # and olmax_tasks/ is the alias package that keeps the former name importable.
    packages=setuptools.find_packages(include=["olmax", "olmax.*", "olmax_tasks"]),
    package_data={"olmax": ["gin/*.gin", "gin/*/*.gin"]},
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6",
        "seqio>=0.0.19",
        "gin-config>=0.5",
        "clu>=0.0.12",
        "tensorflow>=2.16",
        # tensorflow>=2.21 no longer pulls tensorboard; clu.metric_writers needs it.
        "tensorboard>=2.16",
        "sentencepiece>=0.2",
        "numpy>=1.26",
        "absl-py>=1.4",
    ],
    extras_require={
        # cached_property .. jaxtyping: what upstream T5X imports beyond Olmax's own
        # dependencies (tests/test_t5x_interop.py runs T5X's binaries from its source).
        "test": ["pytest>=8", "pytest-xdist>=3.8", "matplotlib>=3.8",
                 "cached_property", "chex", "fiddle", "jaxtyping"],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
        "launch": ["xmanager"],
    },
    entry_points={
        "console_scripts": [
            "olmax-train=olmax.train:console_main",
            "olmax-eval=olmax.eval:console_main",
            "olmax-infer=olmax.infer:console_main",
        ]
    },
)
