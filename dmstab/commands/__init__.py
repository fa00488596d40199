"""One module per `dmstab` verb: build objects from a recipe, run them, log to MLflow.

Importing this package registers dmstab's built-in components (the networks' recipe checks in
`dmstab.models`), so every recipe a command loads may name them.
"""

import dmstab.models  # noqa: F401  (registers the built-in networks)
