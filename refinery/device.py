"""Where the model stages run: device and dtype from the profile's ``compute`` section.

``compute.device: auto`` takes the GPU when torch sees one, else the CPU; ``compute.dtype: auto``
takes bfloat16 on a GPU (float16 on one without bf16) and float32 on the CPU, where the measured
numbers in docs/ were made. ``compute.autocast: auto`` lets recovery's distillation compute in
bfloat16 over float32 weights where the hardware does bf16 natively (AVX512-BF16 or AMX on a CPU);
emulated bf16 would be slower than float32, so elsewhere it stays off. ``cuda`` on a machine without a GPU fails at once, naming the key,
instead of after the data stages have run.

Every model stage calls :func:`select` first and records :func:`metadata` with its artifact, so the
device, its name and the dtype of each result are in the Dagster metadata.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from refinery.config import Profile, ProfileError


class DeviceError(ProfileError):
    """The profile asks for a device or dtype this machine does not have; names the key."""


@dataclass(frozen=True)
class Placement:
    """Where and in what precision a stage loads and runs its models."""

    device: str  # "cpu" or "cuda"
    dtype: str  # "float32", "bfloat16" or "float16"
    name: str  # the GPU's name (torch.cuda.get_device_name) or the CPU model
    memory_bytes: int  # free memory of one device there (GPU) or available host RAM (CPU)
    host_memory_bytes: int  # available host RAM (equal to memory_bytes on the CPU)
    count: int = 1  # devices of that kind this process sees
    autocast: str | None = None  # "bfloat16": mixed precision over the float32 weights (recovery)

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)


def resolve_dtype(device: str, requested: str, *, bf16_supported: bool = True) -> str:
    """``compute.dtype`` with ``auto`` resolved for ``device``."""
    if requested != "auto":
        return requested
    if device == "cpu":
        return "float32"
    return "bfloat16" if bf16_supported else "float16"


def resolve_autocast(requested: str, dtype: str, *, native_bf16: bool) -> str | None:
    """``compute.autocast`` resolved: None (off) or "bfloat16". Autocast only matters over float32
    weights; ``auto`` takes it only where bf16 is native (emulated, it is slower than float32)."""
    if requested == "off" or dtype != "float32":
        return None
    if requested == "bfloat16" or native_bf16:
        return "bfloat16"
    return None


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bfloat16 in hardware (torch's own probe)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def select(profile: Profile) -> Placement:
    """The placement ``profile.compute`` asks for on this machine; DeviceError when it cannot be had."""
    import psutil
    import torch

    cfg = profile.compute
    where = f"profile {profile.name} ({profile_file(profile)})"
    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise DeviceError(
            f"compute.device: cuda is requested by {where}, but torch sees no CUDA GPU on this machine "
            f"(torch {torch.__version__}, {build}). Run it on a GPU machine with the CUDA build of torch "
            f"(make setup TORCH=torch==2.13.0), or set compute.device: auto or cpu")
    host = int(psutil.virtual_memory().available)
    if cfg.device == "cpu" or not has_cuda:
        dtype = resolve_dtype("cpu", cfg.dtype)
        return Placement("cpu", dtype, cpu_name(), host, host,
                         autocast=resolve_autocast(cfg.autocast, dtype, native_bf16=cpu_has_native_bf16()))
    bf16 = torch.cuda.is_bf16_supported()
    name = torch.cuda.get_device_name(0)
    if cfg.dtype == "bfloat16" and not bf16:
        raise DeviceError(f"compute.dtype: bfloat16 is requested by {where}, but {name} has no "
                          "bfloat16 support; set compute.dtype: float16 or auto")
    free, _total = torch.cuda.mem_get_info(0)
    dtype = resolve_dtype("cuda", cfg.dtype, bf16_supported=bf16)
    return Placement("cuda", dtype, name, int(free), host, torch.cuda.device_count(),
                     autocast=resolve_autocast(cfg.autocast, dtype, native_bf16=bf16))


def profile_file(profile: Profile) -> str:
    """The YAML a profile came from, also for a run's frozen copy (for messages)."""
    return Path(profile.frozen_from or profile.source_file).name or "in memory"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def metadata(placement: Placement) -> dict[str, Any]:
    """What a stage records about where it ran: device, its name, dtype, memory (and GPU peak)."""
    out = asdict(placement)
    out["device_name"] = out.pop("name")
    if placement.device == "cuda":
        import torch

        # the allocator's peak in this process; the CUDA context itself is not included
        out["max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return out
