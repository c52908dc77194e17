"""Datasets: readers of the XC file formats (registry READERS in astra_ds/choices.py), the synthetic generator,
the token cache."""
