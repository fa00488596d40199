"""The one package that talks to MLflow: the client and its store (`client`), the run a
command logs to (`tracker`), runs spooled while a server was away (`spool`, `sync`), finding
runs (`runs`) and the tags dmstab sets (`tags`)."""

from dmstab.tracking.client import (
    DEFAULT_TRACKING_URI,
    browse_hint,
    check_store_writable,
    is_remote,
    resolve_uri,
    run_page,
)
from dmstab.tracking.figures import log_figure_at_step, save_figure
from dmstab.tracking.runs import (
    ListedRun,
    RunRecord,
    find_finished_run,
    find_resumable_run,
    find_runs,
    latest_checkpoint_run,
    latest_run,
    metric_history,
    recent_runs,
    run_directory,
    run_info,
    run_record,
)
from dmstab.tracking.sync import sync
from dmstab.tracking.tags import (
    TAG_CHECKPOINT,
    TAG_FINGERPRINT,
    TAG_KIND,
    TAG_LAUNCHER,
    TAG_OUTPUT,
    TAG_OUTPUT_COUNT,
    TAG_PARENT,
    TAG_RECIPE_NAME,
    TAG_RUN_DIR,
    TAG_SIGMA_RELS,
    TAG_SWEEP_FINGERPRINT,
)
from dmstab.tracking.tracker import MlflowTracker, NullTracker, Tracker, tracked_run

__all__ = [
    "DEFAULT_TRACKING_URI",
    "TAG_CHECKPOINT",
    "TAG_FINGERPRINT",
    "TAG_KIND",
    "TAG_LAUNCHER",
    "TAG_OUTPUT",
    "TAG_OUTPUT_COUNT",
    "TAG_PARENT",
    "TAG_RECIPE_NAME",
    "TAG_RUN_DIR",
    "TAG_SIGMA_RELS",
    "TAG_SWEEP_FINGERPRINT",
    "ListedRun",
    "MlflowTracker",
    "NullTracker",
    "RunRecord",
    "Tracker",
    "browse_hint",
    "check_store_writable",
    "find_finished_run",
    "find_resumable_run",
    "find_runs",
    "is_remote",
    "latest_checkpoint_run",
    "latest_run",
    "log_figure_at_step",
    "metric_history",
    "recent_runs",
    "resolve_uri",
    "run_directory",
    "run_info",
    "run_page",
    "run_record",
    "save_figure",
    "sync",
    "tracked_run",
]
