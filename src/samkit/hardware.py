"""What this machine runs fast: the CPU's model and instruction-set flags, CUDA bf16, and `dtype="auto"`.

bf16 pays only where the hardware multiplies bf16 natively: on a CUDA GPU with bf16, and on a CPU with
AVX512_BF16 or AMX. Elsewhere (AVX2-only laptops and servers) PyTorch emulates it and the image encoder
runs many times slower than fp32, so "auto" picks fp32 there. int8 ONNX graphs run U8S8 integer products;
without VNNI these go through an instruction that saturates 16-bit sums, which the exporter avoids with
7-bit weights (see `samkit.export.onnx_export.quantize_int8`).

Reading the flags needs no torch (`/proc/cpuinfo`); torch is imported only to ask for its CPU kernel
level and for CUDA. Tests describe a CPU with a `CpuInfo` and pass it (`cpu=`) or put it in place of
`cpu_info`, so every branch is tested on any machine.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from samkit.errors import SamkitError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("samkit")

# The flags that decide a code path, in the order `samkit info` prints them.
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16", "avx512_vnni", "avx_vnni")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FP16_FLAGS = ("avx512_fp16", "amx_fp16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
# oneDNN levels (ONEDNN_MAX_CPU_ISA) below which bf16 matrix products are emulated even on a bf16 CPU.
_ONEDNN_NO_BF16 = {"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni"}
DTYPES = ("auto", "fp32", "bf16", "fp16")
_NAMES = {
    "fp32": "fp32",
    "float32": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "auto": "auto",
}


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as samkit sees it.

    model: the vendor's name ("AMD EPYC 9654 96-Core Processor"). flags: the lower-case instruction-set
    flags the kernel reports (only those in `FLAGS` matter). torch_capability: PyTorch's CPU kernel level
    ("AVX512", "AVX2", "DEFAULT", ...; "" when torch is absent); ATEN_CPU_CAPABILITY lowers it.
    onednn_isa: ONEDNN_MAX_CPU_ISA when set (lowers oneDNN's level), else "".
    """

    model: str
    flags: frozenset[str] = field(default_factory=frozenset)
    torch_capability: str = ""
    onednn_isa: str = ""
    arch: str = ""

    @property
    def x86(self) -> bool:
        return (
            self.arch in ("x86_64", "amd64", "i386", "i686") or "avx2" in self.flags or "sse2" in self.flags
        )

    @property
    def bf16_native(self) -> bool:
        """bf16 products in hardware and PyTorch/oneDNN allowed to use them."""
        return self._native(BF16_FLAGS)

    @property
    def fp16_native(self) -> bool:
        return self._native(FP16_FLAGS)

    @property
    def vnni(self) -> bool:
        """8-bit dot products accumulate in 32 bits without saturation (AVX512-VNNI or AVX-VNNI)."""
        return any(f in self.flags for f in VNNI_FLAGS)

    def _native(self, flags: tuple[str, ...]) -> bool:
        if not any(f in self.flags for f in flags):
            return False
        if self.torch_capability and not self.torch_capability.upper().startswith("AVX512"):
            return False  # ATEN_CPU_CAPABILITY=avx2: PyTorch's vector kernels emulate bf16
        return self.onednn_isa.lower() not in _ONEDNN_NO_BF16

    @property
    def int8_mode(self) -> str:
        """How onnxruntime multiplies int8 here (the exporter's 7-bit weights are exact on both)."""
        if not self.x86:
            return "int8 (non-x86 CPU: signed 8-bit dot products, no 16-bit saturation)"
        if self.vnni:
            return "U8S8 with VNNI (32-bit accumulation)"
        return "U8S8 without VNNI (16-bit pair sums; exact with samkit's 7-bit weights)"

    def flags_found(self) -> list[str]:
        return [f for f in FLAGS if f in self.flags]


def read_cpuinfo(path: str | Path = "/proc/cpuinfo") -> str:
    """The text of /proc/cpuinfo, or "" where there is none (macOS, Windows)."""
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo text (x86 `flags`, Arm `Features`)."""
    model, flags = "", ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = value
        if model and flags:
            break
    return model, frozenset(flags.lower().split())


def _torch_capability() -> str:
    try:
        import torch
    except ImportError:
        return ""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return ""


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU (cached; `cpu_info.cache_clear()` re-reads it)."""
    model, flags = parse_cpuinfo(read_cpuinfo())
    capability = _torch_capability()
    if not flags:
        # No /proc/cpuinfo: PyTorch's kernel level says at least which vector width the CPU has.
        level = capability.upper()
        flags = frozenset(
            {"avx2", "avx512f"} if level.startswith("AVX512") else {"avx2"} if level == "AVX2" else ()
        )
    return CpuInfo(
        model=model or platform.processor() or platform.machine() or "unknown CPU",
        flags=flags,
        torch_capability=capability,
        onednn_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        arch=platform.machine().lower(),
    )


