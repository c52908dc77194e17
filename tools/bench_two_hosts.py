"""The same two-rank run on one host and on two (tools/two_hosts.sh: network namespaces joined by a veth pair,
gloo over it, the deepspeed launcher with a hostfile): queries per second of the training steps and the time of
each checkpoint, side by side, measured in one run of this tool. Needs root, openssh-server and pdsh.

    python tools/bench_two_hosts.py --steps 40 --set encoder.model=all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from astra_ds.launch import free_port

REPO = Path(__file__).resolve().parents[1]
TWO_HOSTS = REPO / "tools" / "two_hosts.sh"
HOSTS = ("10.77.0.1", "10.77.0.2")


def measure(command: list[str], env: dict[str, str], out: Path, skip: int) -> dict[str, float]:
    """Run `command`; the median queries/s of its logged steps after the first `skip`, its checkpoint times."""
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"bench_two_hosts: the run failed:\n{output[-3000:]}")
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    rates = [r["queries_per_s"] for r in steps if "queries_per_s" in r and r["step"] > skip]
    saves = [float(s) for s in re.findall(r"checkpoint \S+ written in ([\d.]+) s", output)]
    return {"queries_per_s": statistics.median(rates), "checkpoint_s": statistics.median(saves),
            "checkpoints": len(saves)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synthetic", help="a dataset (default: the README's synthetic one)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_two_hosts."))
    state = work / "hosts"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env |= {"ASTRA_HOSTS_DIR": str(state), "DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "astra0",
            "DS_ENV_FILE": str(state / "deepspeed_env"), "PDSH_SSH_ARGS_APPEND": f"-F {state / 'ssh_config'}"}
    subprocess.run([TWO_HOSTS, "up"], env=env, check=True, capture_output=True)
    try:
        (work / "hostfile").write_text("".join(f"{host} slots=1\n" for host in HOSTS))

        def train_args(out: Path) -> list[str]:
            overrides = [f"data.path={Path(args.data).resolve()}", f"out_dir={out}", f"train.max_steps={args.steps}",
                         "train.log_every=1", f"checkpoint.save_every={max(1, args.steps // 4)}",
                         "eval.ann_index=false", *args.set]
            return ["--no-eval", *[a for o in overrides for a in ("--set", o)]]

        runs = {}
        for name, launch in (("1 host x 2 ranks", ["deepspeed", "--num_accelerators", "2"]),
                             ("2 hosts x 1 rank", ["deepspeed", "--hostfile", str(work / "hostfile"),
                                                   "--master_addr", HOSTS[0], "--no_ssh_check"])):
            out = work / name.replace(" ", "_")
            command = [str(TWO_HOSTS), "run", "0", *launch, "--master_port", str(free_port()), "--module",
                       "astra_ds", "train", *train_args(out)]
            runs[name] = measure(command, env, out, skip=3)
    finally:
        subprocess.run([TWO_HOSTS, "down"], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    base = runs["1 host x 2 ranks"]
    print(f"{args.steps} steps, {' '.join(args.set) or 'default config'}; median of the steps after the third")
    print(f"{'launch':<18}{'queries/s':>11}{'ratio':>8}{'checkpoint s':>14}{'ratio':>8}")
    for name, run in runs.items():
        print(f"{name:<18}{run['queries_per_s']:>11.1f}{run['queries_per_s'] / base['queries_per_s']:>8.2f}"
              f"{run['checkpoint_s']:>14.2f}{run['checkpoint_s'] / base['checkpoint_s']:>8.2f}")


if __name__ == "__main__":
    main()
