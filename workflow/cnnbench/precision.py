"""One arithmetic per ``precision``, set through each framework's own switch (both trainers use this).

- ``fp32``: strict IEEE float32 matmuls and convolutions (no TF32) in every framework.
- ``tf32``: TF32 matmuls and convolutions in every framework (where the GPU has TF32: Ampere and
  newer; elsewhere the hardware has only fp32).
- ``bf16``: bf16 autocast (torch) / the ``mixed_bfloat16`` policy (Keras), with the same layers kept
  in float32 in both: input preprocessing, the 10-class head, BatchNorm statistics and the loss. Those
  float32 parts run strict fp32, as under ``fp32``.

On a CPU every precision runs strict fp32 (a CPU has no TF32, and bf16 there is slower than fp32 on
most CPUs): ``effective`` says what ran, and the run records it in ``environment.precision``.
"""

from __future__ import annotations

PRECISIONS = ("fp32", "tf32", "bf16")


def effective(precision: str, on_gpu: bool) -> str:
    """What a run of ``precision`` computes in on this device."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision if on_gpu else "fp32"


def _tf32(precision: str) -> bool:
    return precision == "tf32"


def apply_torch(precision: str) -> dict:
    """torch's float32 matmul precision and cuDNN's convolution precision; returns them as read back."""
    import torch

    mode = "tf32" if _tf32(precision) else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode
    return {"torch.backends.cuda.matmul.fp32_precision": torch.backends.cuda.matmul.fp32_precision,
            "torch.backends.cudnn.conv.fp32_precision": torch.backends.cudnn.conv.fp32_precision,
            "autocast": "bfloat16" if precision == "bf16" else None}


def apply_tensorflow(precision: str) -> dict:
    import tensorflow as tf

    tf.config.experimental.enable_tensor_float_32_execution(_tf32(precision))
    return {"tensor_float_32_execution": tf.config.experimental.tensor_float_32_execution_enabled()}


def apply_jax(precision: str) -> dict:
    import jax

    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if _tf32(precision) else "highest")
    return {"jax_default_matmul_precision": jax.config.jax_default_matmul_precision}


def apply(framework: str, precision: str, on_gpu: bool) -> tuple[str, dict]:
    """Set ``framework``'s switches (torch, tensorflow or jax: Keras' backend) for ``precision`` on this
    device; returns (the effective precision, the switches as read back), for ``environment``."""
    ran = effective(precision, on_gpu)
    setter = {"torch": apply_torch, "tensorflow": apply_tensorflow, "jax": apply_jax}[framework]
    return ran, setter(ran)
