# rlrr on an official PyTorch CUDA image. Build: docker build -t rlrr .
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

WORKDIR /opt/rlrr
COPY setup.py README.md ./
COPY rlrr ./rlrr
COPY tools ./tools
RUN pip install --no-cache-dir -e . \
    && useradd --create-home --uid 1000 rlrr
COPY docker/entrypoint.sh /usr/local/bin/entrypoint.sh
USER rlrr
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
