"""The tags dmstab sets on its MLflow runs, and the states a run ends in."""

from __future__ import annotations

from typing import Literal

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


TAG_FINGERPRINT = "dmstab.recipe_fingerprint"


TAG_RECIPE_NAME = "dmstab.recipe_name"


TAG_COMMAND = "dmstab.command"


TAG_KIND = "dmstab.kind"


TAG_RUN_DIR = "dmstab.run_dir"


# A training run's RUN_DIR/checkpoint.pt: kept there only (what --resume and every command read)
TAG_CHECKPOINT = "dmstab.checkpoint"


TAG_PARENT = "mlflow.parentRunId"


TAG_NOTE = "mlflow.note.content"  # a run's or an experiment's description (markdown) in the UI


TAG_SWEEP_FINGERPRINT = "dmstab.sweep_fingerprint"


# How a sweep parent's children were last launched, as JSON: {"launcher": "in-process"}, or
# submitit's cluster, children at once and executor parameters (`--launcher-option`).
TAG_LAUNCHER = "dmstab.launcher"


TAG_LOCAL_RUN_ID = "dmstab.local_run_id"  # an offline run's id before the server had it


# What a run that writes checkpoints other than training's (ema-reconstruct) wrote: the one
# checkpoint's path, or the folder of several, and how many (`dmstab sample` with no source).
TAG_OUTPUT = "dmstab.output"


TAG_OUTPUT_COUNT = "dmstab.output_count"


TAG_SIGMA_RELS = "dmstab.sigma_rels"  # the EMA lengths an ema-reconstruct run wrote
