"""Changing a generation through its attention: guidance with attention objectives and initial-noise optimisation
(:mod:`~probe.steer.guide`), tuning-free editing by injection (:mod:`~probe.steer.edit`) with real images inverted
(:mod:`~probe.steer.inversion`), and direct interventions on the maps (:mod:`~probe.steer.intervene`). What they need
from a pipeline outside its own loop, they ask its family (:mod:`~probe.steer.pipelines`)."""
