"""Analyses of trained models and training runs."""
