"""Every file in conf/experiment/ composes and runs a fast dev run (the lightning-hydra-template test).

Experiments that need real weights or datasets get tiny stand-ins in the real on-disk formats: the
placeholders below are tiny diffusers pipeline folders and fake weight folders (fixtures in
conftest.py), and `tests.analysis.standins` writes fake CIFAR-10 files and robustness-format
checkpoints when Hydra builds them. A new experiment file without an entry in OVERRIDES fails
this test: add how to run it offline in seconds.
"""

import pytest

from equidiff.cli import experiments, run
from tests.ace.test_experiments_ace import OVERRIDES as ACE_OVERRIDES
from tests.helpers import compose_cfg
from tests.invariant.test_lightningdit import OVERRIDES as LIGHTNINGDIT_OVERRIDES
from tests.methods.test_counterfactual import OVERRIDES as CF_OVERRIDES
from tests.pcfe.test_pcfe import OVERRIDES as PCFE_OVERRIDES

STANDIN_CLASSIFIER = "tests.analysis.standins.tiny_robustness_classifier"
CIFAR_STANDINS = ["paths.data_dir={tmp}/data", "paths.weights_dir={tmp}/weights", "data.num_workers=0",
                  "data._target_=tests.analysis.standins.fake_cifar10",
                  *[f"method.classifiers.{n}._target_={STANDIN_CLASSIFIER}"
                    for n in ("eps0", "eps0_25", "eps0_5", "eps1_0")]]
# guided CIFAR-10 sampling: tiny 3x32x32 DDPM, stand-in robust ResNets, judge and energy metrics
# (FID / IS / precision-recall need >= 2048 samples and are tested in tests/metrics)
CIFAR_GUIDED = ["diffusion.path={pipeline3}", f"classifier._target_={STANDIN_CLASSIFIER}",
                "paths.weights_dir={tmp}/weights", "data.num_samples=4", "data.batch_size=2", "sampler.num_steps=2",
                "~metrics.fid", "~metrics.inception_score", "~metrics.precision_recall",
                f"metrics.judge.metric.classifier._target_={STANDIN_CLASSIFIER}"]
CIFAR_UNGUIDED = ["diffusion.path={pipeline3}", "data.num_samples=4", "data.batch_size=2", "sampler.num_steps=2",
                  "metrics=none"]
DIGITS_GUIDED = ["diffusion.path={pipeline}", "classifier.weights_path=null", "data.num_samples=4",
                 "data.batch_size=2", "sampler.num_steps=2", "metrics.judge.metric.classifier.weights_path=null"]
INVARIANT_FAST = ["data.num_queries=2", "data.samples_per_query=2", "data.batch_size=2", "method.num_steps=2",
                  "method.budget=2"]
INVARIANT_CIFAR = ["diffusion.path={pipeline3}", f"classifier._target_={STANDIN_CLASSIFIER}",
                   "paths.weights_dir={tmp}/w", "paths.data_dir={tmp}/data",
                   "data.source._target_=tests.analysis.standins.fake_cifar10", *INVARIANT_FAST]
