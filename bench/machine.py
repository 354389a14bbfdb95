"""The machine a benchmark ran on, for its results JSON and the README tables.

    python bench/machine.py        # prints the JSON

Benchmarks on this project are ratios measured in one run, but a reader still needs to know what "one run" was:
core count, CPU model and the vector/matrix extensions (avx512, avx512_bf16, amx) that decide how fast fp32/bf16
GEMMs go on CPU, plus the library versions. Every bench script includes `machine()` in its JSON.
"""

from __future__ import annotations

import json
import os
import platform
import time

# The flags that change CPU matmul speed; the full list is long and says nothing more for these benchmarks.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpuinfo() -> tuple[str, list[str]]:
    """(CPU model name, the FLAGS it has) from /proc/cpuinfo; ("unknown", []) elsewhere."""
    model, flags = "unknown", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    have = set(line.split(":", 1)[1].split())
                    flags = [flag for flag in FLAGS if flag in have]
    except OSError:
        pass
    return model, flags


def machine() -> dict:
    """Date, cores, CPU model/flags, platform and the versions of the libraries the benchmarks time."""
    model, flags = cpuinfo()
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(), "cpu": model,
            "cpu_flags": " ".join(flags), "platform": platform.platform(), "python": platform.python_version()}
    for name in ("torch", "transformers", "vllm"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing or broken optional library is just not reported
            info[name] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


if __name__ == "__main__":
    print(json.dumps(machine(), indent=2))
