from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="dynsila",
    version="0.1.0",
    description="Dynamic (early-exit and input-adaptive) networks with Siamese Labels auxiliary learning",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # The repository keeps the architectures in a top-level models/ folder; dynsila/models is a symlink to it, so
    # the folder installs and imports as dynsila.models and "dynsila" is the only top-level name in site-packages
    # (tests/test_packaging.py checks the wheel). A symlink rather than package_dir: mypy and an uninstalled
    # checkout (python -m dynsila.train from the repository root) then resolve dynsila.models the same way.
    packages=find_packages(include=["dynsila", "dynsila.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch",  # unpinned on purpose: the machine's own build is used
        "torchvision",
        "timm",
        "fvcore",
        "numpy",
        "scipy",
        "pyyaml",
        "scikit-learn",  # the embedded digits dataset
        "safetensors",  # deploy weights
        "matplotlib",  # benchmark plots
    ],
    # the modules that register dynsila's training techniques (config keys included); a package of the user's
    # names its own here and its technique is found with no edit to dynsila
    entry_points={
        "dynsila.techniques": [
            "sila = dynsila.methods.sila",
            "self_distill = dynsila.methods.self_distill",
            "gates = dynsila.methods.hrl",
            "dml = dynsila.methods.dml",
            "ge = dynsila.methods.gradient_equilibrium",
            "imta = dynsila.methods.imta",
            "ztw = dynsila.methods.ztw",
            "l2w = dynsila.methods.l2w",
        ]
    },
    extras_require={
        # pytest-xdist: the suite runs one worker per core (two on CI), each with one thread (tests/conftest.py)
        "dev": ["pytest", "pytest-xdist", "ruff==0.17.6", "mypy==2.4.1", "types-PyYAML", "tensorboard"],
        # python -m dynsila.export and dynsila.export.OnnxEarlyExitRunner (tested with onnx 1.23.2,
        # onnxruntime 1.32.0, onnxscript 0.7.2); onnxscript is what torch's dynamo ONNX exporter needs
        "deploy": ["onnx", "onnxruntime", "onnxscript"],
        # TensorBoard event files of every training run (torch.utils.tensorboard needs the package; tested with 2.21.0)
        "tensorboard": ["tensorboard"],
    },
)
