"""Several ranks on CPU (gloo): 2-rank training under each launcher that runs here equals 1-rank training on
the same global batch and seeds, and a failing or hanging rank ends the job with its error."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from astra_ds.launch import free_port
from astra_ds.table import store
from conftest import REPO, TINY_RUN, run_main

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# every distributed path at once: a table split in two shards, ASTRA shortlists merged across the ranks' indexes
# (exact, so that they cannot differ), NGAME clusters broadcast from rank 0, in-batch negatives split by owner
DISTRIBUTED_RUN = [*TINY_RUN, "train.max_steps=3", "train.log_every=1", "table.chunk_mb=0.002",
                   "negatives.strategy=astra", "negatives.warmup_epochs=0", "index.kind=flat",
                   "negatives.in_batch=true", "batching.mode=clustered", "batching.warmup_epochs=0",
                   "batching.cluster_size=4", "encoder.learn_score=true"]
# the three stages, two steps each (256 of the 512 queries a step): the Siamese gathers of queries and of label
# texts, the classifier stage on embeddings every rank holds, then the joint stage; the rows' softmax, whose
# sums over negatives run across the ranks' shards, with in-batch labels split by owner
STAGED_RUN = ["siamese.epochs=1", "classifier.epochs=1", "train.epochs=1", "train.batch_size=256",
              "classifier.batch_size=256", "table.init=label_text", "eval.label_text_weight=0.5",
              "train.max_steps=6", "classifier.loss=softmax", "negatives.in_batch=true", "eval.neighbour_weight=0.5"]
LAUNCHERS = {"deepspeed": "launchers/deepspeed_local.sh", "mpirun": "launchers/mpirun.sh"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return env | {"MASTER_PORT": str(free_port())} | extra


@pytest.fixture(scope="module")
def ds_config(tmp_path_factory):
    """ZeRO-2 with an Adam whose step grows with the gradient (eps = 1, far above sqrt(v)): a wrong scale of
    the encoder's gradients under several ranks changes the weights (with eps = 1e-8, Adam would hide it)."""
    path = tmp_path_factory.mktemp("ds") / "zero2_scale_sensitive.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 0.02, "eps": 1.0, "torch_adam": True}},
                                "zero_optimization": {"stage": 2}}))
    return path


def _args(synth_dir, data_cache, ds_config, out, *overrides: str) -> list[str]:
    args = []
    for override in [*DISTRIBUTED_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}", f"out_dir={out}",
                     f"train.ds_config={ds_config}", *overrides]:
        args += ["--set", override]
    return args


