from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="dynsila",
    version="0.1.0",
    description="Dynamic (early-exit and input-adaptive) networks with Siamese Labels auxiliary learning",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dynsila", "dynsila.*", "models", "models.*"]),
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
    extras_require={"dev": ["pytest", "ruff==0.17.6", "mypy==2.4.1", "types-PyYAML"]},
)
