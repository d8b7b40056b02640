"""The built-in model's sampling facts: its default steps and guidance, and where held-out seeds begin.

A module of its own, importing nothing, so that the evaluation (:mod:`probe.shapes.evaluate`) and the studies
(:mod:`probe.studies`), which draw their seeds above :data:`HELD_OUT_SEED`, share them without importing each other.
"""

HELD_OUT_SEED = 10_000  # seeds used by evaluation start here; training never draws them
STEPS = 50
GUIDANCE = 7.5
