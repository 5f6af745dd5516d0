"""What this CPU does with 8-bit integer GEMMs, and which integer formats stay exact on it.

ONNX Runtime's x86 u8s8 GEMM (uint8 activations x int8 weights) without VNNI multiplies with
``vpmaddubsw``: each pair of adjacent products along the reduction is added into a **saturating
int16** (255 * 127 * 2 > 32767), so full-range int8 weights give wrong integers on AVX2 / AVX-512
CPUs without VNNI (AMD Zen 2 / Zen 3, Intel Haswell to Skylake). With VNNI (``vpdpbusd``), AMX, on
ARM64 (``sdot``/``udot`` or widening multiplies) and in the SSE fallback every product is accumulated
in 32 bits: exact. Two formats are exact everywhere: int8 weights within ``[-64, 64]`` (a pair then
sums to at most 255 * 64 * 2 = 32640) and uint8 weights (u8u8, widened to 16 bits before multiplying).

Features come from the CPUID instruction itself (what ONNX Runtime's MLAS dispatches on, so an
emulated CPU reports what it emulates), else from ``/proc/cpuinfo``.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..core.vocab import Int8Format

INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
EXACT_S8_MAX = 64  # |w| <= 64: u8 x s8 pair sums stay within int16 (255 * 64 * 2 = 32640)
INT16_MIN, INT16_MAX = -32768, 32767

# CPUID leaf 7 bits (subleaf 0: EBX, ECX, EDX; subleaf 1: EAX) -> flag names as Linux spells them
_LEAF7 = {("ebx", 5): "avx2", ("ebx", 16): "avx512f", ("ecx", 11): "avx512_vnni", ("edx", 25): "amx_int8"}
_LEAF7_1 = {("eax", 4): "avx_vnni"}
# System V x86-64: cpuid(leaf=edi, subleaf=esi, out=rdx) -> out[0..3] = eax, ebx, ecx, edx
_CPUID_CODE = bytes.fromhex("53" "89f8" "89f1" "4989d0" "0fa2" "418900" "41895804" "41894808" "4189500c" "5b" "c3")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name, architecture and the flags that decide int8 exactness."""

    model: str
    arch: str  # platform.machine(): x86_64, aarch64, arm64, ...
    flags: tuple[str, ...]  # the INT8_FLAGS this CPU has
    source: str  # "cpuid" | "/proc/cpuinfo" | "none"

    @property
    def x86(self) -> bool:
        return self.arch.lower() in ("x86_64", "amd64", "i386", "i686", "x86")

    @property
    def int8_class(self) -> str:
        """``vnni`` (x86 with VNNI or AMX), ``avx2`` (x86 whose u8s8 GEMM saturates), ``sse`` (x86
        without AVX2: widening kernels), ``arm64`` or ``other``."""
        if not self.x86:
            return "arm64" if self.arch.lower() in ("aarch64", "arm64") else "other"
        if any(f in self.flags for f in VNNI_FLAGS):
            return "vnni"
        return "avx2" if "avx2" in self.flags else "sse"

    def exact(self, fmt: Int8Format) -> bool:
        """Whether ONNX Runtime's integer kernels reproduce exact integer arithmetic for a graph of
        format ``fmt`` on this CPU (``portable`` graphs: everywhere; ``vnni`` graphs: not on ``avx2``)."""
        return fmt == "portable" or self.int8_class != "avx2"

    def as_dict(self) -> dict[str, str]:
        """For benchmark rows: model, architecture, int8 class and flags."""
        return {"cpu": self.model, "arch": self.arch, "int8_class": self.int8_class, "int8_flags": " ".join(self.flags)}


def exact_on(fmt: Int8Format) -> str:
    """Which CPUs a graph of format ``fmt`` is exact on, in words."""
    if fmt == "portable":
        return "every CPU (x86-64 with or without VNNI, ARM64)"
    return ("x86-64 with VNNI or AMX (Zen 4+, Cascade Lake+, Alder Lake+) and ARM64; "
            "NOT x86 without VNNI (AVX2 / AVX-512F only)")


