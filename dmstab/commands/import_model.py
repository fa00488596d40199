"""`dmstab import`: a checkpoint released with a paper, as a dmstab checkpoint and MLflow run.

The published file is read by its format (`dmstab.published`) into a recipe tree and weights;
the released file's `KnownFile` settings and then the user's overrides go over the tree, which
is validated as `train` validates a recipe. The network it describes takes the weights, every
one matched, and the checkpoint is written where a training run's goes (RUN_DIR/checkpoint.pt,
the run tagged with its directory), so every command that reads a training run reads it:
`dmstab sample RUN_ID`, `fid`, `consistency`, `hessian`, `landscape`. Inputs are checked and
the file read and matched before the run opens: a refusal writes nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmstab import __version__
from dmstab.analysis.ema_profiles import sigma_rel_to_gamma
from dmstab.atomic import require_writable_directory, write_atomically
from dmstab.checkpoint import CHECKPOINT_NAME, save_checkpoint
from dmstab.config import Recipe, apply_overrides, from_written, parse_override, to_dict, to_yaml
from dmstab.console import console, result
from dmstab.errors import DmstabError
from dmstab.models import build_model
from dmstab.published import FORMATS, ImportedModel, PublishedFormat, published_format
from dmstab.reading import require_file
from dmstab.tracking import TAG_RUN_DIR, MlflowTracker, check_store_writable, tracked_run

KIND = "imported"  # the runs' dmstab.kind
SOURCE = "published checkpoint"


@dataclass(frozen=True)
class ImportResult:
    run_id: str
    checkpoint: Path
    copy: Path | None
    recipe: Recipe
    sha256: str


def format_for(path: Path, name: str | None) -> PublishedFormat:
    """`--format NAME`, or the one format that reads files with `path`'s suffix."""
    if name is not None:
        return published_format(name)
    matching = [f for f in FORMATS.values() if path.suffix.lower() in f.suffixes]
    if len(matching) != 1:
        known = ", ".join(f"{f.name} ({' '.join(f.suffixes)})" for f in FORMATS.values())
        which = "several formats" if matching else "no format"
        raise DmstabError(
            f"{which} read{'' if matching else 's'} '{path.suffix}' files; pass --format, one "
            f"of: {known}"
        )
    return matching[0]


def _given(overrides: Sequence[str]) -> dict[str, Any]:
    """`a.b=v` overrides as the flat keys a format reader takes; the last of a key wins."""
    return {".".join(key): value for key, value in map(parse_override, overrides)}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _loaded(imported: ImportedModel, recipe: Recipe, path: Path) -> dict[str, Any]:
    """The recipe's network with the file's weights, strictly: one line names the first
    parameter missing, left over or of another shape. Returns its state dict."""
    model = build_model(recipe, imported.num_classes)
    own = model.state_dict()
    weights = imported.weights
    missing = sorted(own.keys() - weights.keys())
    unexpected = sorted(weights.keys() - own.keys())
    if missing or unexpected:
        what = (
            f"the network needs {missing[0]}, which the file lacks"
            if missing
            else f"the file has {unexpected[0]}, which the network lacks"
        )
        raise DmstabError(f"{path.name} does not fit the recipe's {recipe.model.name}: {what}")
    for name, tensor in own.items():
        if weights[name].shape != tensor.shape:
            raise DmstabError(
                f"{path.name} does not fit the recipe's {recipe.model.name}: {name} is "
                f"{tuple(weights[name].shape)} in the file, {tuple(tensor.shape)} in the network"
            )
    model.load_state_dict(weights, strict=True)
    return model.state_dict()


