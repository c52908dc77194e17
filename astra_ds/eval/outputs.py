"""The files an evaluation writes into its directory (a run directory, or one of its evals/<n>)."""

METRICS_FILE = "metrics.json"  # the metrics, with what was evaluated (step, dataset, split, search)
PREDICTIONS_FILE = "predictions.npz"  # the top-k ids and scores of every query
