"""Reproductions and tour stages: one module per paper, each with ``run`` and ``tour_line``."""
