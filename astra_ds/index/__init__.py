"""faiss indexes over label vectors: the kinds (registry INDEX_KINDS in astra_ds/choices.py) and the index over a
rank's rows, which ASTRA's shortlists and a finished run's serving index search."""
