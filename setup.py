"""Packaging for cn_clip. Data files (configs, vocab, templates) live inside the package."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
version: dict[str, str] = {}
exec((HERE / "cn_clip" / "version.py").read_text(encoding="utf-8"), version)
requirements = [
    line.strip()
    for line in (HERE / "requirements.txt").read_text(encoding="utf-8").splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="cn_clip",
    version=version["__version__"],
    description="Chinese CLIP toolkit compatible with OFA-Sys/Chinese-CLIP",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cn_clip", "cn_clip.*"]),
    package_data={"cn_clip": ["*.txt", "models/configs/*.json", "eval/templates/*.json", "data/demo/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={"deepspeed": ["deepspeed>=0.14"], "lora": ["peft>=0.13"]},
    license="MIT",
)
