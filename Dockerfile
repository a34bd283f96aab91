# GPU image: NGC PyTorch (CUDA, torch, Transformer Engine, compilers) + nemo_elastic with the
# Mamba2 kernels (mamba-ssm, causal-conv1d) and Hugging Face export.  Not built or tested in CI
# (no GPU there); see README "Honest limits".
#
#   docker build -t nemo-elastic .
#   docker run --gpus all --ipc=host --rm -v $PWD/runs:/opt/nemo_elastic/runs nemo-elastic run
#   docker run --gpus all --ipc=host --rm -v /data:/data -v $PWD/runs:/opt/nemo_elastic/runs \
#       --entrypoint torchrun nemo-elastic --nproc_per_node=8 --no-python nemo-elastic pretrain \
#       --config conf/nemotron_nano_12b.yaml data.indexed.prefix=/data/corpus \
#       data.indexed.tokenizer=/data/tokenizer.json
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/nemo_elastic
COPY . .

# The base image's pip constraints (PIP_CONSTRAINT) keep its own torch and Transformer Engine;
# mamba-ssm and causal-conv1d compile against that torch, hence --no-build-isolation.
RUN pip install --no-build-isolation -e ".[gpu,hf]" \
 && python -c "import torch, mamba_ssm, causal_conv1d, transformer_engine, megatron.core, nemo_elastic.cli; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)"

ENTRYPOINT ["nemo-elastic"]
CMD ["--help"]
