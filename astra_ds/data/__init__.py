"""Datasets: readers of the XC file formats (registry READERS in astra_ds/choices.py), the synthetic generator,
the preparation every run reads its data through, and the prepared directory."""
