"""Which arithmetic the networks run in: the one place that decides bfloat16 autocast.

bfloat16 autocast roughly halves the time of a 3D U-Net on hardware that runs it natively (CUDA
GPUs with bf16, CPUs with AVX512-BF16 or AMX); elsewhere it is emulated and slower than float32,
so ``"auto"`` means "bfloat16 where native, float32 otherwise".

``IMSCT_PRECISION`` (``auto`` | ``float32`` | ``bfloat16``) overrides the detection for every
front door at once: ``IMSCT_PRECISION=float32`` shows what a CPU without AVX-512 runs (with
``ONEDNN_MAX_CPU_ISA=AVX2`` the convolutions also stop using AVX-512).
"""

from __future__ import annotations

import os

import torch

PRECISIONS = ("auto", "float32", "bfloat16")


def _env_precision() -> str:
    value = os.environ.get("IMSCT_PRECISION", "auto").strip().lower() or "auto"
    if value not in PRECISIONS:
        raise ValueError(f"IMSCT_PRECISION={value!r}: expected one of {', '.join(PRECISIONS)}")
    return value


def _onednn_below_avx512() -> bool:
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return bool(isa) and not isa.startswith(("AVX512", "AVX10", "ALL", "DEFAULT"))


def bf16_native(device: torch.device | str) -> bool:
    """Whether bfloat16 autocast is fast on ``device`` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        if _onednn_below_avx512():
            return False
        try:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except AttributeError:  # older torch: no way to tell, stay in float32
            return False
    return False


def use_bf16(amp: bool | str, device: torch.device | str) -> bool:
    """Resolve an ``amp`` setting (True, False or ``"auto"``) for ``device``; ``IMSCT_PRECISION``
    other than ``auto`` wins over both."""
    env = _env_precision()
    if env != "auto":
        return env == "bfloat16"
    if isinstance(amp, str):
        if amp.strip().lower() != "auto":
            raise ValueError(f"amp={amp!r}: expected True, False or 'auto'")
        return bf16_native(device)
    return bool(amp)


__all__ = ["bf16_native", "use_bf16", "PRECISIONS"]
