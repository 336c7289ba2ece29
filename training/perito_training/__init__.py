"""Perito training: datasets, architectures, training, evaluation, export and publishing."""
