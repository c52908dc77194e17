"""Negative samplers (registry SAMPLERS in astra_ds/choices.py): uniform, ASTRA (its shortlists, the mixture),
in-batch negatives."""
