"""The settings of the libraries astra_ds runs on: offline models, quiet logs, and what their native code prints
(faiss's clustering warnings, DeepSpeed's op builds) summarised into the log."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager

log = logging.getLogger("astra_ds")


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are never downloaded
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
