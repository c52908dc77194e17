"""`astra-ds index` and `astra-ds export`: what other serving paths read from a finished run, its serving index
and an export for sentence-transformers and faiss."""

from __future__ import annotations

from astra_ds.cli.arguments import finished_run, run_command
from astra_ds.libraries import quiet_libraries


def cmd_index(args) -> None:
    finished_run(args.run_dir)
    quiet_libraries()
    from astra_ds.rundir.run_dir import RunDir
    from astra_ds.rundir.serving_index import build_serving_index

    run = RunDir(args.run_dir)
    card = run.read_card()  # verified
    cfg = run.read_config(args.set)
    info = build_serving_index(run, cfg.index, cfg.train.seed, True, card)
    print(f"serving index ({info['kind']}) over {info['num_labels']} labels, built in {info['build_seconds']:.1f} s: "
          f"{run.serving_index_dir}")


def cmd_export(args) -> None:
    finished_run(args.run_dir)
    quiet_libraries()
    from astra_ds.inference.export import export

    out = export(args.run_dir, args.out, progress=True)
    print(f"exported to {out}: SentenceTransformer('{out}') encodes queries; {out}/labels holds the label "
          "vectors, the index and the score card")


def add_commands(commands) -> None:
    run_command(commands, "index", cmd_index, "build the serving index of a trained run",
                "A faiss index over the run's scoring vectors (classifier rows, plus label-text embeddings with dual "
                "scoring) in <run-dir>/ann/, the kind chosen by L as for training (index.kind to force one): "
                "predict and eval use it. `train` builds it at its end unless eval.ann_index=false.")
    export = commands.add_parser("export", help="export a trained run for serving",
                                 description="The encoder as a sentence-transformers model (SentenceTransformer(OUT)"
                                             " loads it), and in OUT/labels the label vectors (.npy), the faiss "
                                             "index, the label names and a card with the score formula.")
    export.add_argument("--run-dir", required=True, help="out_dir of a finished `astra-ds train`")
    export.add_argument("--out", required=True, help="a new directory")
    export.set_defaults(func=cmd_export)
