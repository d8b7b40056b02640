"""The studies behind the figures and tables, one module per line of work; studies compute, :mod:`probe.plots` draws.

- :mod:`~probe.studies.probing`: linear probes read what cross- vs self-attention encode of single-object images,
  by layer and step (Free-Prompt-Editing's probing argument).
- :mod:`~probe.studies.overlap`: how the subjects' maps overlap, step by step, and how well each statistic separates
  images with a subject missing or mixed from images with every subject present, read at step 10 of 50 (cause) and
  at the last step (an outcome read-out) (Marioriyad et al.'s entity-missing argument).
- :mod:`~probe.studies.editing`: self- vs cross-attention injection editing (:func:`probe.steer.edit.study`),
aggregated.
- :mod:`~probe.studies.guidance`: does guidance that lowers overlap raise the share of images with every subject
  present (missing and mixing beside), beyond Attend-and-Excite? :mod:`~probe.studies.self_cross`: the same for
  Self-Cross guidance on similar subjects.
- :mod:`~probe.studies.intervention`: a pre-registered experiment that moves the subjects' maps' overlap directly
  (``probe study intervention run|analyse E``); not part of ``run_all``, its analysed tables are checked with the rest.
- :mod:`~probe.studies.report`: every study, every figure and table, from fixed seeds, and their index; every
  headline recomputed from the per-image tables (:func:`~probe.studies.report.headline_differences`).

Each study module declares its :class:`~probe.studies.registry.Study` at its bottom (title, study function, tables,
headline and how it is recomputed, answer, figures); importing this package imports every study module, which
registers them, and the report and the command line read the registry (:mod:`probe.studies.registry`): a new study
is one module, imported here.

Statistics (clustered bootstrap, paired tests, Holm, power) live in :mod:`probe.analysis.stats`; the maths of maps and
overlap in :mod:`probe.analysis.maps` / :mod:`probe.analysis.overlap`. Every study uses fixed seeds, records in chunks
and reduces each
chunk to what it keeps, so memory does not grow with the number of images; ``quick=True`` shrinks every size. The
shapes-world judge is the default; any callable ``judge(image, prompt)`` returning per-subject objects with
``.status`` (and ``.detection.mask`` for positions) can replace it (:func:`probe.judges.judge_from_spec`).
"""

from probe.studies import intervention  # noqa: F401  (registers the intervention study)
from probe.studies.editing import edit_headline, edit_study
from probe.studies.guidance import guidance_headline, guidance_study
from probe.studies.overlap import overlap_headline, overlap_study
from probe.studies.probing import probe_headline, probe_study
from probe.studies.registry import Study, get_study, register, registered_studies, study_names, unregister
from probe.studies.report import headline_differences, recompute_headlines, run_all
from probe.studies.self_cross import self_cross_headline, self_cross_study

__all__ = ["STUDIES", "Study", "edit_headline", "edit_study", "get_study", "guidance_headline", "guidance_study",
           "headline_differences", "overlap_headline", "overlap_study", "probe_headline", "probe_study",
           "recompute_headlines", "register", "registered_studies", "run_all", "self_cross_headline",
           "self_cross_study", "study_names", "unregister"]


def __getattr__(name: str):
    """``STUDIES``: the names of the studies ``run_all`` runs, read from the registry when asked (a study registered
    later is in it)."""
    if name == "STUDIES":
        return study_names(in_run_all=True)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
