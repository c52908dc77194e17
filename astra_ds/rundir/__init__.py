"""The run directory's format: a RunDir owns every file name of a run (rundir/run_dir.py), the model card, the
serving index files, the verification of a finished run's digests and the lock."""
