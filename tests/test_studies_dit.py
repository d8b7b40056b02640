"""Every study on the diffusion transformers (SD3, FLUX) at quick sizes: headlines recomputed from the per-image
tables, probes on both attention kinds, edits of generated and rendered sources."""

import numpy as np
import pytest
from test_studies import CHEAP, SHORT_INITNO, _parity_judge

import probe
from probe.studies.editing import edit_study
from probe.studies.guidance import guidance_study
from probe.studies.overlap import overlap_study
from probe.studies.probing import probe_study

STEPS = 3


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def dit(request):
    return probe.load(request.param)


def test_guidance_study_on_a_transformer_reproduces_its_rates_from_its_images(dit, tmp_path):
    study = guidance_study(dit, n_images=2, steps=STEPS, quick=True, out=tmp_path, schedule=CHEAP,
                           initno_settings=SHORT_INITNO, judge=_parity_judge, progress=False)
    images = study.images
    assert set(zip(images.method, images.initno)) == {("none", False), ("ae", False), ("ae", True), ("iou", False),
                                                      ("iou", True)}
    assert np.isfinite(images[["soft_iou_t10", "soft_iou_end", "com_distance_end"]].to_numpy()).all()
    for (method, initno), rows in images.groupby(["method", "initno"]):
        row = study.summary.set_index(["method", "initno"]).loc[(method, initno)]
        assert row.missing_rate == pytest.approx(rows.missing.mean())
        assert row.mixed_rate == pytest.approx((rows.mixed & ~rows.missing).mean())  # exclusive: missing comes first
    assert images[images.method != "none"].loss_start.notna().all()


def test_probe_and_overlap_studies_read_both_attention_kinds_of_a_transformer(dit, tmp_path):
    probed = probe_study(dit, steps=STEPS, quick=True, out=tmp_path, progress=False)
    assert set(probed.accuracy.kind) == {"cross", "self"}
    assert probed.accuracy.accuracy.between(0, 1).all()
    overlap = overlap_study(dit, steps=STEPS, quick=True, out=tmp_path, judge=_parity_judge, progress=False)
    assert len(overlap.metrics) > 0 and overlap.metrics.soft_iou.between(0, 1).all()


def test_edit_study_on_a_transformer_edits_generated_and_rendered_sources(dit, tmp_path):
    study = edit_study(dit, steps=2, quick=True, out=tmp_path, progress=False)
    rows = study.results
    assert set(rows.origin) == {"generated", "rendered"} and set(rows.inject) >= {"self", "none"}
    assert rows.n_layers[rows.inject == "self"].gt(0).all()
