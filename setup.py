"""Packaging for cn_clip. Data files (configs, vocab, templates) live inside the package.

The core install (requirements.txt) is what ``load_from_name``, ``tokenize``, the preprocessing CLIs, LMDB building,
training and evaluation need. Everything else is an extra, named in one line by ``cn_clip.extras`` when missing;
the README's install section says why each dependency is there.
"""

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

# Optional dependencies by feature (a literal: tests/test_extras.py checks it against cn_clip.extras.OPTIONAL).
EXTRAS = {
    "deploy": ["onnx>=1.15", "onnxruntime>=1.17", "onnxscript>=0.1"],
    "search": ["faiss-cpu>=1.7.4", "fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9"],
    "deepspeed": ["deepspeed>=0.14"],
    "train": ["peft>=0.10", "webdataset>=0.2.86", "fsspec>=2024.2", "aiohttp>=3.9"],  # aiohttp: fsspec's http(s) URLs
    "plots": ["matplotlib>=3.8"],
    "demo": ["scikit-image>=0.22"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="cn_clip",
    version=version["__version__"],
    description="Chinese CLIP toolkit compatible with OFA-Sys/Chinese-CLIP",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cn_clip", "cn_clip.*"]),
    package_data={
        "cn_clip": ["*.txt", "models/configs/*.json", "eval/templates/*.json", "data/demo/*", "search/static/*"]
    },
    include_package_data=True,
    python_requires=">=3.11",  # datetime.UTC (training/main.py)
    install_requires=requirements,
    extras_require=EXTRAS,
    license="MIT",
)
