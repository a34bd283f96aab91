"""nemo_elastic: nested (many-in-one) hybrid Mamba2/attention/MLP LLMs on Megatron-Core."""

from setuptools import find_packages, setup

# Core dependencies are pinned to versions that install and run on CPU-only machines.
# torch: PyPI's linux wheel is a CUDA build; it runs fine without a GPU.
INSTALL_REQUIRES = [
    "torch>=2.6,<=2.14.1",
    "megatron-core==0.19.2",
    "numpy>=1.26",
    "packaging>=24.2",
    "omegaconf>=2.3",
    "einops>=0.8",
    "psutil>=5.9",
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "tensorboard>=2.16",  # event files of every training run (torch.utils.tensorboard)
]

EXTRAS = {
    # GPU kernels: never needed on CPU (the torch path in nemo_elastic.ops is used instead).
    "gpu": ["mamba-ssm>=2.2", "causal-conv1d>=1.5", "transformer-engine[pytorch]>=2.8"],
    # Hugging Face nemotron_h import/export and parity tests.
    "hf": ["transformers>=5.0"],
    # `nemo elastic ...` (NeMo-Run CLI, local torchrun and Slurm executors).  leptonai is pinned:
    # newer ones break nemo-run 0.11.1's import (`No module named leptonai.api.v1`).
    "nemo": ["nemo-run==0.11.1", "leptonai==0.27.3"],
    # Megatron-Bridge adapter: megatron-bridge itself goes in with --no-deps (its declared
    # dependencies include GPU-only builds); these are what its training modules import.
    # `make install-nemo` does both.  A NeMo container already has all of it.
    "bridge": ["hydra-core>=1.3,<1.4", "megatron-energon>=7", "datasets>=3"],
    # NVIDIA ModelOpt's Minitron pruning as a peer in bench/bench_claims.py
    # (nemo_elastic/peers/modelopt_minitron.py, pinned: its CPU fixes touch ModelOpt internals).
    # modelopt.torch imports requests and huggingface_hub without declaring them.  Not the
    # [hf] extra of ModelOpt: it pins transformers<5.15.
    "peers": ["nvidia-modelopt==0.47.0", "requests>=2.31", "huggingface_hub>=0.24"],
    "test": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=5.0", "hypothesis>=6.100"],
}

setup(
    name="nemo_elastic",
    version="0.1.0",
    description="Nemotron-Elastic style nested hybrid LLMs for Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.12",
    packages=find_packages(include=["nemo_elastic", "nemo_elastic.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["nemo-elastic=nemo_elastic.cli:main"],
                  # `nemo elastic ...` (NeMo-Run discovers namespaces through this group)
                  "nemo_run.cli": ["elastic=nemo_elastic.integrations.nemo_run_cli"]},
)
