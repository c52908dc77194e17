"""The benchmark tools run end to end at small sizes and print their tables (figures come from full runs).

Each tool runs in its own process, as a user runs it; the processes of the selected tests start together, two at
a time (most of a small run is its imports, on one core), and each test reads its tool's output."""

import json
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from conftest import REPO, TINY_RUN, fresh_process_env


def _sets(*overrides: str) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _commands(synth_dir, data_cache, finished_run, work) -> dict[str, list[str]]:
    """Each test's tool and arguments, the longest first."""
    (work / "ablation.yaml").write_text(f"data:\n  path: {synth_dir}\n  cache_dir: {data_cache}\n"
                                        f"  validation_fraction: 0.25\n")
    (work / "churn.yaml").write_text(f"data:\n  path: {synth_dir}\n  cache_dir: {data_cache}\n")
    return {
        "ablation": ["tools/ablate.py", "--dataset", f"synth={work / 'ablation.yaml'}",
                     "--variant", "label_init:negatives.strategy=astra,table.init=label_text", "--seeds", "3",
                     *_sets(*TINY_RUN, "train.max_steps=8", "eval.every_epochs=0.25", "negatives.warmup_epochs=0"),
                     "--reach", "0", "1.01", "--out-dir", str(work / "ablation")],
        "data": ["tools/bench_data.py", "--num-train", "2000", "--num-labels", "300", "--workers", "1",
                 "--unit-rows", "700", "--set", "encoder.model=tiny-random", "--work-dir", str(work / "data"),
                 "--start"],
        "churn": ["tools/label_churn.py", "--config", str(work / "churn.yaml"), "--out", str(work / "churn"),
                  "--fraction", "0.2", "--full-run", str(finished_run),
                  *_sets(*TINY_RUN, "encoder.dim=16", "table.init=label_text", "classifier.epochs=1",
                         "classifier.batch_size=64", "negatives.strategy=uniform", "batching.mode=random")],
        "scaling": ["tools/bench_scaling.py", "--labels", "1e3", "1e4", "--encoder", "tiny-random", "--steps", "2",
                    "--batch", "16", "--negatives", "8", "--data-root", str(work / "scaling")],
        "step_memory": ["tools/bench_step_memory.py", "--data", str(synth_dir), "--model", "tiny-random",
                        "--steps", "3", "--batch-size", "8", "--max-len", "16", "--capacities", "16"],
        "inference": ["tools/bench_inference.py", "--labels", "2000", "5000", "--dim", "16", "--queries", "50",
                      "--exact-queries", "5", "--encoder", "tiny-random", "--set", "kind=ivf_flat",
                      "--set", "nprobe=1000"],
        "autocast": ["tools/bench_autocast.py", "--model", "tiny-random", "--batch", "4", "--encode-batch", "8",
                     "--tokens", "8", "--repeats", "1"],
        "checkpoint": ["tools/bench_checkpoint.py", "--labels", "3e5", "--dim", "8", "--changed", "0.5"],
        "pager": ["tools/bench_pager.py", "--labels", "1e5", "--dim", "16", "--rows", "256", "2048", "--steps", "2"],
    }


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=fresh_process_env())


class ToolRuns:
    """The tools' processes, running; `work`: the directory they write under."""

    def __init__(self, work, futures: dict[str, Future]):
        self.work, self.futures = work, futures

    def output(self, name: str) -> str:
        result = self.futures[name].result()
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout


@pytest.fixture(scope="module")
def tools(request, synth_dir, data_cache, tmp_path_factory) -> ToolRuns:
    """The tool runs of the tests selected to run (a test is named test_<tool>_...), started two at a time."""
    selected = [item.name for item in request.session.items if item.module is request.module]
    wanted = lambda name: any(test.startswith(f"test_{name}_") for test in selected)  # noqa: E731
    finished_run = request.getfixturevalue("finished_run") if wanted("churn") else None
    work = tmp_path_factory.mktemp("tools")
    pool = ThreadPoolExecutor(max_workers=2)
    request.addfinalizer(pool.shutdown)
    return ToolRuns(work, {name: pool.submit(_run, args) for name, args in
                           _commands(synth_dir, data_cache, finished_run, work).items() if wanted(name)})


def test_pager_prints_throughput_beside_memcpy(tools):
    out = tools.output("pager")
    assert "host memcpy:" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("256", "2,048"))]
    assert [(r[0], r[1]) for r in rows] == [("256", "sync"), ("256", "prefetch"), ("2,048", "sync"), ("2,048", "prefetch")]
    assert all(float(r[2]) > 0 and float(r[4]) >= 0 and r[5].endswith("%") for r in rows)  # ms, GB/s, share


def test_autocast_prints_both_precisions_and_their_ratio(tools):
    out = tools.output("autocast")
    rows = [line.rsplit(None, 3) for line in out.splitlines() if line.startswith(("forward + backward", "forward ("))]
    assert len(rows) == 2
    for _, fp32, bf16, ratio in rows:
        assert float(fp32) > 0 and float(bf16) > 0
        assert float(ratio) == pytest.approx(float(fp32) / float(bf16), rel=0.05, abs=0.01)
    assert 0 < float(out.split("entry (unit-norm embeddings): ")[1].split()[0]) < 0.05
    served = re.findall(r"(float32|bfloat16|cast once) ([\d.]+) ms \(([\d.]+)x\)", out.split("one query, served: ")[1])
    assert [name for name, _, _ in served] == ["float32", "bfloat16", "cast once"]
    fp32 = float(served[0][1])
    for _, ms, ratio in served:
        assert float(ratio) == pytest.approx(fp32 / float(ms), rel=0.05, abs=0.01)


