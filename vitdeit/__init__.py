"""vitdeit: ViT-Tiny vs DeiT-Tiny (distilled from a ResNet-18) on ImageNet-100.

Nothing here imports CUDA or DALI at import time: every module imports on a CPU-only machine.
"""

import os

__version__ = "0.1.0"

# CUDA_DEVICE_MAX_CONNECTIONS: the hardware work queues CUDA spreads a process's streams over (CUDA's default: 8).
# With the training step as CUDA graphs, DALI's streams shared queues with the graphs' stream and their work waited
# behind whole replays: on an H200, DALI fed the DeiT-Tiny + teacher step at 0.67-0.71 of its ceiling with 8 queues
# and at 0.91-0.93 with 32 (BENCHMARKS.md, 2026-12-04). CUDA reads it when it makes the process's context.
CUDA_CONNECTIONS = 32


def use_cuda_connections() -> str:
    """CUDA_DEVICE_MAX_CONNECTIONS = CUDA_CONNECTIONS unless the environment sets it (the user's value wins); the
    entry points call this before anything can touch the GPU. Returns the value in force."""
    return os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", str(CUDA_CONNECTIONS))
