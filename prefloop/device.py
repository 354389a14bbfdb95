"""Device and dtype choice, shared by every stage that loads a model (generation, judging, training)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cpu_has_native_bf16() -> tuple[bool, str]:
    """AVX512-BF16 / AMX on x86 or the `bf16` feature on ARM: without them bf16 matmuls are emulated and slow."""
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return True, "CPU has AMX"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return True, "CPU has AVX512-BF16"
    if platform.machine() in ("aarch64", "arm64") and Path("/proc/cpuinfo").exists():
        if " bf16" in Path("/proc/cpuinfo").read_text():
            return True, "ARM CPU has the bf16 extension"
    return False, "CPU has no native bf16 (no AMX/AVX512-BF16)"


def resolve_dtype(dtype: str, device: torch.device) -> tuple[torch.dtype, str]:
    """(dtype, reason). `auto`: bf16 where the hardware runs it natively (CUDA sm80+, bf16 CPUs), else fp32."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}.")
        return DTYPES[dtype], "set by the user"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return torch.bfloat16, f"GPU compute capability sm{major}{minor} >= sm80"
        # fp16 would fit older GPUs, but it overflows on some models; fp32 is the safe default there.
        return torch.float32, f"GPU compute capability sm{major}{minor} < sm80 has no fast bf16"
    native, reason = _cpu_has_native_bf16()
    return (torch.bfloat16 if native else torch.float32), reason
