"""The benchmark tools run end to end at small sizes and print their tables (figures come from full runs)."""

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY_RUN, fresh_process_env


def _tool(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=600,
                            env=fresh_process_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_pager_prints_throughput_beside_memcpy():
    out = _tool("tools/bench_pager.py", "--labels", "1e5", "--dim", "16", "--rows", "256", "2048", "--steps", "2")
    assert "host memcpy:" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("256", "2,048"))]
    assert [(r[0], r[1]) for r in rows] == [("256", "sync"), ("256", "prefetch"), ("2,048", "sync"), ("2,048", "prefetch")]
    assert all(float(r[2]) > 0 and float(r[4]) >= 0 and r[5].endswith("%") for r in rows)  # ms, GB/s, share


def test_bench_autocast_prints_both_precisions_and_their_ratio():
    out = _tool("tools/bench_autocast.py", "--model", "tiny-random", "--batch", "4", "--encode-batch", "8",
                "--tokens", "8", "--repeats", "1")
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
def test_bench_scaling_prints_ratios_to_the_smallest_table(tmp_path):
    out = _tool("tools/bench_scaling.py", "--labels", "1e3", "1e4", "--encoder", "tiny-random", "--steps", "2",
                "--batch", "16", "--negatives", "8", "--data-root", str(tmp_path))
    rows = [line.split("|") for line in out.splitlines() if line.strip().startswith(("1,000 ", "10,000 "))]
    assert len(rows) == 2
    assert [cell.split()[1] for cell in rows[0][1:]] == ["1.00", "1.00", "1.00"]  # classifier, whole, dense
    assert all(float(cell.split()[0]) > 0 for cell in rows[1][1:])


@pytest.mark.slow
def test_ablation_prints_validation_curves_from_before_training_and_epochs_to_reach(synth_dir, token_cache, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  path: {synth_dir}\n  cache_dir: {token_cache}\n  validation_fraction: 0.25\n")
    out = _tool("tools/ablate.py", "--dataset", f"synth={config}",
                "--variant", "label_init:negatives.strategy=astra,table.init=label_text", "--seeds", "3",
                *[a for s in [*TINY_RUN, "train.max_steps=8", "eval.every_epochs=0.25",
                              "negatives.warmup_epochs=0"] for a in ("--set", s)],
                "--reach", "0", "1.01", "--out-dir", str(tmp_path / "ablation"))
    ablation = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
    assert list(ablation["results"]) == ["synth/label_init"]  # --variant without --variants: that one alone
    assert ablation["variants"]["label_init"] == ["negatives.strategy=astra", "table.init=label_text"]
    header = next(line for line in out.splitlines() if line.startswith("dataset / variant"))
    assert header.split()[3:10] == ["P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5", "P@1"]
    assert "val P@1" in header and "validation P@1 along the way" in header
    key = "synth/label_init"
    result = ablation["results"][key]
    run = tmp_path / "ablation" / f"{key}_seed3"
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


def test_bench_inference_prints_latency_and_recall():
    out = _tool("tools/bench_inference.py", "--labels", "2000", "5000", "--dim", "16", "--queries", "50",
                "--exact-queries", "5", "--encoder", "tiny-random", "--set", "kind=ivf_flat", "--set", "nprobe=1000")
    assert "encoder tiny-random, one query" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("2,000", "5,000"))]
    assert [(r[0], r[1]) for r in rows] == [("2,000", "ivf_flat"), ("5,000", "ivf_flat")]
    assert all(float(r[-1]) == 1.0 for r in rows)  # every list probed: the exact top-k


def test_bench_step_memory_prints_the_memory_and_speed_of_each_kernel_cache_capacity(synth_dir):
    out = _tool("tools/bench_step_memory.py", "--data", str(synth_dir), "--model", "tiny-random", "--steps", "3",
                "--batch-size", "8", "--max-len", "16", "--capacities", "16")  # a process a capacity
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["16"]]
    assert len(rows) == 1
    for _, first, last, growth, peak, steps_per_s in rows:
        first, last, growth, peak = (float(v.rstrip("G")) for v in (first, last, growth, peak))
        assert 0 < first <= peak and growth == pytest.approx(last - first, abs=0.011) and float(steps_per_s) > 0
    assert "distinct batch lengths" in out


def test_bench_checkpoint_prints_save_digest_and_verify_times():
    out = _tool("tools/bench_checkpoint.py", "--labels", "3e5", "--dim", "8", "--changed", "0.5")
    lines = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines()[1:] if line.strip()}
    for name in ("full save", "full digest", "next save", "next digest"):
        assert float(lines[name].split()[2]) >= 0, out
    assert "verify" in out and "digests of the first save: " in out


@pytest.mark.slow
def test_label_churn_holds_labels_out_adds_them_back_and_scores_every_model(synth_dir, token_cache, finished_run,
                                                                           tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  path: {synth_dir}\n  cache_dir: {token_cache}\n")
    out = _tool("tools/label_churn.py", "--config", str(config), "--out", str(tmp_path / "churn"), "--fraction", "0.2",
                "--full-run", str(finished_run),
                *[a for s in [*TINY_RUN, "encoder.dim=16", "table.init=label_text", "classifier.epochs=1",
                              "classifier.batch_size=64", "negatives.strategy=uniform", "batching.mode=random"]
                  for a in ("--set", s)])
    churn = json.loads((tmp_path / "churn" / "churn.json").read_text())
    held_out, table = churn["held_out"], churn["table"]
    assert len(held_out) == 10 and "10 of 50 labels held out" in out
    kept_names = (tmp_path / "churn" / "kept" / "label_names.txt").read_text().split("\n")
    all_names = (finished_run / "label_names.txt").read_text().split("\n")
    assert len(kept_names) == 40 and not {all_names[i] for i in held_out} & set(kept_names)
    assert table["kept"]["new R@5"] == 0 and table["kept"]["P@5"] == table["kept"]["old P@5"]
    added = (tmp_path / "churn" / "zero_shot" / "label_names.txt").read_text().split("\n")
    assert added == kept_names + [all_names[i] for i in held_out]  # (a): the held-out labels appended
    assert table["grown"]["train s"] > 0 and table["zero_shot"]["train s"] is None
    assert "| zero_shot |" in out and "grown training time / full's" in out


def test_bench_data_prints_preparation_against_the_tokenizer_alone_and_the_disk_a_query_takes(tmp_path):
    out = _tool("tools/bench_data.py", "--num-train", "2000", "--num-labels", "300", "--workers", "1",
                "--unit-rows", "700", "--set", "encoder.model=tiny-random", "--work-dir", str(tmp_path), "--start")
    alone = float(re.search(r"tokenizer alone \(encode_batch_fast\)\s+([\d,]+) texts/s", out)[1].replace(",", ""))
    prepared, share = re.search(r"data prepare, 1 worker\(s\)\s+([\d,]+) texts/s\s+([\d.]+) of", out).groups()
    assert alone > 0 and float(share) == pytest.approx(float(prepared.replace(",", "")) / alone, abs=0.01)
    per_query = float(re.search(r"disk: ([\d.]+) B a query \+ 4 B a positive", out)[1])
    assert 0 < per_query < 70
    seconds, private = re.search(r"start-up, prepared directory: ([\d.]+) s to the end of the first step, RssAnon "
                                 r"([\d.]+) GiB", out).groups()
    assert float(seconds) > 0 and 0.1 < float(private) < 4
