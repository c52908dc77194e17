"""The settings of the libraries astra_ds runs on: offline models, quiet logs, what their native code prints
(faiss's clustering warnings, DeepSpeed's op builds) summarised into the log, and a module of DeepSpeed imported
without the compiler it does not need here."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import logging
import os
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager

log = logging.getLogger("astra_ds")

KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, ideep's (PyTorch)
KERNEL_CACHE_CAPACITY = 64  # kernels each keeps (tools/bench_step_memory.py: the speed and memory by capacity)
DEEPSPEED_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def release_free_memory() -> None:
    """Hands the pages of freed blocks back to the system (glibc's malloc_trim; elsewhere nothing).

    Called after each step that trains the encoder on the CPU and after each batch of an encoding pass. Their
    activations are blocks of a few MiB whose sizes change with each batch's length; glibc raises its mmap
    threshold after each large free, so such blocks soon come from the heap, where the free ones stay resident,
    fragmented, and the resident size grows step after step. Trimmed after each step, it stays at one step's, for a
    few percent of those steps' speed (docs/ablations.md has the measurements, and the alternatives tried)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def bound_kernel_caches() -> None:
    """Caps the two caches of compiled matmul kernels at KERNEL_CACHE_CAPACITY each, unless their variables are set
    already: oneDNN's (ONEDNN_PRIMITIVE_CACHE_CAPACITY) and PyTorch's in front of it (ideep's, LRU_CACHE_CAPACITY;
    0 crashes it). Under bfloat16 autocast on a CPU the matmuls run through oneDNN, which compiles a kernel for each
    shape; both caches keep 1024 by default, and batches padded to their longest text bring new shapes at nearly
    every length, so the kernels of past lengths pile up. At 64, training steps run as fast
    (tools/bench_step_memory.py measures both). Both are read at the first kernel: call this before
    the first bfloat16 matmul."""
    for variable in KERNEL_CACHES:
        os.environ.setdefault(variable, str(KERNEL_CACHE_CAPACITY))


def quiet_tokenizers() -> None:
    """Hugging Face's settings that need no import: offline, and one thread a tokenizer (processes give the
    parallelism)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are never downloaded
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_libraries() -> None:
    quiet_tokenizers()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it reports each CPU variant it tries


@contextmanager
def native_output_logged(what: str, level: int = logging.INFO):
    """C++ code writes to the process's stdout and stderr itself, past Python's logging: during the block both go
    to a temporary file, then into the log at `level`, each distinct line once with its count ("faiss training:
    WARNING clustering 50 points to 7 centroids ... (x96)"). Keep the block to the library call: Python's own
    output inside it is captured the same way."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(1), os.dup(2)
        os.dup2(captured.fileno(), 1)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            captured.seek(0)
            lines = Counter(line.strip() for line in captured.read().decode(errors="replace").splitlines())
            for line, count in lines.items():
                if line:
                    log.log(level, "%s: %s%s", what, line, f" (x{count})" if count > 1 else "")


def import_uncompiled(module: str) -> None:
    """Imports `module` (unless it is imported already) with torch.compile standing aside: the functions it
    compiles as it is imported stay eager.

    For DeepSpeed's Muon optimizer module (DEEPSPEED_MUON), which ZeRO imports to check any optimizer's type and
    which compiles its kernels at import: that brings in torch's inductor compiler, about 3 s of every training
    process's start-up on 2 cores. The engine imports it so when the ds_config's optimizer is not Muon."""
    if module in sys.modules:
        return
    import torch

    compile_ = torch.compile
    torch.compile = _eager
    try:
        importlib.import_module(module)
    except ImportError:  # a DeepSpeed release without it: nothing to spare
        pass
    finally:
        torch.compile = compile_


def _eager(model=None, **options):
    """torch.compile's calling convention, compiling nothing: the function, or (given options alone) a decorator
    that returns its function."""
    return model if model is not None else (lambda function: function)
