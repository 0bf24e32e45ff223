"""Serving: the generation engine (:mod:`k25jax.serve.engine`), its compiled steps and prefix index.

Importing this package pulls no HTTP dependencies; the server lives in its own module.
"""
