"""What entry points need around ``WanModel.compile_layers``: dynamo's own counters, and the on-disk cache.

``WanModel.compile_layers`` compiles one block call that every layer goes through (see its docstring for the
number of graphs). Compiling is slow on a cold start (minutes on a CPU for the 1.3B model) and fast on a warm
one: inductor keeps what it compiled (generated code, compiled kernels, AOTAutograd graphs) in its on-disk
cache, keyed by the graph and the compiler settings, and a later process with the same config loads it
instead of compiling again. Dynamo still traces each graph in every process (a second or so). The cache lives
in ``$TORCHINDUCTOR_CACHE_DIR`` (default ``<tmp>/torchinductor_<user>``); :func:`set_compile_cache_dir` points
a command-line run elsewhere (a persistent or shared folder). This module never changes dynamo's settings.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .models.wan import COMPILE_FALLBACKS

# torch.compile modes the entry points offer; "max-autotune" and "reduce-overhead" use CUDA graphs on a GPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

__all__ = ["COMPILE_FALLBACKS", "COMPILE_MODES", "CompileCounters", "compile_cache_dir", "set_compile_cache_dir"]


@dataclass
class CompileCounters:
    """A reading of dynamo's and inductor's process-wide counters (``torch._dynamo.utils.counters``).

    Subtract two readings (``after - before``) to attribute counts to what ran in between.
    """

    graphs: int = 0  # graphs dynamo captured and handed to the backend
    graph_breaks: int = 0  # places dynamo had to split a graph (compile_layers makes these errors)
    cache_hits: int = 0  # graphs inductor loaded from its on-disk cache (warm start)
    cache_misses: int = 0  # graphs inductor generated and compiled from scratch (cold start)

    @classmethod
    def read(cls) -> "CompileCounters":
        from torch._dynamo.utils import counters

        return cls(graphs=counters["stats"]["unique_graphs"], graph_breaks=counters["graph_break"].total(),
                   cache_hits=counters["inductor"]["fxgraph_cache_hit"],
                   cache_misses=counters["inductor"]["fxgraph_cache_miss"])

    def __sub__(self, other: "CompileCounters") -> "CompileCounters":
        return CompileCounters(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    @property
    def cache_state(self) -> str:
        """``warm`` (every compiled graph came from the disk cache), ``cold`` (none did), ``mixed`` or ``none``."""
        if self.cache_hits and not self.cache_misses:
            return "warm"
        if self.cache_misses and not self.cache_hits:
            return "cold"
        return "mixed" if self.cache_hits else "none"

    def as_dict(self) -> dict:
        return {**asdict(self), "cache_state": self.cache_state}


def compile_cache_dir() -> Path:
    """Where inductor reads and writes compiled artifacts in this process."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def set_compile_cache_dir(path: str | os.PathLike) -> Path:
    """Keep compiled artifacts in ``path`` (for command-line runs: sets ``TORCHINDUCTOR_CACHE_DIR`` for this
    process, before anything is compiled). Returns the absolute folder."""
    folder = Path(path).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder

