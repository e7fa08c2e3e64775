"""CPU detection and dtype="auto": each branch tested here with a described CPU, whatever this machine is."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import samkit
from samkit import hardware
from samkit.cli import _build_parser, main
from samkit.hardware import CpuInfo, auto_dtype, parse_cpuinfo, resolve_dtype

# Abridged /proc/cpuinfo of the two x86 kinds and an Arm server.
AVX2_EPYC = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 7B12
flags		: fpu sse2 avx fma avx2 bmi2 sha_ni
"""
AVX512_BF16_EPYC = """processor	: 0
model name	: AMD EPYC 9654 96-Core Processor
flags		: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni
processor	: 1
model name	: AMD EPYC 9654 96-Core Processor
flags		: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni
"""
SAPPHIRE_RAPIDS = """model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: sse2 avx2 avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile
"""
SKYLAKE_SP = """model name	: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags		: sse2 avx2 avx512f avx512bw
"""
GRAVITON = """processor	: 0
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16
CPU implementer	: 0x41
"""


def _cpu(text: str, capability: str = "AVX512", onednn: str = "", arch: str = "x86_64") -> CpuInfo:
    model, flags = parse_cpuinfo(text)
    return CpuInfo(model, flags, capability, onednn, arch)


AVX2 = _cpu(AVX2_EPYC, "AVX2")
BF16 = _cpu(AVX512_BF16_EPYC)


@pytest.fixture
def fake_cpu(monkeypatch):
    """Make samkit see a given CPU: fake_cpu(CpuInfo) (also forgets the one-time warnings)."""

    def use(info: CpuInfo) -> None:
        monkeypatch.setattr(hardware, "cpu_info", lambda: info)
        monkeypatch.setattr(hardware, "_warned", set())

    return use


def test_parse_cpuinfo_reads_model_and_flags_of_the_first_processor():
    model, flags = parse_cpuinfo(AVX512_BF16_EPYC)
    assert model == "AMD EPYC 9654 96-Core Processor"
    assert {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"} <= flags
    assert parse_cpuinfo("") == ("", frozenset())
    _, arm = parse_cpuinfo(GRAVITON)
    assert "asimd" in arm


@pytest.mark.parametrize(
    "info, bf16, vnni",
    [
        (AVX2, False, False),
        (BF16, True, True),
        (_cpu(SAPPHIRE_RAPIDS), True, True),
        (_cpu(SKYLAKE_SP), False, False),  # AVX-512 without BF16 or VNNI
        (_cpu(AVX512_BF16_EPYC, "AVX2"), False, True),  # ATEN_CPU_CAPABILITY=avx2 on a bf16 CPU
        (_cpu(AVX512_BF16_EPYC, "AVX512", "AVX2"), False, True),  # ONEDNN_MAX_CPU_ISA=AVX2
        (_cpu(GRAVITON, "DEFAULT", arch="aarch64"), False, False),
    ],
    ids=["avx2", "avx512_bf16", "amx", "avx512_no_bf16", "aten_avx2", "onednn_avx2", "arm"],
)
def test_native_bf16_and_vnni_per_cpu_kind(info, bf16, vnni):
    assert info.bf16_native is bf16
    assert info.vnni is vnni
    assert auto_dtype("cpu", info) == ("bf16" if bf16 else "fp32")


def test_int8_mode_names_the_kernel_kind():
    assert "without VNNI" in AVX2.int8_mode and "7-bit" in AVX2.int8_mode
    assert "with VNNI" in BF16.int8_mode
    assert "non-x86" in _cpu(GRAVITON, "DEFAULT", arch="aarch64").int8_mode


def test_auto_on_cuda_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_dtype("cuda", BF16) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation
    )
    assert auto_dtype("cuda:0", AVX2) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert auto_dtype("cuda", AVX2) == "fp32"
    assert auto_dtype("mps", BF16) == "fp32"


def test_explicit_bf16_on_a_cpu_without_it_warns_once_in_one_line(fake_cpu, caplog):
    fake_cpu(AVX2)
    with caplog.at_level(logging.WARNING, logger="samkit"):
        assert resolve_dtype("bf16") == "bf16"  # kept: the user asked for it
        assert resolve_dtype(torch.bfloat16) == "bf16"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "AMD EPYC 7B12" in lines[0] and "slower" in lines[0] and "auto" in lines[0]


def test_explicit_bf16_where_native_is_silent(fake_cpu, caplog):
    fake_cpu(BF16)
    with caplog.at_level(logging.WARNING, logger="samkit"):
        assert resolve_dtype("bf16") == "bf16"
        assert resolve_dtype("fp32") == "fp32" and resolve_dtype(None) == "fp32"
    assert not caplog.records