def cuda_bf16(device: Any = None) -> bool:
    """True when `device` (default: the current CUDA device) multiplies bf16 natively (Ampere and newer)."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch without the argument
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 8


def dtype_name(dtype: str | torch.dtype | None) -> str:
    """ "auto", "fp32", "bf16" or "fp16" for any spelling samkit accepts (None is fp32)."""
    if dtype is None:
        return "fp32"
    text = str(dtype).removeprefix("torch.")
    if text not in _NAMES:
        raise SamkitError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return _NAMES[text]


def auto_dtype(device: str | torch.device = "cpu", cpu: CpuInfo | None = None) -> str:
    """ "bf16" where `device` multiplies bf16 natively (CUDA with bf16; CPU with AVX512_BF16 or AMX), else "fp32"."""
    kind = str(device).split(":")[0]
    if kind == "cuda":
        return "bf16" if cuda_bf16(device) else "fp32"
    if kind == "cpu":
        return "bf16" if (cpu or cpu_info()).bf16_native else "fp32"
    return "fp32"  # mps and others: fp32 is the path that is correct everywhere


_warned: set[str] = set()


def resolve_dtype(
    dtype: str | torch.dtype | None, device: str | torch.device = "cpu", cpu: CpuInfo | None = None
) -> str:
    """The encoder precision to run: "fp32", "bf16" or "fp16".

    "auto" follows `auto_dtype`. An explicit "bf16"/"fp16" on a CPU that would emulate it is kept (the
    user asked for it) and logged once per process as one warning line saying it will be slow.
    """
    name = dtype_name(dtype)
    if name == "auto":
        return auto_dtype(device, cpu)
    if name != "fp32" and str(device).split(":")[0] == "cpu":
        info = cpu or cpu_info()
        native = info.bf16_native if name == "bf16" else info.fp16_native
        if not native and name not in _warned:
            _warned.add(name)
            need = "AVX512_BF16 or AMX" if name == "bf16" else "AVX512_FP16 or AMX-FP16"
            log.warning(
                f"samkit: {name} is emulated on this CPU ({info.model}: no {need} in use), so the image "
                f"encoder runs many times slower than fp32; use dtype 'auto' or 'fp32'"
            )
    return name


def describe(device: str | torch.device = "cpu", cpu: CpuInfo | None = None) -> dict[str, Any]:
    """What `samkit info` prints: CPU model and flags, torch's CPU level, CUDA, the "auto" dtype, int8 mode."""
    import torch

    info = cpu or cpu_info()
    cuda = torch.cuda.is_available()
    return {
        "cpu": info.model,
        "arch": info.arch,
        "flags": info.flags_found(),
        "torch": torch.__version__,
        "torch_cpu_capability": info.torch_capability or "unknown",
        "onednn_max_cpu_isa": info.onednn_isa or None,
        "cpu_bf16_native": info.bf16_native,
        "cuda": torch.cuda.get_device_name() if cuda else None,
        "cuda_bf16": cuda_bf16() if cuda else None,
        "auto_dtype_cpu": auto_dtype("cpu", info),
        "auto_dtype_cuda": auto_dtype("cuda", info) if cuda else None,
        "onnx_int8": info.int8_mode,
    }


def cpu_line(cpu: CpuInfo | None = None) -> str:
    """One line naming the CPU, its relevant flags and PyTorch's kernel level (benchmarks, `samkit models`)."""
    info = cpu or cpu_info()
    flags = " ".join(info.flags_found()) or "none of " + "/".join(FLAGS[:3])
    extra = f", ONEDNN_MAX_CPU_ISA={info.onednn_isa}" if info.onednn_isa else ""
    return f"CPU: {info.model} [{flags}]; torch CPU capability {info.torch_capability or 'unknown'}{extra}"


def run_header(*dtypes: str | torch.dtype | None, device: str | torch.device = "cpu") -> str:
    """Lines for the top of every benchmark: the CPU, then each encoder dtype it runs (default "auto") with
    what it resolves to here and whether the hardware runs it natively, and the ONNX int8 kernel kind."""
    lines = [cpu_line()]
    for dtype in dtypes or ("auto",):
        picked = dtype_name(dtype)
        ran = auto_dtype(device) if picked == "auto" else picked
        how = "native" if ran == "fp32" or _native_on(ran, device) else "EMULATED"
        lines.append(f"device {device}: dtype {picked} -> {ran} ({how})")
    lines.append(f"onnx int8: {cpu_info().int8_mode}")
    return "\n".join(lines)


def _native_on(name: str, device: str | torch.device) -> bool:
    if str(device).split(":")[0] == "cuda":
        return name == "fp16" or cuda_bf16(device)
    return cpu_info().bf16_native if name == "bf16" else cpu_info().fp16_native
