from setuptools import find_packages, setup

setup(
    name="megatron-mobilellm",
    version="0.1.0",
    description="DeepSpeed/Megatron-style distributed trainer for the MobileLLM family",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_mobilellm", "megatron_mobilellm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.8,<0.20",  # tested range; training/zero_overflow.py patches its internals
        "numpy",
        "orjson",
        "packaging",
        "sentencepiece",
        "tensorboard",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest", "pytest-xdist", "transformers", "megatron-core==0.16.1", "triton", "matplotlib"],
        "flash": ["flash-attn"],
        # --attention-backend fa4 (SM90/SM100): newer nvidia-cutlass-dsl wheels lack cutlass.cute (docs/performance.md)
        "fa4": ["flash-attn-4==4.0.0b18", "nvidia-cutlass-dsl==4.5.3", "quack-kernels==0.5.0"],
        # lm-eval's HF backend (accelerate, peft, transformers); protobuf reads the export's SentencePiece tokenizer.
        "eval": ["lm-eval[hf]==0.4.13", "protobuf"],
        "zstd": ["zstandard"],  # .jsonl.zst input to tools/preprocess_jsonl.py
        "ondevice": ["gguf==0.19.0", "protobuf", "llama-cpp-python"],  # tools/export_ondevice.py
    },
)
