"""nanosrpo: a small, readable reference implementation of SRPO (reflection-aware RL for multimodal LLMs).

Importing the package is cheap on purpose: modules import torch/transformers themselves, and nothing here pulls in
vllm or flash-attn. Scripts import the submodules they need (`from nanosrpo import rewards, grpo, ...`).
"""

__version__ = "0.1.0"