@pytest.mark.slow
def test_scaling_prints_ratios_to_the_smallest_table(tools):
    out = tools.output("scaling")
    rows = [line.split("|") for line in out.splitlines() if line.strip().startswith(("1,000 ", "10,000 "))]
    assert len(rows) == 2
    assert [cell.split()[1] for cell in rows[0][1:]] == ["1.00", "1.00", "1.00"]  # classifier, whole, dense
    assert all(float(cell.split()[0]) > 0 for cell in rows[1][1:])


@pytest.mark.slow
def test_ablation_prints_validation_curves_from_before_training_and_epochs_to_reach(tools):
    out = tools.output("ablation")
    work = tools.work
    ablation = json.loads((work / "ablation" / "ablation.json").read_text())
    assert list(ablation["results"]) == ["synth/label_init"]  # --variant without --variants: that one alone
    assert ablation["variants"]["label_init"] == ["negatives.strategy=astra", "table.init=label_text"]
    header = next(line for line in out.splitlines() if line.startswith("dataset / variant"))
    assert header.split()[3:10] == ["P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5", "P@1"]
    assert "val P@1" in header and "validation P@1 along the way" in header
    key = "synth/label_init"
    result = ablation["results"][key]
    run = work / "ablation" / f"{key}_seed3"
    assert result["seeds"] == 1 and (run / "metrics.json").is_file()
    validation = json.loads((run / "validation" / "metrics.json").read_text())
    assert validation["split"] == "validation" and result["validation"]["P@1"] == validation["astra_ds"]["P@1"]
    along = [json.loads(line)["validation_P@1"] for line in (run / "train_log.jsonl").read_text().splitlines()
             if "validation_P@1" in line]
    # (epochs, training seconds, P@1): 384 training queries, 12 steps an epoch, an evaluation every 3 steps,
    # then the validation of the model at step 8
    curve = result["P@1_curve"]
    assert [p1 for _, _, p1 in curve] == [*along, validation["astra_ds"]["P@1"]] and len(along) == 3
    assert [epochs for epochs, _, _ in curve][:3] == [0.0, 0.25, 0.5]
    line = next(line for line in out.split("epochs to reach")[1].splitlines() if line.strip().startswith(key))
    assert line.split()[1:] == ["0.00", "-"]  # P@1 >= 0 before training; 1.01 never


def test_inference_prints_latency_and_recall(tools):
    out = tools.output("inference")
    assert "encoder tiny-random, one query" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("2,000", "5,000"))]
    assert [(r[0], r[1]) for r in rows] == [("2,000", "ivf_flat"), ("5,000", "ivf_flat")]
    assert all(float(r[-1]) == 1.0 for r in rows)  # every list probed: the exact top-k


def test_step_memory_prints_the_memory_and_speed_of_each_kernel_cache_capacity(tools):
    out = tools.output("step_memory")  # a process a capacity
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["16"]]
    assert len(rows) == 1
    for _, first, last, growth, peak, steps_per_s in rows:
        first, last, growth, peak = (float(v.rstrip("G")) for v in (first, last, growth, peak))
        assert 0 < first <= peak and growth == pytest.approx(last - first, abs=0.011) and float(steps_per_s) > 0
    assert "distinct batch lengths" in out


def test_checkpoint_prints_save_digest_and_verify_times(tools):
    out = tools.output("checkpoint")
    lines = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines()[1:] if line.strip()}
    for name in ("full save", "full digest", "next save", "next digest"):
        assert float(lines[name].split()[2]) >= 0, out
    assert "verify" in out and "digests of the first save: " in out


@pytest.mark.slow
def test_churn_holds_labels_out_adds_them_back_and_scores_every_model(tools, finished_run):
    out = tools.output("churn")
    work = tools.work
    churn = json.loads((work / "churn" / "churn.json").read_text())
    held_out, table = churn["held_out"], churn["table"]
    assert len(held_out) == 10 and "10 of 50 labels held out" in out
    kept_names = (work / "churn" / "kept" / "label_names.txt").read_text().split("\n")
    all_names = (finished_run / "label_names.txt").read_text().split("\n")
    assert len(kept_names) == 40 and not {all_names[i] for i in held_out} & set(kept_names)
    assert table["kept"]["new R@5"] == 0 and table["kept"]["P@5"] == table["kept"]["old P@5"]
    added = (work / "churn" / "zero_shot" / "label_names.txt").read_text().split("\n")
    assert added == kept_names + [all_names[i] for i in held_out]  # (a): the held-out labels appended
    assert table["grown"]["train s"] > 0 and table["zero_shot"]["train s"] is None
    assert "| zero_shot |" in out and "grown training time / full's" in out


def test_data_prints_preparation_against_the_tokenizer_alone_and_the_disk_a_query_takes(tools):
    out = tools.output("data")
    alone = float(re.search(r"tokenizer alone \(encode_batch_fast\)\s+([\d,]+) texts/s", out)[1].replace(",", ""))
    prepared, share = re.search(r"data prepare, 1 worker\(s\)\s+([\d,]+) texts/s\s+([\d.]+) of", out).groups()
    assert alone > 0 and float(share) == pytest.approx(float(prepared.replace(",", "")) / alone, abs=0.01)
    per_query = float(re.search(r"disk: ([\d.]+) B a query \+ 4 B a positive", out)[1])
    assert 0 < per_query < 70
    built, seconds, private = re.search(r"start-up, prepared directory: ([\d.]+) s to the trainer built, ([\d.]+) s "
                                        r"to the end of the first step, RssAnon ([\d,.]+) MiB", out).groups()
    assert 0 < float(built) < float(seconds) and 100 < float(private.replace(",", "")) < 4096
