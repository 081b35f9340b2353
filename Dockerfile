# rlrr on the official PyTorch CUDA image: torch 2.14.1 + CUDA 13.0 + cuDNN 9, the build the
# tests run on. Build and run (README "Docker"):
#   docker build -t rlrr:0.1.0 .
#   docker run --gpus all --ipc=host -v "$PWD/data:/opt/rlrr/data" -v "$PWD/runs:/opt/rlrr/runs" rlrr:0.1.0 \
#     torchrun --nproc_per_node=8 launch/train.py --config configs/vtab/kitti.yaml
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=8
WORKDIR /opt/rlrr

# A C compiler: Triton builds its kernel launchers with it on first use (torch.compile and rlrr's fused
# RLRR kernels, both on by default on a GPU); the runtime image has none. The distribution's current gcc.
# curl: data.shards on http(s):// (README "Shards elsewhere").
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev curl \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first: this layer is rebuilt only when the pins change.
COPY docker/requirements.txt docker/requirements.txt
RUN pip install --no-cache-dir -r docker/requirements.txt

COPY setup.py README.md ./
COPY rlrr rlrr
COPY launch launch
COPY configs configs
COPY tools tools
COPY docker/entrypoint.sh /usr/local/bin/rlrr-entrypoint
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 1000 --shell /bin/bash rlrr \
    && mkdir -p data runs pretrained \
    && chown rlrr:rlrr data runs pretrained

USER 1000:1000
ENTRYPOINT ["/usr/local/bin/rlrr-entrypoint"]
CMD ["--help"]
