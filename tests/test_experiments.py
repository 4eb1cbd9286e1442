"""Every file in conf/experiment/ composes and runs a fast dev run (the lightning-hydra-template test).

Experiments that need real weights or datasets get tiny stand-ins written here in the real
on-disk formats. A new experiment file without an entry in OVERRIDES fails this test: add how to
run it offline in seconds.
"""

import pytest

from equidiff.cli import experiments, run
from tests.helpers import compose_cfg

# experiment -> (verb, overrides); "{pipeline}" is a tiny DDPMPipeline folder, "{tmp}" a temp folder
OVERRIDES = {
    "digits/ddpm": ("fit", ["trainer.fast_dev_run=true", "paths.cache_dir={tmp}/cache"]),
    "digits/sample": ("predict", ["diffusion.path={pipeline}", "data.num_samples=8", "data.batch_size=4",
                                  "sampler.num_steps=3"]),
}


def test_every_experiment_has_a_fast_run_entry():
    missing = sorted(set(experiments()) - set(OVERRIDES))
    assert not missing, f"add offline fast-run overrides for {missing} to tests/test_experiments.py"


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_experiment_composes_and_runs(name, tmp_path, tiny_pipeline_dir):
    verb, overrides = OVERRIDES[name]
    overrides = [o.format(pipeline=tiny_pipeline_dir, tmp=tmp_path) for o in overrides]
    cfg = compose_cfg([f"experiment={name}", f"paths.output_dir={tmp_path}/out", "trainer=cpu", *overrides])
    assert cfg.trainer.inference_mode is False
    run(cfg, verb)
    assert (tmp_path / "out" / "config.yaml").exists()
    if verb == "predict":
        assert (tmp_path / "out" / "samples.npz").exists()
    if name == "digits/ddpm":
        assert not (tmp_path / "cache" / "digits_ddpm").exists(), "a fast dev run must not replace the cache"