def _losses(out) -> list[float]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def one_rank(synth_dir, data_cache, ds_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_rank")
    run_main("train", *_args(synth_dir, data_cache, ds_config, out))
    return out


def test_two_ranks_train_like_one(one_rank, synth_dir, data_cache, ds_config, tmp_path):
    """Under the deepspeed launcher (mpirun runs the same and more in the tests of the stages and of a grown run)."""
    out = tmp_path / "two_ranks"
    result = subprocess.run([LAUNCHERS["deepspeed"], *_args(synth_dir, data_cache, ds_config, out)], cwd=REPO,
                            env=_env(NPROC="2"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "2 ranks" in result.stdout + result.stderr

    _assert_trained_alike(out, one_rank)


def _assert_trained_alike(out, one_rank) -> None:
    """The same losses, rows, encoder weights and metrics as the one-rank run."""
    assert len(_losses(out)) == 3
    np.testing.assert_allclose(_losses(out), _losses(one_rank), rtol=1e-4)
    rows = [np.asarray(store.open_table(run / "table")["rows"][:]) for run in (out, one_rank)]
    np.testing.assert_allclose(rows[0], rows[1], rtol=1e-4, atol=1e-6)
    encoders = [torch.load(run / "encoder.pt") for run in (out, one_rank)]
    for name, weight in encoders[1].items():
        torch.testing.assert_close(encoders[0][name], weight, rtol=1e-4, atol=1e-5)
    metrics = [json.loads((run / "metrics.json").read_text())["astra_ds"] for run in (out, one_rank)]
    assert metrics[0] == pytest.approx(metrics[1], abs=1e-9)  # evaluated with the top-k merged across ranks


def test_two_ranks_run_the_stages_like_one(synth_dir, data_cache, ds_config, tmp_path):
    runs = {ranks: tmp_path / f"ranks{ranks}" for ranks in (1, 2)}
    run_main("train", *_args(synth_dir, data_cache, ds_config, runs[1], *STAGED_RUN))
    result = subprocess.run([LAUNCHERS["mpirun"], *_args(synth_dir, data_cache, ds_config, runs[2], *STAGED_RUN)],
                            cwd=REPO, env=_env(NPROC="2"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    stages = [[(r["stage"], r["loss"]) for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
               if "loss" in r] for run in (runs[1], runs[2])]
    assert [s for s, _ in stages[0]] == ["siamese"] * 2 + ["classifier"] * 2 + ["joint"] * 2 == [s for s, _ in stages[1]]
    np.testing.assert_allclose([loss for _, loss in stages[1]], [loss for _, loss in stages[0]], rtol=1e-4)
    for name in ("table", "label_embeddings", "neighbours"):  # neighbours: the training queries' embeddings
        rows = [np.asarray(store.open_table(run / name)["rows"][:]) for run in (runs[2], runs[1])]
        # atol 1e-5, as for the encoders' weights: after six steps through every stage, the ranks' other order of
        # summation leaves up to 6e-6 on a few entries of rows of size 0.01-0.25 (DeepSpeed 0.19.8, torch 2.13)
        np.testing.assert_allclose(rows[0], rows[1], rtol=1e-4, atol=1e-5)
    metrics = [json.loads((run / "metrics.json").read_text())["astra_ds"] for run in (runs[2], runs[1])]
    assert metrics[0] == pytest.approx(metrics[1], abs=1e-9)


FAILING_JOB = {"deepspeed": ["deepspeed", "--num_accelerators", "2", "--module", "tests.failing_rank", "train"],
               "mpirun": ["mpirun", "-np", "2", "python", "-m", "tests.failing_rank", "train"]}


# a rank's error under each launcher (each ends the job its own way); a hang is found by the ranks' collective
# timeout, whatever the launcher
@pytest.mark.parametrize("launcher, failure", [("deepspeed", "error"), ("mpirun", "error"), ("mpirun", "hang")])
def test_a_failing_rank_ends_the_job_with_its_error(launcher, failure):
    started = time.monotonic()
    result = subprocess.run(FAILING_JOB[launcher], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=_env(DS_ACCELERATOR="cpu", TEST_FAILURE=failure, TEST_TIMEOUT_S="6"))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    if failure == "error":
        assert "rank 1 failed" in output and "injected failure on rank 1" in output
    else:
        assert "rank 0 failed (a collective timed out" in output
    assert time.monotonic() - started < 120


# ---- two hosts: network namespaces with their own sshd (tools/two_hosts.sh), one file system ------------------

TWO_HOSTS = REPO / "tools" / "two_hosts.sh"
HOST_ADDRS = ("10.77.0.1", "10.77.0.2")


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    """The state directory of two hosts (ssh config, client key, deepspeed_env), or a skip saying why they cannot
    be made on this machine; taken down at the end, also when a test fails."""
    import shutil

    if os.geteuid() != 0:
        pytest.skip("two hosts need network namespaces (ip netns), which need root")
    missing = [tool for tool in ("ip", "/usr/sbin/sshd", "pdsh", "ssh-keygen") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"two hosts need {', '.join(missing)} (apt-get install openssh-server pdsh)")
    state = tmp_path_factory.mktemp("hosts")
    env = os.environ | {"ASTRA_HOSTS_DIR": str(state)}
    up = subprocess.run([TWO_HOSTS, "up"], env=env, capture_output=True, text=True, timeout=120)
    try:
        if up.returncode != 0 and "Operation not permitted" in up.stderr:
            pytest.skip(f"ip netns is not permitted here: {up.stderr.strip().splitlines()[-1]}")
        assert up.returncode == 0, up.stderr
        yield state
    finally:
        subprocess.run([TWO_HOSTS, "down"], env=env, capture_output=True, timeout=120)


def _on_host(host: int, *command: str) -> list[str]:
    return [str(TWO_HOSTS), "run", str(host), *command]


def _host_env(state, port: int) -> dict[str, str]:
    """What a launch on a host needs: DeepSpeed's CPU accelerator, gloo on the hosts' link, the launchers' ssh."""
    return _env(DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="astra0", MASTER_PORT=str(port),
                DS_ENV_FILE=str(state / "deepspeed_env"), PDSH_SSH_ARGS_APPEND=f"-F {state / 'ssh_config'}")


def _run_on_hosts(commands: list[list[str]], env: dict[str, str]) -> str:
    """Each command started at once (one a host), all waited for; their output."""
    jobs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for command in commands]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    for job, output in zip(jobs, outputs):
        assert job.returncode == 0, output[-4000:]
    return "\n".join(outputs)


def test_the_deepspeed_launcher_with_a_hostfile_trains_two_hosts_like_one_rank(two_hosts, one_rank, synth_dir,
                                                                                 data_cache, ds_config, tmp_path):
    """pdsh over ssh starts a launch.py on each host (its node rank, the exports of DS_ENV_FILE), which starts the
    host's rank; rank 0's host is the rendezvous. (Several ranks a host: the local launches.)"""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{addr} slots=1\n" for addr in HOST_ADDRS))
    out = tmp_path / "run"
    port = free_port()
    output = _run_on_hosts([_on_host(0, "deepspeed", "--hostfile", str(hostfile), "--master_addr", HOST_ADDRS[0],
                                     "--master_port", str(port), "--no_ssh_check", "--module", "astra_ds", "train",
                                     *_args(synth_dir, data_cache, ds_config, out))], _host_env(two_hosts, port))
    assert "2 ranks" in output and f"{HOST_ADDRS[1]}: " in output  # a rank ran on host 1
    _assert_trained_alike(out, one_rank)


def test_one_launcher_a_host_trains_two_hosts_like_one_rank(two_hosts, one_rank, synth_dir, data_cache, ds_config,
                                                            tmp_path):
    """Without ssh between the hosts (Kubernetes, some clusters): each host runs its own launcher (here deepspeed
    --no_ssh; torchrun in the tests of a lost and a preempted host) with its node rank and rank 0's address."""
    out, port = tmp_path / "run", free_port()
    args = _args(synth_dir, data_cache, ds_config, out)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{addr} slots=1\n" for addr in HOST_ADDRS))
    commands = [_on_host(host, "deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(host),
                         "--master_addr", HOST_ADDRS[0], "--master_port", str(port), "--module", "astra_ds", "train",
                         *args) for host in (0, 1)]
    assert "2 ranks" in _run_on_hosts(commands, _host_env(two_hosts, port))
    _assert_trained_alike(out, one_rank)


def test_a_run_whose_nodes_do_not_share_out_dir_ends_at_start_up_in_one_line(two_hosts, synth_dir, data_cache,
                                                                             ds_config, tmp_path):
    """Host 1 mounts a node-local file system over the run's parent directory (its own mount namespace): every
    rank stops before training, naming the rank, its host and the path; nothing is half written."""
    local = tmp_path / "node_local"
    local.mkdir()
    out, port = local / "run", free_port()
    args = _args(synth_dir, data_cache, ds_config, out)
    torchrun = ["torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--master_addr", HOST_ADDRS[0], "--master_port",
                str(port), "-m", "astra_ds", "train", *args]
    commands = [_on_host(0, *torchrun[:5], "--node_rank", "0", *torchrun[5:]),
                _on_host(1, "sh", "-c", f'mount -t tmpfs node_local "{local}" && exec "$@"', "sh", *torchrun[:5],
                         "--node_rank", "1", *torchrun[5:])]
    jobs = [subprocess.Popen(command, cwd=REPO, env=_host_env(two_hosts, port), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for command in commands]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert all(job.returncode != 0 for job in jobs)
    expected = (f"astra-ds: error: out_dir {out} is not shared between the nodes: rank 1 on {socket.gethostname()} "
                "does not see what rank 0 wrote there")
    assert all(expected in output for output in outputs), outputs[0][-3000:]
    assert f'File "{REPO / "astra_ds"}' not in "".join(outputs)  # torchrun's own traceback only, none of ours
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoints"]  # nothing trained or half written
    assert not any((out / "checkpoints").iterdir())


def _two_host_job(two_hosts, args: list[str], port: int) -> list[subprocess.Popen]:
    """torchrun on each host, each in its own process group (to take a host away: kill its group)."""
    torchrun = ["torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--master_addr", HOST_ADDRS[0],
                "--master_port", str(port)]
    return [subprocess.Popen(_on_host(host, *torchrun, "--node_rank", str(host), "-m", "astra_ds", "train", *args),
                             cwd=REPO, env=_host_env(two_hosts, port), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True) for host in (0, 1)]


def _take_host_away(host: int) -> None:
    """Every process of the host but its sshd (which later tests use) is killed at once, as when a node dies."""
    import psutil

    pids = subprocess.run(["ip", "netns", "pids", f"astra_h{host}"], capture_output=True, text=True).stdout.split()
    for pid in map(int, pids):
        try:
            process = psutil.Process(pid)
            if "sshd" not in " ".join(process.cmdline()):
                process.kill()
        except psutil.NoSuchProcess:
            pass


def _wait_for_steps(log, count: int, jobs) -> None:
    deadline = time.monotonic() + 300
    while not (log.is_file() and sum('"loss"' in line for line in log.read_text().splitlines()) >= count):
        assert all(job.poll() is None for job in jobs) and time.monotonic() < deadline, "the job ended early"
        time.sleep(0.1)


def test_a_lost_host_ends_the_other_in_one_line_and_the_run_resumes_on_the_rest(two_hosts, synth_dir, data_cache,
                                                                                ds_config, tmp_path):
    """Host 1's launcher and rank are killed mid-run: rank 0 ends within the collective timeout, naming the lost
    rank and host; the last checkpoint verifies, and `--resume auto` on host 0 alone (one rank) continues it."""
    from astra_ds.training.checkpoint import check_checkpoint, checkpoints_in

    out, port = tmp_path / "run", free_port()
    args = _args(synth_dir, data_cache, ds_config, out, "train.max_steps=12", "checkpoint.save_every=2",
                 "train.collective_timeout_s=15")
    jobs = _two_host_job(two_hosts, args, port)
    _wait_for_steps(out / "train_log.jsonl", 3, jobs)
    lost_at = time.monotonic()
    _take_host_away(1)
    output = jobs[0].communicate(timeout=120)[0]
    jobs[1].communicate(timeout=60)
    assert jobs[0].returncode != 0 and time.monotonic() - lost_at < 60
    expected = f"astra-ds: error: rank 0 lost rank 1 on {socket.gethostname()} ({HOST_ADDRS[1]}) ("
    assert expected in output, output[-3000:]
    assert f'File "{REPO / "astra_ds"}' not in output  # one line, no traceback of ours
    last = checkpoints_in(out / "checkpoints")[0]  # a save cut short by the loss (.tmp) is not one
    meta = check_checkpoint(last)
    assert meta["world_size"] == 2 and meta["step"] >= 2

    resumed = subprocess.run(_on_host(0, sys.executable, "-m", "astra_ds", "train", "--resume", "auto", *args),
                             cwd=REPO, env=_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {last} (step {meta['step']}" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 12


def test_a_sigterm_to_one_host_stops_both_at_the_same_step_with_one_checkpoint(two_hosts, synth_dir, data_cache,
                                                                               ds_config, tmp_path):
    """A preempted node: only host 1's rank gets SIGTERM; the stop, all-reduced each step, reaches host 0."""
    import psutil

    out, port = tmp_path / "run", free_port()
    jobs = _two_host_job(two_hosts, _args(synth_dir, data_cache, ds_config, out, "train.max_steps=100000",
                                          "train.epochs=1000"), port)
    _wait_for_steps(out / "train_log.jsonl", 2, jobs)
    rank1 = [p for p in psutil.Process(jobs[1].pid).children(recursive=True) if "astra_ds" in " ".join(p.cmdline())
             and "torchrun" not in " ".join(p.cmdline())]
    rank1[0].send_signal(15)
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert "stopped by SIGTERM at step" in outputs[0], outputs[0][-3000:]
    step = int(outputs[0].split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert (out / "checkpoints" / "latest").read_text() == f"global_step{step}"
    assert [p.name for p in (out / "checkpoints").glob("global_step*")].count(f"global_step{step}") == 1
    meta = json.loads((out / "checkpoints" / f"global_step{step}" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == step


def test_two_ranks_start_a_grown_run_like_one(finished_run, synth_dir, data_cache, ds_config, tmp_path):
    """A run from a finished run on a grown label set (training/from_run.py): the new labels' rows, mapped from
    their texts by a map every rank fits on text embeddings summed over the ranks, then the classifier steps."""
    from test_labels import NEW, _grown_data

    data = _grown_data(synth_dir, tmp_path / "data", np.random.default_rng(1).permutation(50), NEW)
    runs = {ranks: tmp_path / f"ranks{ranks}" for ranks in (1, 2)}
    grown = ["encoder.dim=16", "siamese.epochs=0", "train.epochs=0", "classifier.epochs=1", "table.init=label_text",
             f"data.path={data}"]
    run_main("train", *_args(synth_dir, data_cache, ds_config, runs[1], *grown), "--init-from", str(finished_run))
    result = subprocess.run([LAUNCHERS["mpirun"], *_args(synth_dir, data_cache, ds_config, runs[2], *grown),
                             "--init-from", str(finished_run)],
                            cwd=REPO, env=_env(NPROC="2"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    np.testing.assert_allclose(_losses(runs[2]), _losses(runs[1]), rtol=1e-4)
    rows = [np.asarray(store.open_table(run / "table")["rows"][:]) for run in (runs[2], runs[1])]
    np.testing.assert_allclose(rows[0], rows[1], rtol=1e-4, atol=1e-6)