def import_checkpoint(
    path: Path,
    overrides: Sequence[str] = (),
    *,
    format_name: str | None = None,
    out: Path | None = None,
    extra_tags: Mapping[str, str] | None = None,
    sha256: str | None = None,
) -> ImportResult:
    """Read `path`, write it as a dmstab checkpoint in a new `imported` run's directory (and a
    copy at `out`), and log the run (with `extra_tags` besides the source's). `sha256`: the
    file's digest when the caller has already read it (a released file may be gigabytes)."""
    published = format_for(path, format_name)
    require_file(path, SOURCE)
    known = next((k for k in published.known_files if k.name == path.name), None)
    settings = [*(known.overrides if known else ()), *overrides]
    given = _given(settings)
    if out is not None and out.is_dir():
        raise DmstabError(f"--out {out} is a directory; give the checkpoint's file name")
    out_dir = Path(str(given.get("train.out_dir", "runs")))
    check_store_writable(given.get("tracking.uri"))
    require_writable_directory(out_dir, "train.out_dir")
    if out is not None:
        require_writable_directory(out.parent, "the --out folder")
    imported = published.read(path, given)
    recipe = from_written(apply_overrides(imported.recipe, settings))
    weights = _loaded(imported, recipe, path)
    sha256 = sha256 or sha256_of(path)
    tags = {
        "dmstab.import.format": published.name,
        "dmstab.import.source": str(path.resolve()),
        "dmstab.import.sha256": sha256,
    }
    if known is not None:
        tags["dmstab.import.known_file"] = known.url
    tracker = MlflowTracker.start(recipe, kind=KIND, extra_tags={**tags, **(extra_tags or {})})
    assert tracker.run_id is not None
    run_dir = (out_dir / tracker.run_id).resolve()
    checkpoint = run_dir / CHECKPOINT_NAME
    with tracked_run(tracker):
        run_dir.mkdir(parents=True, exist_ok=True)
        text = to_yaml(recipe).encode()
        write_atomically(run_dir / "recipe.yaml", lambda handle: handle.write(text))
        tracker.set_tags({TAG_RUN_DIR: str(run_dir)})
        state = _checkpoint_state(weights, recipe, imported, tracker.run_id, tags)
        save_checkpoint(state, checkpoint)
        if out is not None:
            save_checkpoint(state, out)
        tracker.log_text(_describe(imported.inferred), "import/inferred.json")
        tracker.set_tags({"dmstab.checkpoint": str(checkpoint)})
        if out is not None:
            tracker.set_tags({"dmstab.checkpoint_copy": str(out.resolve())})
    return ImportResult(tracker.run_id, checkpoint, out, recipe, sha256)


def _describe(inferred: Mapping[str, Any]) -> str:
    return json.dumps(inferred, indent=1, sort_keys=True, default=str) + "\n"


def _checkpoint_state(
    weights: dict[str, Any],
    recipe: Recipe,
    imported: ImportedModel,
    run_id: str,
    tags: Mapping[str, str],
) -> dict[str, Any]:
    """What a training checkpoint holds that the commands reading one use: the weights as both
    the raw and the EMA model (a released file is one set of weights), the recipe, the classes,
    step 0 (dmstab trained it no steps), the run; and where it came from. A file that is a
    post-hoc EMA of known length (EDM2's) carries σrel and γ as `ema-reconstruct`'s outputs do."""
    sigma_rel = imported.sigma_rel
    ema_length = (
        {}
        if sigma_rel is None
        else {"sigma_rel": sigma_rel, "gamma": sigma_rel_to_gamma(sigma_rel)}
    )
    return {
        **ema_length,
        "model": weights,
        "ema": {"shadow": weights, "updates": 0},
        "step": 0,
        "recipe": to_dict(recipe),
        "num_classes": imported.num_classes,
        "run_id": run_id,
        "dmstab_version": __version__,
        "imported": {**tags, "inferred": _describe(imported.inferred)},
    }


def main(
    path: Path, overrides: Sequence[str], *, format_name: str | None, out: Path | None
) -> dict[str, Any]:
    """`dmstab import FILE [OVERRIDES] [--format NAME] [--out PATH]`: the run id on stdout, the
    rest on stderr; returns what `--json` prints."""
    imported = import_checkpoint(path, overrides, format_name=format_name, out=out)
    console.print(f"[green]done[/] imported {path.name} as run {imported.run_id}")
    console.print(f"  checkpoint  {imported.checkpoint}", highlight=False)
    if imported.copy is not None:
        console.print(f"  copy        {imported.copy}", highlight=False)
    console.print(f"  sha256      {imported.sha256}")
    console.print(f"  sample      dmstab sample {imported.run_id}")
    result(imported.run_id)
    return {
        "run_id": imported.run_id,
        "checkpoint": str(imported.checkpoint),
        "copy": None if imported.copy is None else str(imported.copy),
        "sha256": imported.sha256,
        "recipe": imported.recipe.name,
    }
