"""Packaging for contrastive_jax.

Minimum versions are the oldest releases whose APIs we use (checked on the versions in the
README's tested list); TensorFlow is deliberately absent from the core requirements: datasets
are array_record files read through ``tfds.data_source`` and images are decoded with PIL.
"""
from setuptools import find_packages, setup

setup(
    name="contrastive_jax",
    version="0.1.0",
    description="Contrastive pretraining (CLIP, SigLIP, LiT, SimCLR, N-modality) in JAX/Flax at any scale.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["contrastive_jax", "contrastive_jax.*"]),
    package_data={"contrastive_jax.evaluate": ["data/*.txt"],
                  "contrastive_jax.evaluate.benchmark": ["data/*.json", "data/*.md"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7.0",
        "flax>=0.11.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.20",
        "tensorflow-datasets>=4.9.9",
        "grain>=0.2.12",
        "ml_collections>=1.1.0",
        "chex>=0.1.90",
        "numpy>=1.26",
        "pillow>=10.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6.2",
        "array_record>=0.7.0",
        "psutil>=5.9",
        "matplotlib>=3.8",  # the PNG report (evaluate/report.py)
        "sentencepiece>=0.2.0",  # SentencePiece tokenizers (training and loading .model files)
        "pyarrow>=14.0",  # Parquet shards as streamed sources (also required by tensorflow-datasets)
        "safetensors>=0.4.1",  # .safetensors checkpoints without PyTorch (interop); bf16 via numpy since 0.4.1
    ],
    extras_require={
        # The peers the tests measure parity against run inside the tests (open_clip_torch with its
        # packaged BPE vocabulary, transformers), plus moto's S3-compatible server for object-storage
        # workdirs; torch itself is installed first by .ci/run (see the README).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "scikit-learn>=1.4", "nbclient>=0.7", "nbformat>=5.7",
                 "ipykernel>=6.20.1", "open_clip_torch>=3.0", "transformers>=5.0", "tokenizers>=0.21",
                 "ftfy>=6.1", "regex>=2023.0", "moto[server]>=5.0", "s3fs>=2024.6",
                 # the peer TFRecord reader and the Beam engine the streaming / preprocessing tests compare against
                 "tfrecord>=1.14.6", "crc32c>=2.2", "apache-beam>=2.77",
                 # the COCO caption evaluation's BLEU / CIDEr-D scorers (pure Python), the caption metrics' peer
                 "pycocoevalcap>=1.2"],
        "tf": ["tensorflow>=2.16"],
        "torch": ["torch>=2.2"],
        # Exact CLIP text cleaning/splitting (as open_clip does it) and Hugging Face tokenizer.json files.
        "clip": ["ftfy>=6.1", "regex>=2023.0"],
        "hf": ["tokenizers>=0.21", "safetensors>=0.4.1"],
        "s3": ["s3fs>=2024.6"],
        "gcs": ["gcsfs>=2024.6"],
        # format "tfrecord" checks every frame's CRC-32C (the reader asks for this extra when it is missing).
        "tfrecord": ["crc32c>=2.2"],
        # Preprocessing that outgrows one machine: `contrastive-jax data convert --runner beam`.
        "beam": ["apache-beam>=2.77"],
    },
    entry_points={"console_scripts": ["contrastive-jax=contrastive_jax.cli:main"]},
)
