"""How a run presents itself in `mlflow ui`: its name and its description, from the recipe.

A run is named after what sets it apart, `quickstart·clts·s0` or `cifar10_clts·lr=2e-4·s1`
(the recipe, the method unless the recipe's name says it, the overrides, the seed), and
described in markdown: what it reproduces, the paper's table or figure and the paper's number.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmstab.config.schema import Recipe

SEPARATOR = "·"
NAMED_OVERRIDES = 3  # a name shows this many overrides, then how many more there are
# Overrides that do not change what a run computes, left out of its name.
_UNNAMED_PREFIXES = ("tracking.", "train.seed=", "train.device=", "train.out_dir=", "name=")


def method(recipe: Recipe) -> str:
    """The training method in a word: a GAN's network, EDM's formulation, or a DDPM run's
    timestep sampler (AAAI's CLTS against uniform)."""
    if recipe.model.adversarial:
        return recipe.model.name
    if recipe.diffusion.formulation == "edm":
        return "edm"
    return recipe.timesteps.sampler


def run_name(recipe: Recipe, overrides: Sequence[str] = (), kind: str = "train") -> str:
    """`recipe·method·key=value…·sSEED` for a training run (the first overrides by their last
    key part, then `+N` for the rest); for any other run, the name of the training run it reads
    (its recipe's `tracking.run_name`, else the recipe's name) and its kind:
    `quickstart·clts·s0·sample`."""
    if kind != "train":
        return SEPARATOR.join([recipe.tracking.run_name or recipe.name, kind])
    parts = [recipe.name]
    if method(recipe) not in recipe.name:
        parts.append(method(recipe))
    named = []
    for override in overrides:
        if not override.startswith(_UNNAMED_PREFIXES):
            key, _, value = override.partition("=")
            named.append(f"{key.rpartition('.')[2]}={value}")
    parts += named[:NAMED_OVERRIDES]
    if len(named) > NAMED_OVERRIDES:
        parts.append(f"+{len(named) - NAMED_OVERRIDES}")
    parts.append(f"s{recipe.train.seed}")
    return SEPARATOR.join(parts)


def _network(recipe: Recipe) -> str:
    width = getattr(recipe.model, "channels", None)
    return f"{recipe.model.name}" + (f" ({width} channels)" if width else "")


def setup_summary(recipe: Recipe) -> str:
    """One line: the network, the method, the data and the length of training."""
    length = (
        f"{recipe.train.kimg:g} kimg" if recipe.train.kimg > 0 else f"{recipe.train.steps} steps"
    )
    if recipe.model.adversarial:
        how = "GAN"
    elif recipe.diffusion.formulation == "edm":
        how = "EDM"
    else:
        d = recipe.diffusion
        how = f"DDPM ({d.schedule} schedule, {d.steps} steps, {d.target}-prediction)"
    return (
        f"{how} with {_network(recipe)}, {method(recipe)} training, {length} of batch "
        f"{recipe.train.batch_size} on {recipe.data.name} at {recipe.data.resolution}px"
    )


def run_description(recipe: Recipe, kind: str) -> str:
    """Markdown for the run page: what the run is, what it reproduces, the paper's number."""
    lines = [f"**{kind}** run of recipe `{recipe.name}`: {setup_summary(recipe)}."]
    paper = recipe.paper
    if paper.source:
        lines.append(f"Reproduces {paper.table or 'a result'} of *{paper.source}*.")
        if paper.values:
            values = ", ".join(f"{paper.metric} {v:g} at {k}" for k, v in paper.values.items())
            lines.append(f"Paper: {values}.")
        if paper.notes:
            lines.append(paper.notes)
    else:
        lines.append("Not a paper result: a recipe for trying dmstab out.")
    return "\n\n".join(lines)


def experiment_description(recipe: Recipe) -> str:
    """Markdown for the experiment: the recipe family its runs belong to."""
    paper = recipe.paper
    where = f" They reproduce *{paper.source}*." if paper.source else ""
    return (
        f"Runs of dmstab recipes logged to experiment `{recipe.tracking.experiment}`, first "
        f"created by recipe `{recipe.name}`.{where} Each run's description says what it is; "
        "tags `dmstab.kind` and `mlflow.parentRunId` link analyses to the runs they read."
    )
