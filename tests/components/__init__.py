"""Toy components registered from outside the package, each in one module, and their tests:
a network, a prediction target, a sampler and an analysis, driven through the real commands."""
