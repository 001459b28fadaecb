"""Tile sizes: the autotuning candidates, their pruning, and launching through the chosen one.

Each kernel file lists its candidate tiles with :func:`tile_config`, passes
them through :func:`configs_or_interpreter`, and gives the autotuner a
:func:`pruner` built on its own ``fits`` rule (register and shared-memory
limits measured with ptxas). The tuning keys are bucketed sizes
(:func:`bucket`), so that a new n or m of the same power of two reuses the
choice; :class:`TunedLaunch` then launches straight through it.
"""

from __future__ import annotations

import inspect

from ._dispatch import interpreting
from ._triton import cdiv, next_power_of_2, triton

__all__ = [
    "AUTOTUNE_DISK_CACHE",
    "TunedLaunch",
    "bucket",
    "configs_or_interpreter",
    "pick_block",
    "prune_configs",
    "pruner",
    "tile_config",
]

#: Below this many (bucketed) entries of the cost, a call is launch-bound:
#: take one config instead of compiling and timing several.
_SMALL_PROBLEM = 1 << 22


def bucket(size: int) -> int:
    """Power-of-two bucket of a size, at least 16 (the autotuning keys)."""
    return max(16, next_power_of_2(max(int(size), 1)))


def pick_block(size: int, max_block: int, chunk_cost: int) -> int:
    """Chunk width in {16, ..., max_block} for a dimension of ``size``.

    Minimises the padded work ``chunks * block`` plus ``chunk_cost`` per chunk
    (the price of one more pass: a reload, or a recomputed probability tile);
    ties go to the wider block. tl.dot needs every dim >= 16.
    """
    best, best_cost = None, None
    b = max_block
    while b >= 16:
        chunks = cdiv(size, b)
        cost = chunks * b + chunks * chunk_cost
        if best_cost is None or cost < best_cost:
            best, best_cost = b, cost
        b //= 2
    return best


def _autotune_disk_cache() -> dict:
    """``{"cache_results": True}`` when this Triton's autotuner can keep its timings on disk."""
    try:
        params = inspect.signature(triton.autotune).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return {}
    return {"cache_results": True} if "cache_results" in params else {}


#: Extra keywords of every ``triton.autotune`` here: the timings of each tuning
#: key are kept on disk (Triton's cache directory, TRITON_CACHE_DIR; keyed by
#: the kernel's source, the GPU, the key and the candidate configs), so that a
#: new process reuses the config chosen before instead of timing them all
#: again; it also keeps the chosen config, hence the results, the same from
#: one run to the next. Empty on a Triton without the option (before 3.2).
AUTOTUNE_DISK_CACHE = _autotune_disk_cache()


def tile_config(block_m: int, block_n: int, warps: int, stages: int):
    """One autotuning candidate: a (BLOCK_M, BLOCK_N) tile, warps, pipeline stages."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def _interpreter_config():
    # The interpreter runs every program in Python: one small tile, no tuning.
    # BLOCK_N = 16 < BLOCK_M = 32 so that small tests cross several column tiles.
    return triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)


def configs_or_interpreter(configs):
    """``configs`` for a GPU, a single small tile under the interpreter."""
    return [_interpreter_config()] if interpreting() else list(configs)


def pruner(fits):
    """The ``early_config_prune`` hook of a kernel: :func:`prune_configs` with its ``fits``."""
    def prune(configs, named_args, **kwargs):
        return prune_configs(configs, {**named_args, **kwargs}, fits)
    return prune


def prune_configs(configs, args: dict, fits):
    """Shared pruning of the autotune configs (listed largest tile first).

    Drops tiles larger than the bucketed problem and those for which the
    kernel-specific ``fits(config, args)`` says no (register spills or shared
    memory overflow, measured offline with ptxas for sm_90). Problems below
    ``_SMALL_PROBLEM`` entries keep only the smallest remaining tile (no
    timing, one compilation). Always returns at least one config.
    """
    if interpreting():
        return [_interpreter_config()]
    n_bucket = args.get("N_BUCKET", 1 << 30)
    m_bucket = args.get("M_BUCKET", 1 << 30)
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= max(32, n_bucket) and c.kwargs["BLOCK_N"] <= max(32, m_bucket) and fits(c, args)
    ]
    if not kept:
        kept = [configs[-1]]
    if n_bucket * m_bucket <= _SMALL_PROBLEM:
        kept = [kept[-1]]
    return kept


class TunedLaunch:
    """Launch an autotuned kernel through the config it chose, on the hot path.

    Triton's autotuner rebuilds its key from every argument at each call
    (tens of microseconds for our 25-40 arguments), which bounds the
    iteration time of small problems. The launchers here know their key:
    the first call with a key goes through the autotuner (tuning it once);
    later calls launch the underlying kernel with the cached config.
    """

    def __init__(self, kernel):
        self._kernel = kernel
        self._configs: dict = {}

    def __call__(self, key, grid, *args, **kwargs):
        cfg = self._configs.get(key)
        if cfg is None:
            self._kernel[grid](*args, **kwargs)
            best = getattr(self._kernel, "best_config", None)
            if best is not None:
                self._configs[key] = best
            return
        self._kernel.fn[grid](*args, **kwargs, **cfg.all_kwargs())
