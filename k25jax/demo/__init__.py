"""The shipped demo model (``--model tiny``): a small K2.5 trained with k25jax's own QAT on generated chat tasks.

- :mod:`k25jax.demo.tasks`: the seeded task generator (arithmetic, decimal comparison, tool use, images, video)
  and the scorer that grades replies;
- :mod:`k25jax.demo.build`: the recipe, ``python -m k25jax.demo.build`` (data, tokenizer, init, QAT, export);
- :mod:`k25jax.demo.evaluate`: held-out accuracy through the public API, ``python -m k25jax.demo.evaluate``;
- :mod:`k25jax.demo.shipped`: where the release lives and how ``tiny`` / ``tiny-random`` resolve.
"""
