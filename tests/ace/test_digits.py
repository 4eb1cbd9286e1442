"""ACE end to end on the embedded digits, through the real configs: a briefly trained DDPM and standard CNN.

The flip rate of the explanations must be far above that of the unattacked inputs, the edit localised
(mask area well below the image), and the counterfactual equal to the input outside the mask.
"""

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from equidiff.cli import run
from equidiff.explain.ace import diffusion_filter, draw_filter_noise, filter_timesteps, predicted_class
from equidiff.utils.images import uint8_to_float
from equidiff.utils.rng import generators_for
from tests.helpers import compose_cfg, load_samples


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory, trained_digits_ddpm):
    # briefly trained (about 1 minute on 2 shared cores): measured flip rate 0.85 (0.95 with 300 steps / 8 epochs)
    # against 0.0 for the inputs, mask area 0.38; the DDPM (200 steps) is the session's shared one
    root = tmp_path_factory.mktemp("ace_digits")
    cache = trained_digits_ddpm
    common = [f"paths.cache_dir={cache}", "trainer=cpu", "logger=csv", "trainer.enable_progress_bar=false"]
    run(compose_cfg(["experiment=digits/judge_classifier", f"paths.output_dir={root}/judge", "trainer.max_epochs=5",
                     *common]), "fit")
    return root, cache


def test_explanations_flip_the_classifier_with_localised_edits(digits_models):
    root, cache = digits_models
    out = root / "ace"
    # 40 validation digits (4 per class), 25 PGD iterations
    cfg = compose_cfg(["experiment=digits/ace", f"paths.cache_dir={cache}", f"paths.output_dir={out}", "trainer=cpu",
                       "logger=csv", "data.predict_split=val", "+data.val_fraction=0.0222", "data.batch_size=40",
                       "method.pre_explanation.iterations=25"])
    run(cfg, "predict")
    m = json.loads((out / "metrics.json").read_text())
    print({k: round(v, 3) for k, v in m.items() if isinstance(v, float)})
    assert m["flip_rate/n"] == 40
    assert m["flip_rate/input_flip_rate"] < 0.1  # the classifier rarely sees the target class in the input
    assert m["flip_rate/flip_rate"] > m["flip_rate/input_flip_rate"] + 0.5
    assert m["edit_size/mask_area"] < 0.6  # localised: well below the whole image
    assert m["edit_size/l1"] < 0.2
    samples = load_samples(out)
    assert len(samples["images"]) == 40
    for seed in samples["seeds"][:10]:
        row = np.load(out / "samples" / f"{seed:06d}.npz")
        keep = row["mask"] == 0
        image = samples["images"][samples["seeds"].tolist().index(seed)].transpose(2, 0, 1)
        np.testing.assert_array_equal(image[keep], row["input_uint8"][keep])  # untouched outside the mask
    assert (out / "explanations.png").exists()
    # a stronger baseline than the inputs: the diffusion filter F_tau alone (noise to tau, denoise), unattacked
    rows = [np.load(out / "samples" / f"{seed:06d}.npz") for seed in samples["seeds"]]
    x = uint8_to_float(torch.as_tensor(np.stack([r["input_uint8"] for r in rows])))
    target = torch.as_tensor(np.stack([r["target"] for r in rows])).reshape(-1)
    backbone, classifier = instantiate(cfg.diffusion), instantiate(cfg.classifier)
    pre = cfg.method.pre_explanation
    timesteps = filter_timesteps(backbone.scheduler, num_steps=pre.num_steps, tau=pre.tau, spacing=pre.spacing)
    eps, noises = draw_filter_noise(x.shape[1:], generators_for(samples["seeds"].tolist()), timesteps)
    with torch.no_grad():
        filtered = diffusion_filter(backbone, x, num_steps=pre.num_steps, tau=pre.tau, eps=eps, noises=noises,
                                    spacing=pre.spacing, clip_denoised=pre.clip_denoised,
                                    learned_variance=pre.learned_variance)
        filter_flip_rate = (predicted_class(classifier(filtered)) == target).float().mean().item()
    print(f"flip rate: ACE {m['flip_rate/flip_rate']:.3f}, unattacked filter {filter_flip_rate:.3f}, inputs "
          f"{m['flip_rate/input_flip_rate']:.3f}")
    assert m["flip_rate/flip_rate"] > filter_flip_rate + 0.5
