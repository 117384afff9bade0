"""vitdeit: ViT-Tiny vs DeiT-Tiny (distilled from a ResNet-18) on ImageNet-100.

Nothing here imports CUDA or DALI at import time: every module imports on a CPU-only machine.
"""

__version__ = "0.1.0"
