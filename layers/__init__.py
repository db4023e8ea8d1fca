"""memlab layers: sequence mixers that register themselves in ``research.models.registry`` on import."""
