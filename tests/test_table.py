"""The classifier table against dense PyTorch references: the same rows, the same loss, torch.optim updates."""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from astra_ds.config import TableConfig
from astra_ds.table import store
from astra_ds.table.pager import RowPager
from astra_ds.table.table import ClassifierTable, round_to_bfloat16

L, D = 40, 8


def _loss(rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """A loss with a different gradient for every row occurrence."""
    return (torch.tanh(rows * queries).sum(-1) * torch.arange(1, len(rows) + 1)).sum()


def _batches(steps: int, seed: int = 0):
    """Label ids per step, with repeats inside a step, and matching random queries."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        ids = torch.from_numpy(rng.integers(0, L, size=25))
        ids[5:10] = ids[0]  # repeated ids
        yield ids, torch.from_numpy(rng.standard_normal((25, D)).astype(np.float32))


def _sparse_run(cfg: TableConfig, steps: int) -> torch.Tensor:
    table = ClassifierTable(L, D, cfg)
    table.init_random(seed=3)
    for ids, queries in _batches(steps):
        block, slots = table.fetch(ids)
        _loss(block.weights[slots], queries).backward()
        table.apply_gradients([block])
    return table.rows.clone()


def _initial_rows(cfg: TableConfig) -> torch.Tensor:
    table = ClassifierTable(L, D, cfg)
    table.init_random(seed=3)
    return table.rows.clone()


def test_rowwise_adagrad_matches_dense_reference():
    cfg = TableConfig(optimizer="rowwise_adagrad", lr=0.1)
    weights = _initial_rows(cfg).requires_grad_(True)
    accumulator = torch.zeros(L)
    for ids, queries in _batches(6):
        weights.grad = None
        _loss(weights[ids], queries).backward()
        with torch.no_grad():
            touched = torch.zeros(L, dtype=torch.bool)
            touched[ids] = True
            accumulator[touched] += weights.grad[touched].pow(2).mean(1)
            weights[touched] -= cfg.lr * weights.grad[touched] / (accumulator[touched].sqrt() + cfg.eps)[:, None]
    torch.testing.assert_close(_sparse_run(cfg, 6), weights.detach(), rtol=1e-5, atol=1e-6)


def test_rowwise_adagrad_with_one_column_is_torch_adagrad():
    global D
    saved, D = D, 1
    try:
        cfg = TableConfig(optimizer="rowwise_adagrad", lr=0.1, eps=1e-10)
        weights = torch.nn.Parameter(_initial_rows(cfg))
        optimizer = torch.optim.Adagrad([weights], lr=cfg.lr, eps=cfg.eps)
        for ids, queries in _batches(6):
            optimizer.zero_grad()
            _loss(weights[ids], queries).backward()
            optimizer.step()
        torch.testing.assert_close(_sparse_run(cfg, 6), weights.detach(), rtol=1e-5, atol=1e-6)
    finally:
        D = saved


@pytest.mark.parametrize("cfg, torch_optimizer", [
    (TableConfig(optimizer="lazy_adam", lr=0.05, betas=[0.8, 0.95]),
     lambda p, cfg: torch.optim.Adam([p], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)),
    (TableConfig(optimizer="lazy_sgd", lr=0.5, momentum=0.8),
     lambda p, cfg: torch.optim.SGD([p], lr=cfg.lr, momentum=cfg.momentum)),
], ids=["lazy_adam", "lazy_sgd"])
def test_lazy_optimizers_match_their_torch_optimizer_per_row(cfg, torch_optimizer):
    """Lazy Adam / SGD with momentum = torch.optim.Adam / SGD on each row, stepped only on the steps whose batch
    contains the row."""
    initial = _initial_rows(cfg)
    params = [torch.nn.Parameter(initial[i].clone()) for i in range(L)]
    optimizers = [torch_optimizer(p, cfg) for p in params]
    for ids, queries in _batches(6):
        for p in params:
            p.grad = None
        _loss(torch.stack([params[i] for i in ids.tolist()]), queries).backward()
        for i in set(ids.tolist()):
            optimizers[i].step()
    torch.testing.assert_close(_sparse_run(cfg, 6), torch.stack([p.detach() for p in params]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "lazy_adam", "lazy_sgd"])
def test_accumulated_blocks_equal_one_block(optimizer):
    """Gradient accumulation: two blocks (overlapping rows) applied together = one block of both batches."""
    cfg = TableConfig(optimizer=optimizer, lr=0.1)
    (ids_a, q_a), (ids_b, q_b) = list(_batches(2))
    split, joint = ClassifierTable(L, D, cfg), ClassifierTable(L, D, cfg)
    split.init_random(1)
    joint.init_random(1)
    blocks = []
    for ids, queries in ((ids_a, q_a), (ids_b, q_b)):
        block, slots = split.fetch(ids)
        _loss(block.weights[slots], queries).backward()
        blocks.append(block)
    split.apply_gradients(blocks)
    block, slots = joint.fetch(torch.cat([ids_a, ids_b]))
    rows = block.weights[slots]
    (_loss(rows[:25], q_a) + _loss(rows[25:], q_b)).backward()
    joint.apply_gradients([block])
    torch.testing.assert_close(split.rows, joint.rows, rtol=1e-5, atol=1e-6)
    for name in split.optimizer.state:
        torch.testing.assert_close(split.optimizer.state[name], joint.optimizer.state[name])


def test_untouched_rows_do_not_change():
    cfg = TableConfig(lr=0.5)
    table = ClassifierTable(L, D, cfg)
    table.init_random(0)
    before = table.rows.clone()
    block, slots = table.fetch(torch.tensor([3, 7, 3]))
    block.weights[slots].sum().backward()
    table.apply_gradients([block])
    changed = (table.rows != before).any(1).nonzero().flatten().tolist()
    assert changed == [3, 7]


def test_shards_are_chunk_aligned_and_cover_all_rows():
    for num_labels, chunk, world in [(100, 7, 3), (10, 20, 4), (64, 8, 8), (1000, 1, 7)]:
        ranges = [store.ShardGeometry(num_labels, chunk, world).range(r) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == num_labels
        for (_, end), (start, _) in zip(ranges, ranges[1:]):
            assert end == start
        assert all(start % chunk == 0 or start == num_labels for start, _ in ranges)  # empty shards at the end


def test_init_and_save_load_do_not_depend_on_world_size(tmp_path):
    cfg = TableConfig(chunk_mb=D * 4 * 5 / 2**20)  # 5 rows a chunk
    whole = ClassifierTable(L, D, cfg)
    whole.init_random(seed=9)
    shards = [ClassifierTable(L, D, cfg, rank=r, world_size=3) for r in range(3)]
    for shard in shards:
        shard.init_random(seed=9)
        assert shard.start % 5 == 0
    torch.testing.assert_close(torch.cat([s.rows for s in shards]), whole.rows)

    whole.optimizer.state["sum"].uniform_()
    whole.create_store(tmp_path / "table")
    whole.save(tmp_path / "table")
    for rank, shard in enumerate(shards):
        shard.load(tmp_path / "table")
        torch.testing.assert_close(shard.rows, whole.rows[shard.start:shard.end])
        torch.testing.assert_close(shard.optimizer.state["sum"], whole.optimizer.state["sum"][shard.start:shard.end])

    # shards write their own rows of one table
    shards[0].create_store(tmp_path / "joint")
    for shard in shards:
        shard.save(tmp_path / "joint")
    reloaded = ClassifierTable(L, D, cfg)
    reloaded.load(tmp_path / "joint")
    torch.testing.assert_close(reloaded.rows, whole.rows)


def test_fetch_rejects_rows_of_another_shard():
    shard = ClassifierTable(L, D, TableConfig(chunk_mb=D * 4 * 10 / 2**20), rank=1, world_size=2)
    with pytest.raises(IndexError):
        shard.fetch(torch.tensor([0]))


def test_load_rejects_a_table_of_another_shape(tmp_path):
    ClassifierTable(L, D, TableConfig()).create_store(tmp_path / "t")
    with pytest.raises(ValueError, match="expected"):
        ClassifierTable(L + 1, D, TableConfig()).load(tmp_path / "t")


def test_a_table_smaller_than_a_chunk_is_one_chunk_of_its_size(tmp_path):
    table = ClassifierTable(L, D, TableConfig())  # 32 MB chunks hold far more than L rows
    table.init_random(seed=0)
    table.create_store(tmp_path / "t")
    table.save(tmp_path / "t")
    rows = store.open_table(tmp_path / "t")["rows"]
    assert rows.chunks == (L, D)
    assert (tmp_path / "t" / "rows" / "c" / "0" / "0").stat().st_size == L * D * 4  # no padding to 32 MB


def test_unchanged_chunks_link_or_are_written_across_file_systems(tmp_path):
    cfg = TableConfig(chunk_mb=D * 4 * 5 / 2**20)  # 5 rows a chunk
    table = ClassifierTable(L, D, cfg)
    table.init_random(seed=3)
    table.save_files(tmp_path / "first", previous=None)  # as a checkpoint component
    block, slots = table.fetch(torch.tensor([7]))  # row 7: chunk 1 only
    block.weights[slots].sum().backward()
    table.apply_gradients([block])
    shm = Path("/dev/shm")
    other_fs = tmp_path.stat().st_dev != shm.stat().st_dev if shm.is_dir() else False
    targets = [tmp_path / "second"] + ([Path(tempfile.mkdtemp(dir=shm)) / "second"] if other_fs else [])
    for target in targets:
        table.create_store(target)
        table.save(target, unchanged_from=tmp_path / "first")
        np.testing.assert_array_equal(np.asarray(store.open_table(target)["rows"][:]), table.rows.numpy())
    linked = [os.path.samefile(tmp_path / "first" / "rows" / "c" / str(c) / "0",
                               targets[0] / "rows" / "c" / str(c) / "0") for c in range(L // 5)]
    assert linked == [c != 1 for c in range(L // 5)]
    for target in targets[1:]:  # another file system: written, not linked
        shutil.rmtree(target.parent)


def test_stochastic_rounding_to_bfloat16_is_unbiased_and_picks_a_neighbour():
    values = torch.tensor([1.0 + 2**-9, -3.3, 1e-3, 0.1234567])  # each between two bfloat16 numbers
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([round_to_bfloat16(values, generator).float() for _ in range(4000)])
    for column, value in enumerate(values):
        low, high = sorted(draws[:, column].unique().tolist())  # exactly two outcomes, around the value
        assert low < value < high and (high - low) <= abs(value) * 2**-7
        assert value.to(torch.bfloat16).float().item() in (low, high)  # the nearest one among them
    torch.testing.assert_close(draws.mean(0), values, rtol=2e-4, atol=0)  # unbiased, unlike round-to-nearest


def test_bfloat16_table_updates_in_float32_and_rounds_to_a_neighbour(tmp_path):
    """A step of a bfloat16 table = the float32 update of the widened rows, rounded to one of its two
    neighbouring bfloat16 numbers; saving and loading keeps the bits and the rounding stream."""
    cfg = TableConfig(lr=0.1, dtype="bfloat16")
    table = ClassifierTable(L, D, cfg)
    table.init_random(seed=3)
    reference = ClassifierTable(L, D, TableConfig(lr=0.1))
    reference.rows.copy_(table.rows.float())
    assert table.rows.dtype == torch.bfloat16 and table.rows.element_size() == 2
    for ids, queries in list(_batches(3)):
        for t in (table, reference):
            block, slots = t.fetch(ids)
            assert block.weights.dtype == torch.float32
            _loss(block.weights[slots], queries).backward()
            t.apply_gradients([block])
        # the float32 result lies within one bfloat16 step of the stored row
        step = reference.rows.abs() * 2**-7
        assert ((table.rows.float() - reference.rows).abs() <= step).all()
        assert (table.rows.float() != reference.rows.to(torch.bfloat16).float()).any()  # not round-to-nearest
        reference.rows.copy_(table.rows.float())  # next step from the same rows
        reference.optimizer.state["sum"].copy_(table.optimizer.state["sum"])

    table.create_store(tmp_path / "t")
    table.save(tmp_path / "t")
    assert (tmp_path / "t" / "rows" / "c" / "0" / "0").stat().st_size == L * D * 2
    resumed = ClassifierTable(L, D, cfg)
    resumed.load(tmp_path / "t")
    assert torch.equal(resumed.rows.view(torch.int16), table.rows.view(torch.int16)) and resumed.updates == 3
    for t in (table, resumed):  # the next update rounds the same way
        block, slots = t.fetch(torch.arange(L))
        block.weights[slots].sum().backward()
        t.apply_gradients([block])
    assert torch.equal(resumed.rows.view(torch.int16), table.rows.view(torch.int16))

    widened = ClassifierTable(L, D, TableConfig())  # a float32 run can start from the bfloat16 table
    widened.load(tmp_path / "t", rows_only=True)
    assert torch.equal(widened.rows, _stored_rows(tmp_path / "t"))


def _stored_rows(path) -> torch.Tensor:
    bits = torch.from_numpy(np.asarray(store.open_table(path)["rows"][:]).view(np.int16))
    return bits.view(torch.bfloat16).float()


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason="needs CUDA (tools/gpu_check.sh runs it on a GPU host)"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefetch_one_step_ahead_with_the_overlap_patch_equals_fetching_in_order(dtype, device):
    """Rows of step t + 1 read before step t's update: the rows that update changed are patched, so training
    is the same as fetching each step's rows after the previous update. On CUDA: the table in pinned memory,
    the prefetch through pinned staging buffers on a side stream."""
    cfg = TableConfig(lr=0.3, dtype=dtype)
    steps = [(ids, queries.to(device)) for ids, queries in _batches(6, seed=5)]
    in_order, ahead = ClassifierTable(L, D, cfg, device), ClassifierTable(L, D, cfg, device)
    assert ahead.rows.is_pinned() == (device == "cuda")
    in_order.init_random(2)
    ahead.init_random(2)
    for ids, queries in steps:
        block, slots = in_order.fetch(ids)
        _loss(block.weights[slots], queries).backward()
        in_order.apply_gradients([block])

    pager = RowPager(ahead)
    assert (pager.copy_stream is not None) == (device == "cuda")
    prefetched, patched_rows = pager.prefetch(steps[0][0]), 0
    for t, (ids, queries) in enumerate(steps):
        stale = prefetched.weights.clone()
        block, slots = pager.fetch(ids, prefetched)
        patched_rows += int((stale != block.weights.detach()).any(1).sum())
        _loss(block.weights[slots], queries).backward()
        if t + 1 < len(steps):
            prefetched = pager.prefetch(steps[t + 1][0])  # before this step's update
        pager.apply_gradients([block])
    assert patched_rows > 0  # steps share rows: the patch was needed
    assert torch.equal(ahead.rows.view(torch.int16 if dtype == "bfloat16" else torch.int32),
                       in_order.rows.view(torch.int16 if dtype == "bfloat16" else torch.int32))


def test_prefetch_more_than_one_step_ahead_or_for_other_ids_is_refused():
    pager = RowPager(ClassifierTable(L, D, TableConfig()))
    early = pager.prefetch(torch.tensor([1, 2]))
    for _ in range(2):
        block, slots = pager.table.fetch(torch.tensor([2, 3]))
        block.weights[slots].sum().backward()
        pager.apply_gradients([block])
    with pytest.raises(RuntimeError, match="one step ahead"):
        pager.fetch(torch.tensor([1, 2]), early)
    with pytest.raises(ValueError, match="other label ids"):
        pager.fetch(torch.tensor([1, 5]), pager.prefetch(torch.tensor([1, 2])))
