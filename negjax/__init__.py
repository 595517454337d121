"""negjax: dense-retriever training in JAX/Flax with global in-batch negatives and
offline-mined hard negatives."""

__version__ = "0.2.0"
