"""GPU paths, ready for a GPU host (tools/gpu_check.sh runs them there with the README run and the pager
benchmark): the rank's device, faiss-gpu against faiss on the CPU, NCCL against gloo. Here, without CUDA, they
skip with their reason (the pinned table and the side-stream prefetch: tests/test_table.py); the choice of a
rank's device is tested everywhere."""

import json
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from astra_ds.config import IndexConfig, TableConfig
from astra_ds.dist import cuda_device
from astra_ds.errors import ConfigError
from astra_ds.index.label_index import LabelIndex
from astra_ds.table import store
from astra_ds.table.table import ClassifierTable
from conftest import REPO
from test_distributed import DISTRIBUTED_RUN, _env, _losses

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: tools/gpu_check.sh on a GPU host")


def test_each_rank_takes_its_gpu_or_the_one_its_launcher_left_visible():
    assert cuda_device(0, 8) == torch.device("cuda", 0) and cuda_device(5, 8) == torch.device("cuda", 5)
    assert cuda_device(3, 1) == torch.device("cuda", 0)  # one visible GPU a rank (SLURM --gpus-per-task)
    with pytest.raises(ConfigError, match="local rank 2 but 2 GPUs visible: start at most one rank a GPU"):
        cuda_device(2, 2)


@NEEDS_CUDA
def test_faiss_gpu_builds_and_searches_as_faiss_on_the_cpu():
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss-gpu is not installed (pip install faiss-gpu)")
    table = ClassifierTable(20_000, 32, TableConfig())
    table.init_random(0)
    queries = F.normalize(torch.randn(256, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    results = {}
    for use_gpu in (False, True):
        index = LabelIndex(IndexConfig(kind="ivf_flat", nlist=64, nprobe=64, use_gpu=use_gpu), normalize_rows=True)
        index.build(table, np.random.default_rng(0))
        assert (index.gpu_resources is not None) == use_gpu
        results[use_gpu] = index.search(queries, 10)
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-4, atol=1e-5)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(results[True][1], results[False][1])])
    assert overlap >= 0.99  # ties may order differently


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL ranks do not share a device)")
def test_two_nccl_ranks_train_like_two_gloo_ranks(synth_dir, data_cache, tmp_path):
    runs = {}
    for accelerator in ("cpu", "cuda"):
        out = runs[accelerator] = tmp_path / accelerator
        args = [a for o in [*DISTRIBUTED_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}",
                            f"out_dir={out}", "train.ds_config=cpu"] for a in ("--set", o)]  # fp32 on both
        result = subprocess.run([str(REPO / "launchers" / "deepspeed_local.sh"), *args], cwd=REPO,
                                env=_env(NPROC="2", DS_ACCELERATOR=accelerator), capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    np.testing.assert_allclose(_losses(runs["cuda"]), _losses(runs["cpu"]), rtol=1e-3)
    rows = [np.asarray(store.open_table(run / "table")["rows"][:]) for run in runs.values()]
    np.testing.assert_allclose(rows[0], rows[1], rtol=1e-3, atol=1e-5)
    assert json.loads((runs["cuda"] / "model.json").read_text())["step"] == 3
