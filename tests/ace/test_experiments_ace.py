"""Every ACE experiment composes and runs offline in seconds with tiny stand-ins (the entries proposed for
tests/test_experiments.py::OVERRIDES), and writes its explanations."""

import json

import numpy as np
import pytest

from equidiff.cli import experiments, run
from tests.helpers import compose_cfg

# the 3 x 32 x 32 tiny DDPM, one PGD iteration, random classifiers / oracles in the released layouts,
# torch-fidelity's Inception replaced by a fake extractor (FID needs >= 2 samples only)
ACE_COMMON = ["diffusion.path={pipeline3}", "data.num_workers=0", "data.batch_size=2",
              "method.pre_explanation.iterations=1", "metrics.fid.metric.min_samples=0",
              "metrics.fid.metric.extractor._target_=tests.metrics.fakes.FakeExtractor",
              "~metrics.fid.metric.extractor.weights_path", "+metrics.fid.metric.extractor.in_features=3072",
              "metrics.cout.metric.num_steps=2"]
ACE_FACES = [*ACE_COMMON, "data.image_size=32", "classifier._target_=tests.ace.standins.tiny_densenet_decision",
             "classifier.image_size=32",
             "metrics.mnac.metric.oracle._target_=tests.ace.standins.tiny_exported",
             "metrics.mnac.metric.oracle.path={tmp}/weights/oracle.pt2",
             "metrics.fva.metric.embedder._target_=tests.ace.standins.tiny_exported",
             "metrics.fva.metric.embedder.path={tmp}/weights/faces.pt2"]
ACE_CELEBA = [*ACE_FACES, "data._target_=tests.ace.standins.fake_celeba", "data.root={tmp}/celeba",
              "classifier.path={tmp}/weights/celeba_classifier.pth"]
ACE_CELEBAHQ = [*ACE_FACES, "data._target_=tests.ace.standins.fake_celebahq", "data.root={tmp}/celebahq",
                "classifier.path={tmp}/weights/celebahq_classifier.tar"]
ACE_BDD = [*ACE_COMMON, "data._target_=tests.ace.standins.fake_bdd100k", "data.root={tmp}/bdd100k",
           "data.image_size=[32,32]", "classifier._target_=tests.ace.standins.tiny_densenet_decision",
           "classifier.path={tmp}/weights/bdd_classifier.tar"]
ACE_IMAGENET = [*ACE_COMMON, "data._target_=tests.ace.standins.fake_imagenet", "data.root={tmp}/imagenet",
                "data.image_size=32", "classifier.weights_path=null", "classifier.name=resnet18"]

OVERRIDES = {
    "digits/ace": ("predict", ["diffusion.path={pipeline}", "classifier.weights_path=null",
                               "data.predict_split=val", "+data.val_fraction=0.006", "data.batch_size=6",
                               "method.pre_explanation.iterations=1", "metrics.cout.metric.num_steps=2"]),
    "ace/celeba_smile": ("predict", ACE_CELEBA),
    "ace/celeba_age": ("predict", ACE_CELEBA),
    "ace/celebahq_smile": ("predict", ACE_CELEBAHQ),
    "ace/celebahq_age": ("predict", ACE_CELEBAHQ),
    "ace/bdd100k": ("predict", ACE_BDD),
    # fake class folders n00000000..n00000999, so that n00000340 is class 340
    "ace/imagenet_zebra_sorrel": ("predict", [*ACE_IMAGENET, "data.classes=[n00000340,n00000339]"]),
    "ace/imagenet_cheetah_cougar": ("predict", [*ACE_IMAGENET, "data.classes=[n00000293,n00000286]"]),
    "ace/imagenet_egyptian_persian": ("predict", [*ACE_IMAGENET, "data.classes=[n00000285,n00000283]"]),
}


def test_every_ace_experiment_has_an_entry():
    assert sorted(n for n in experiments() if n.startswith("ace/") or n == "digits/ace") == sorted(OVERRIDES)


# tests/test_experiments.py runs every entry in the default suite; these deeper checks of the outputs repeat
# the runs, so they are marked slow
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_ace_experiment_runs_offline_with_stand_ins(name, tmp_path, tiny_pipeline_dir, tiny_pipeline3_dir):
    verb, overrides = OVERRIDES[name]
    overrides = [o.format(pipeline=tiny_pipeline_dir, pipeline3=tiny_pipeline3_dir, tmp=tmp_path) for o in overrides]
    cfg = compose_cfg([f"experiment={name}", f"paths.output_dir={tmp_path}/out", "trainer=cpu", *overrides])
    run(cfg, verb)
    out = tmp_path / "out"
    with np.load(out / "samples.npz") as z:
        n = len(z["arr_2"])
    assert n >= 2 and (out / "explanations.png").exists() and (out / "grid.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["flip_rate/n"] == n and 0 <= metrics["flip_rate/flip_rate"] <= 1
    if name.startswith("ace/celeba"):
        assert {"mnac/mnac", "fva/fva", "fid/fid", "fid/sfid", "cout/cout"} <= set(metrics)
    row = np.load(sorted((out / "samples").glob("*.npz"))[0])
    assert {"input_uint8", "pre_explanation_uint8", "mask", "success", "target", "source"} <= set(row.files)


def test_ace_runs_on_a_converted_guided_diffusion_checkpoint(tmp_path, tiny_pipeline_dir, tiny_pipeline3_dir):
    """The path the paper's runs take: a guided-diffusion (ADM) state dict with learned sigma and a fixed head
    count (DiME's CelebA layout, scaled down), converted once, then ACE on CelebA through the converted folder."""
    from dataclasses import replace

    import torch

    from equidiff.diffusion.adm import main as convert
    from tests.diffusion.test_adm import TINY, reference_unet

    flags = replace(TINY, image_size=32, diffusion_steps=500, attention_resolutions="16,8")
    torch.save(reference_unet(flags).state_dict(), tmp_path / "celeba_ddpm.pt")
    assert convert([str(tmp_path / "celeba_ddpm.pt"), str(tmp_path / "celeba_ddpm"), "--preset", "celeba_dime",
                    "--image-size", "32", "--num-channels", "32", "--num-res-blocks", "1", "--channel-mult", "1,2,3",
                    "--attention-resolutions", "16,8", "--num-heads", "2"]) == 0
    _, overrides = OVERRIDES["ace/celeba_smile"]
    overrides = [o.format(pipeline=tiny_pipeline_dir, pipeline3=tiny_pipeline3_dir, tmp=tmp_path) for o in overrides]
    cfg = compose_cfg(["experiment=ace/celeba_smile", f"paths.output_dir={tmp_path}/out", "trainer=cpu", *overrides,
                       f"diffusion.path={tmp_path}/celeba_ddpm"])
    run(cfg, "predict")
    with np.load(tmp_path / "out" / "samples.npz") as z:
        assert z["arr_0"].shape[1:] == (32, 32, 3) and len(z["arr_2"]) >= 2
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["flip_rate/n"] >= 2
