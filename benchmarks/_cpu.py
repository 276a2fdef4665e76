"""The work a model asks of the CPU, and the instruction sets the CPU has to do it with.

A backend's images/s times the model's multiply-accumulates per image is the rate its
convolutions ran at (GMAC/s). Set beside the best fp32 rate of the same run, it says how far int8
can go: on x86 without VNNI, int8 multiplies through a VPMADDUBSW + VPMADDWD pair (and an add)
for 32 MACs where one fp32 FMA does 8, so int8 peaks near twice the fp32 rate; VNNI fuses the
pair, AVX-512 doubles the width, AMX more. Which of these the CPU has is read from
/proc/cpuinfo.
"""

from __future__ import annotations

from pathlib import Path

import torch

# The flags that make int8 and bf16 fast on x86 (names as /proc/cpuinfo spells them).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_summary() -> str:
    """The CPU's model name and which of ``ISA_FLAGS`` it has, in one line."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU flags unknown (no /proc/cpuinfo)"
    name = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if "model name" in ln), "?"
    )
    flags_line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(flags_line.split(":", 1)[-1].split())
    have = [f for f in ISA_FLAGS if f in flags]
    lack = [f for f in ISA_FLAGS if f not in flags]
    return f"{name}; has {', '.join(have) or 'none'}; lacks {', '.join(lack) or 'none'}"


def conv_gmacs(model: torch.nn.Module, size: tuple[int, int]) -> float:
    """Multiply-accumulates (billions) of ``model``'s convolutions and linear layers on one image."""
    total = [0]

    def count(module, _inputs, out):
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total[0] += out.numel() * module.in_channels // module.groups * k
        else:
            total[0] += out.numel() * module.in_features

    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, *size))
    finally:
        for h in hooks:
            h.remove()
    return total[0] / 1e9
