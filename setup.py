from setuptools import find_packages, setup

setup(
    name="accelerate-offload",
    version="0.1.0",
    description="Train LoRAs for 12B-class diffusion transformers in full bf16 on small GPUs, as an Accelerate plugin.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["accelerate_offload", "accelerate_offload.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "accelerate>=1.10",
        # Token chunking mirrors diffusers 0.42's Flux and SD3 block internals; the Flux script uses its bucket helpers.
        "diffusers>=0.42",
        # `dtype=` in from_pretrained.
        "transformers>=4.56",
        "peft>=0.15",
        "safetensors",
        "huggingface_hub",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "train": [
            "datasets",
            "pillow",
            "sentencepiece",
            "protobuf",
            "pyarrow",
            "bitsandbytes; platform_system == 'Linux'",
            "prodigyopt",
            "wandb",
            "tensorboard",
            "matplotlib",
        ],
        "test": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["accelerate-offload=accelerate_offload.cli:main"]},
)
