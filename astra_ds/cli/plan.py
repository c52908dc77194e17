"""`astra-ds plan` (memory per rank, and whether a run fits this host) and `astra-ds config show`."""

from __future__ import annotations

from astra_ds.choices import SAMPLERS
from astra_ds.cli.arguments import command_group, config_arguments
from astra_ds.config import describe, load_config
from astra_ds.errors import ConfigError
from astra_ds.libraries import quiet_libraries


def cmd_plan(args) -> None:
    cfg = load_config(args.config, args.set)
    if args.world_size < 1 or args.ranks_per_host < 1:
        raise ConfigError("--world-size and --ranks-per-host must be >= 1")
    given = [args.num_labels, args.num_train, args.num_test]
    if any(value is not None for value in given) and not all(value is not None and value >= 1 for value in given):
        raise ConfigError("--num-labels, --num-train and --num-test go together (each >= 1): the data's shape, "
                          "when it is not read from data.path")
    from astra_ds.dist import configure_accelerator

    configure_accelerator()
    quiet_libraries()
    import deepspeed  # noqa: F401  (held by every training process: the measured part of the plan includes it)
    import torch

    from astra_ds.encoder.encoder import QueryEncoder
    from astra_ds.plan import DataShape, HostFit, advice, plan_run, process_bytes
    from astra_ds.training.build import build_data, build_encoder

    if args.num_labels is None:
        _, data = build_data(cfg)
        shape = DataShape.of(data)
    else:
        data, shape = None, DataShape(args.num_labels, args.num_train, args.num_test, args.labels_per_query,
                                      args.query_tokens, args.label_tokens)
    SAMPLERS.get(cfg.negatives.strategy).import_dependencies()
    held = process_bytes()
    encoder = build_encoder(cfg, data) if data is not None else QueryEncoder(cfg.encoder, shape.num_labels)
    on_gpu = args.gpu or torch.cuda.is_available()
    plan = plan_run(cfg, shape, encoder, args.world_size, 0, on_gpu, held)
    print(plan.format())
    this_host = args.num_labels is None and (torch.cuda.is_available() or not on_gpu)
    fit = HostFit.of(plan, args.world_size, args.ranks_per_host, held, on_gpu, this_host)
    print("\n" + fit.format())
    if not fit.fits:
        raise ConfigError(f"the run does not fit this host's memory. {advice(plan)}")


def cmd_config_show(args) -> None:
    print(describe(load_config(args.config, args.set)))


def add_commands(commands) -> None:
    plan = commands.add_parser("plan", help="memory per rank of a run, and whether it fits this host",
                               description="Bytes per rank for the classifier table and its optimizer state, "
                                           "the encoder under its ZeRO stage, the index, staging buffers and "
                                           "evaluation, from the run's config and data. `train` checks the same "
                                           "plan at start-up and refuses a run that does not fit.")
    config_arguments(plan)
    plan.add_argument("--world-size", type=int, default=1, help="ranks of the run (the table is split over them)")
    plan.add_argument("--ranks-per-host", type=int, default=1, help="ranks that share this host's memory")
    plan.add_argument("--gpu", action="store_true",
                      help="plan the run as it will be on GPUs (train.ds_config auto: zero2 in bf16; the table's "
                           "step staging on the device), also from a machine without one")
    shape = plan.add_argument_group("the data's shape, when the dataset is not on this machine (all three)")
    shape.add_argument("--num-labels", type=int, help="labels L")
    shape.add_argument("--num-train", type=int, help="training queries (the validation split left out)")
    shape.add_argument("--num-test", type=int, help="test queries")
    shape.add_argument("--labels-per-query", type=float, default=5.0,
                       help="positives a training query has, on average (default 5)")
    shape.add_argument("--query-tokens", type=int, help="the longest query in tokens (default data.max_len)")
    shape.add_argument("--label-tokens", type=int,
                       help="the longest label text in tokens (default siamese.label_max_len)")
    plan.set_defaults(func=cmd_plan)

    show = command_group(commands, "config", "inspect run configs").add_parser(
        "show", help="every config key with its default and effective value",
        description="Print every key of the run config: its default, and its value after the YAML file and --set "
                    "overrides (* marks the changed ones).")
    config_arguments(show)
    show.set_defaults(func=cmd_config_show)