def _cpuid_raw() -> tuple[dict[str, int], dict[str, int], str] | None:
    """(leaf 7.0, leaf 7.1, brand string) read with the CPUID instruction, or None where it cannot run."""
    if platform.machine().lower() not in ("x86_64", "amd64") or platform.system() == "Windows":
        return None
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError, AttributeError):  # W^X policies refuse executable pages
        return None
    buf.write(_CPUID_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    func = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))(address)
    regs = (ctypes.c_uint32 * 4)()

    def cpuid(leaf: int, sub: int = 0) -> dict[str, int]:
        func(leaf, sub, regs)
        return dict(zip(("eax", "ebx", "ecx", "edx"), regs))

    top = cpuid(0)["eax"]
    leaf7 = cpuid(7, 0) if top >= 7 else {}
    leaf7_1 = cpuid(7, 1) if top >= 7 and leaf7.get("eax", 0) >= 1 else {}
    brand = b""
    if cpuid(0x80000000)["eax"] >= 0x80000004:
        for leaf in (0x80000002, 0x80000003, 0x80000004):
            r = cpuid(leaf)
            brand += b"".join(r[k].to_bytes(4, "little") for k in ("eax", "ebx", "ecx", "edx"))
    return leaf7, leaf7_1, brand.rstrip(b"\0").decode("ascii", "replace").strip()


def _bits(regs: dict[str, int], table: dict[tuple[str, int], str]) -> set[str]:
    return {name for (reg, bit), name in table.items() if regs.get(reg, 0) >> bit & 1}


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU (cached: it does not change while the process runs)."""
    arch = platform.machine()
    text = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").is_file() else ""
    name = re.search(r"^(?:model name|Hardware|cpu model)\s*:\s*(.*)$", text, re.M)
    model = name.group(1).strip() if name else (platform.processor() or arch)
    raw = _cpuid_raw()
    if raw is not None:
        leaf7, leaf7_1, brand = raw
        flags, source = _bits(leaf7, _LEAF7) | _bits(leaf7_1, _LEAF7_1), "cpuid"
        model = brand or model
    else:
        found = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
        flags, source = (set(found.group(1).split()), "/proc/cpuinfo") if found else (set(), "none")
    return CpuInfo(model=model, arch=arch, flags=tuple(f for f in INT8_FLAGS if f in flags), source=source)


def maddubs_sum(x_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """``x @ w`` as AVX2's u8s8 kernel computes it: products of adjacent reduction pairs added into a
    saturating int16 (``vpmaddubsw``), then widened and summed exactly (``vpmaddwd`` with ones).

    ``x_u8`` [M, K] uint8, ``w_s8`` [K, N] int8 -> int64 [M, N]. K is padded to even with zeros.
    """
    x = x_u8.astype(np.int64)
    w = w_s8.astype(np.int64)
    if x.shape[1] % 2:
        x, w = np.pad(x, ((0, 0), (0, 1))), np.pad(w, ((0, 1), (0, 0)))
    pairs = x[:, 0::2, None] * w[None, 0::2, :] + x[:, 1::2, None] * w[None, 1::2, :]  # [M, K/2, N]
    return np.clip(pairs, INT16_MIN, INT16_MAX).sum(axis=1)


def pair_bound(w_s8: np.ndarray) -> tuple[int, int]:
    """The most negative and most positive pair sum any uint8 activations can make with ``w_s8``
    (weights as integers, any pairing of the reduction: the kernel's packing order is its own)."""
    w = np.asarray(w_s8, np.int64)
    top, bottom = 255 * 2 * max(int(w.max(initial=0)), 0), 255 * 2 * min(int(w.min(initial=0)), 0)
    return bottom, top


def s8_exact_anywhere(w_s8: np.ndarray) -> bool:
    """Whether int8 weights ``w_s8`` cannot saturate the u8s8 kernel of any CPU (every |w| <= 64)."""
    bottom, top = pair_bound(w_s8)
    return bottom >= INT16_MIN and top <= INT16_MAX
