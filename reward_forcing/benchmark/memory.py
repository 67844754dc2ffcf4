"""Memory figures of a benchmark: the peak of each phase, and the bytes a model's weights take."""
from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch

from ..quantize import stored_bytes


class PeakMemory:
    """Peak memory of a phase. GPU: ``torch.cuda.max_memory_allocated`` (reset per phase); CPU: the process's
    peak RSS (VmHWM, reset per phase through /proc/self/clear_refs where the kernel allows it, otherwise the
    lifetime maximum ``ru_maxrss``). ``process_peak_bytes`` is the maximum over all phases."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "max_rss"
        self._process_peak = 0

    def reset(self) -> None:
        self._process_peak = max(self._process_peak, self.peak_bytes())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "max_rss_lifetime"  # cannot reset: the phase figure includes everything before it

    def peak_bytes(self) -> int:
        """Peak since the last reset."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
            if match:
                return int(match.group(1)) * 1024
        except OSError:
            pass
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def process_peak_bytes(self) -> int:
        return max(self._process_peak, self.peak_bytes())


def weight_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of a model's parameters as stored (quantized ones by their parts), each shared tensor counted once (0
    for no model)."""
    return 0 if module is None else stored_bytes(module)
