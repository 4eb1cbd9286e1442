"""ACE through the writer: an interrupted run resumes to the same files and metrics as an uninterrupted one."""

import json

import numpy as np
import pytest

from equidiff.cli import run
from equidiff.errors import ConfigError
from tests.helpers import compose_cfg, load_samples

TINY = ["method.pre_explanation.iterations=2", "method.pre_explanation.num_steps=10", "method.pre_explanation.tau=2",
        "classifier.weights_path=null", "data.predict_split=val", "+data.val_fraction=0.006",
        "metrics.cout.metric.num_steps=4", "trainer=cpu", "logger=csv"]


def _run(pipeline, out, *extra):
    run(compose_cfg(["experiment=digits/ace", f"diffusion.path={pipeline}", f"paths.output_dir={out}", *TINY,
                     *extra]), "predict")
    return load_samples(out)


@pytest.fixture(scope="module")
def straight(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ace_straight")
    return out, _run(tiny_pipeline_dir, out, "data.batch_size=4")


def test_resume_after_interruption_gives_the_same_explanations_and_metrics(tiny_pipeline_dir, tmp_path, straight):
    ref_dir, ref = straight
    out = tmp_path / "resumed"
    stop = ["+callbacks.stop._target_=tests.helpers.FailAfterBatches", "+callbacks.stop.n=1", "data.batch_size=4"]
    with pytest.raises(RuntimeError, match="simulated preemption"):
        _run(tiny_pipeline_dir, out, *stop)
    written = sorted(p.name for p in (out / "samples").glob("*.npz"))
    assert len(written) == 4 and not (out / "samples.npz").exists()
    # resumed with another batch size: the explanations depend on the seeds alone
    resumed = _run(tiny_pipeline_dir, out, "data.batch_size=3")
    assert resumed["seeds"].tolist() == ref["seeds"].tolist()
    np.testing.assert_array_equal(resumed["images"], ref["images"])
    for seed in ref["seeds"]:
        a, b = np.load(out / "samples" / f"{seed:06d}.npz"), np.load(ref_dir / "samples" / f"{seed:06d}.npz")
        for key in ("pre_explanation_uint8", "mask", "success", "target", "l1"):
            np.testing.assert_array_equal(a[key], b[key])
    # the metrics cover all samples, those of the interrupted run included
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(
        json.loads((ref_dir / "metrics.json").read_text()))
    assert (out / "explanations.png").exists()


def test_bad_settings_fail_before_anything_is_written(tiny_pipeline_dir, tmp_path):
    for bad, match in (("method.pre_explanation.tau=11", "beyond the 10-step"),
                       ("method.post_processing.threshold=1.5", r"threshold u must be in \[0, 1\]")):
        with pytest.raises(Exception) as err:
            _run(tiny_pipeline_dir, tmp_path / "bad", bad)
        chain = [err.value, err.value.__cause__]
        assert any(isinstance(e, ConfigError) and __import__("re").search(match, str(e)) for e in chain), chain
        assert not (tmp_path / "bad").exists()