def test_unknown_dtype_is_a_one_line_error():
    with pytest.raises(samkit.SamkitError, match="unknown dtype 'int4': use one of auto, fp32, bf16, fp16"):
        resolve_dtype("int4")


@pytest.mark.parametrize("info, amp", [(AVX2, None), (BF16, torch.bfloat16)], ids=["avx2", "avx512_bf16"])
def test_load_defaults_to_auto(fake_cpu, tiny_ckpt, info, amp):
    fake_cpu(info)
    model = samkit.load(tiny_ckpt)
    assert model.encoder_amp == amp
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert samkit.load(tiny_ckpt, dtype="fp32").encoder_amp is None


@pytest.mark.parametrize(
    "command", ["segment x.jpg", "embed x --out o", "everything x --out o", "serve", "annotate x"]
)
def test_cli_dtype_defaults_to_auto(command):
    args = _build_parser().parse_args(command.split())
    assert args.dtype == "auto"
    assert _build_parser().parse_args([*command.split(), "--dtype", "fp32"]).dtype == "fp32"


def test_cli_segment_passes_dtype_to_load(fake_cpu, tiny_ckpt, tmp_path, monkeypatch):
    fake_cpu(AVX2)
    seen = []
    real_load = samkit.load
    monkeypatch.setattr(samkit, "load", lambda *a, **k: seen.append(k.get("dtype")) or real_load(*a, **k))
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(
        tmp_path / "p.png"
    )
    argv = [
        "segment",
        str(tmp_path / "p.png"),
        "--point",
        "10,10",
        "--model",
        tiny_ckpt,
        "--out",
        str(tmp_path),
    ]
    assert main([*argv, "--dtype", "bf16"]) == 0
    assert main(argv) == 0
    assert seen == ["bf16", "auto"]


def test_samkit_info_prints_cpu_flags_auto_dtype_and_int8(fake_cpu, capsys):
    fake_cpu(AVX2)
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu"] == "AMD EPYC 7B12" and info["flags"] == ["avx2"]
    assert info["auto_dtype_cpu"] == "fp32" and info["cpu_bf16_native"] is False
    assert "without VNNI" in info["onnx_int8"]
    fake_cpu(BF16)
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "AMD EPYC 9654" in text and "avx512_bf16" in text and "auto_dtype_cpu" in text and "bf16" in text


def test_samkit_models_starts_with_the_cpu_line(fake_cpu, capsys):
    fake_cpu(AVX2)
    assert main(["models"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("CPU: AMD EPYC 7B12 [avx2]") and "torch CPU capability AVX2" in first


def test_run_header_names_cpu_and_branch(fake_cpu):
    fake_cpu(AVX2)
    header = hardware.run_header().splitlines()
    assert (
        header[0].startswith("CPU: AMD EPYC 7B12") and header[1] == "device cpu: dtype auto -> fp32 (native)"
    )
    assert "without VNNI" in header[-1]
    both = hardware.run_header("fp32", "bf16").splitlines()
    assert both[1:3] == [
        "device cpu: dtype fp32 -> fp32 (native)",
        "device cpu: dtype bf16 -> bf16 (EMULATED)",
    ]
    fake_cpu(BF16)
    assert "dtype auto -> bf16 (native)" in hardware.run_header("auto")


def test_this_machine_is_detected():
    """The real machine: a model name and torch's kernel level; native bf16 only with a bf16 flag."""
    hardware.cpu_info.cache_clear()
    info = hardware.cpu_info()
    assert info.model and info.torch_capability
    if info.bf16_native:
        assert info.flags & {"avx512_bf16", "amx_bf16"}


def test_without_proc_cpuinfo_torch_capability_gives_the_vector_width(monkeypatch):
    """macOS / Windows: no /proc/cpuinfo, so the flags come from PyTorch's kernel level (never bf16)."""
    monkeypatch.setattr(hardware, "read_cpuinfo", lambda: "")
    for capability, flags in [("AVX512", {"avx2", "avx512f"}), ("AVX2", {"avx2"}), ("DEFAULT", set())]:
        monkeypatch.setattr(hardware, "_torch_capability", lambda c=capability: c)
        hardware.cpu_info.cache_clear()
        info = hardware.cpu_info()
        assert info.flags == flags and info.model and not info.bf16_native
    hardware.cpu_info.cache_clear()


def test_every_benchmark_prints_the_machine():
    """A figure without its machine is no figure: each benchmark script prints `run_header` first."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if not folder.is_dir():
        pytest.skip(f"needs {folder}: not in this copy of the repository")
    scripts = sorted(folder.glob("*.py"))
    assert scripts
    assert [p.name for p in scripts if "run_header(" not in p.read_text()] == []
