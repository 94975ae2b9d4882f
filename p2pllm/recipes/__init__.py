"""Recipes that build artefacts shipped with p2pllm: the bundled default models (``shakespeare``)."""