# experiment -> (verb, overrides)
OVERRIDES = {
    # foundation
    "digits/ddpm": ("fit", ["trainer.fast_dev_run=true", "paths.cache_dir={tmp}/cache"]),
    "digits/sample": ("predict", ["diffusion.path={pipeline}", "data.num_samples=8", "data.batch_size=4",
                                  "sampler.num_steps=3"]),
    # robust-energy guidance on digits
    "digits/robust_classifier": ("fit", ["trainer.fast_dev_run=true", "paths.cache_dir={tmp}/cache",
                                         "method.adversarial.steps=1"]),
    "digits/judge_classifier": ("fit", ["trainer.fast_dev_run=true", "paths.cache_dir={tmp}/cache"]),
    "digits/robust_energy": ("predict", DIGITS_GUIDED),
    "digits/robust_accuracy": ("test", ["method.test_eps=[0,0.5]", "method.steps=2"]),
    "digits/analysis_noise_accuracy": ("test", ["method.timesteps=[0,500,999]"]),
    "digits/analysis_darkness_accuracy": ("test", ["method.timesteps=[0,500,999]"]),
    "digits/analysis_noise_energy": ("test", ["method.timesteps=[0,500,999]"]),
    "digits/analysis_class_energy_stats": ("predict", ["paths.cache_dir={tmp}/cache"]),
    # robust-energy guidance on CIFAR-10 (seed 002)
    "robust_energy/cifar10_reference_stats": ("predict", [
        "data._target_=tests.analysis.standins.fake_cifar10", "data.root={tmp}/cifar10",
        "paths.weights_dir={fidelity_weights}", "paths.cache_dir={tmp}/cache", "data.num_workers=0",
        "data.batch_size=2", "method.vgg=null"]),
    "robust_energy/cifar10_robust_accuracy": ("test", [*CIFAR_STANDINS, "method.test_eps=[0,0.5]", "method.steps=1"]),
    "robust_energy/analysis_noise_accuracy": ("test", [*CIFAR_STANDINS, "method.timesteps=[0,500]"]),
    "robust_energy/analysis_darkness_accuracy": ("test", [*CIFAR_STANDINS, "method.timesteps=[0,500]"]),
    "robust_energy/analysis_noise_energy": ("test", [*CIFAR_STANDINS, "method.timesteps=[0,500]"]),
    "robust_energy/analysis_class_energy_stats": ("predict", [*CIFAR_STANDINS, "paths.cache_dir={tmp}/cache"]),
    "robust_energy/cifar10_ddpm_baseline": ("predict", CIFAR_UNGUIDED),
    "robust_energy/cifar10_ddim_baseline": ("predict", CIFAR_UNGUIDED),
    "robust_energy/fig4_4_accumulation": ("predict", CIFAR_GUIDED),
    "robust_energy/fig4_7_two_stage": ("predict", CIFAR_GUIDED),
    "robust_energy/fig4_11_sigmoid": ("predict", CIFAR_GUIDED),
    "robust_energy/fig4_13_energy": ("predict", CIFAR_GUIDED),
    "robust_energy/fig4_14_dual": ("predict", [*CIFAR_GUIDED, "guidance.objective.class_means_path=null",
                                               "+guidance.objective.class_means=[-9,-8,-7,-6,-5,-4,-3,-2,-1,0]"]),
    "robust_energy/fig4_17_pgd": ("predict", [*CIFAR_GUIDED, "guidance.pgd_steps=2"]),
    # invariant-set sampling (seed 000)
    "invariant/cifar10_logits": ("predict", INVARIANT_CIFAR),
    "invariant/cifar10_neuron": ("predict", INVARIANT_CIFAR),
    "invariant/imagenet_dit_logits": ("predict", [
        "diffusion.path={dit}", "paths.data_dir={tmp}/data",
        "data.source._target_=tests.analysis.standins.fake_imagenet", "data.source.image_size=8",
        "classifier.weights_path=null", "classifier.name=resnet18", "classifier.image_size=32", *INVARIANT_FAST]),
    "invariant/circles_mlp": ("fit", ["trainer.fast_dev_run=true", "paths.cache_dir={tmp}/cache"]),
    "invariant/circles_ddpm": ("fit", ["trainer.fast_dev_run=true", "paths.cache_dir={tmp}/cache"]),
    "invariant/circles": ("predict", ["diffusion._target_=tests.analysis.standins.random_point_diffusion",
                                      "classifier.weights_path=null", "data.samples_per_query=2",
                                      "data.batch_size=3", "method.num_steps=2", "method.budget=2"]),
    "digits/invariant": ("predict", ["diffusion.path={pipeline}", *INVARIANT_FAST]),
    # LightningDiT + VA-VAE (seed 000's backbone): entries and stand-ins in tests/invariant/test_lightningdit.py
    **LIGHTNINGDIT_OVERRIDES,
    # counterfactual solvers (seed 001): entries in tests/methods/test_counterfactual.py
    **CF_OVERRIDES,
    # learning from p-CFEs (seed 001): entries in tests/pcfe/test_pcfe.py
    **PCFE_OVERRIDES,
    # ACE (seed 003): entries and stand-ins in tests/ace/test_experiments_ace.py
    **ACE_OVERRIDES,
}


def test_every_experiment_has_a_fast_run_entry():
    missing = sorted(set(experiments()) - set(OVERRIDES))
    assert not missing, f"add offline fast-run overrides for {missing} to tests/test_experiments.py"


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_experiment_composes_and_runs(name, tmp_path, tiny_pipeline_dir, tiny_pipeline3_dir, fidelity_weights_dir,
                                     tiny_dit_dir):
    verb, overrides = OVERRIDES[name]
    overrides = [o.format(pipeline=tiny_pipeline_dir, pipeline3=tiny_pipeline3_dir, tmp=tmp_path,
                          fidelity_weights=fidelity_weights_dir, dit=tiny_dit_dir) for o in overrides]
    cfg = compose_cfg([f"experiment={name}", f"paths.output_dir={tmp_path}/out", "trainer=cpu", *overrides])
    assert cfg.trainer.inference_mode is False
    run(cfg, verb)
    assert (tmp_path / "out" / "config.yaml").exists()
    if verb == "predict" and (cfg.get("callbacks") or {}).get("writer"):
        assert (tmp_path / "out" / "samples.npz").exists()
    if name == "digits/ddpm":
        assert not (tmp_path / "cache" / "digits_ddpm").exists(), "a fast dev run must not replace the cache"
