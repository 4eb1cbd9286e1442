"""The ACE LightningModule on tiny random models: the record, batch invariance, already-flipped inputs."""

import pytest
import torch

from equidiff.errors import ConfigError
from equidiff.explain.ace import PostProcessing, PreExplanation
from equidiff.methods.ace import ACE
from tests.ace.common import FixedLogits, digits_like, tiny_backbone, tiny_classifier

PRE = PreExplanation(num_steps=10, tau=2, iterations=2, step_size=4 / 255)
POST = PostProcessing(num_steps=10, tau=2, dilation=3, threshold=0.15)


def _batch(x, seeds, labels):
    return {"image": x, "seed": torch.tensor(seeds), "index": torch.tensor(seeds),
            "label": torch.tensor(labels)}


def _explain(method, batch):
    with torch.no_grad():  # as Lightning's predict loop (inference_mode=False)
        return method.predict_step(batch, 0)


def test_the_record_holds_input_pre_explanation_mask_counterfactual_and_flags():
    method = ACE(tiny_backbone(), tiny_classifier(), PRE, POST, target=[1, 2, 3, 4, 5, 6, 7, 8, 9, 0],
                 misclassified_to_label=False)
    x = digits_like(3)
    rec = _explain(method, _batch(x, [5, 6, 7], [0, 1, 2]))
    assert rec["target"].tolist() == [1, 2, 3]
    assert rec["image"].shape == x.shape and rec["image"].abs().max() <= 1
    assert rec["input_uint8"].dtype == torch.uint8 and rec["pre_explanation_uint8"].shape == x.shape
    assert rec["mask"].shape == (3, 1, 8, 8) and set(rec["mask"].unique().tolist()) <= {0, 1}
    for key in ("success", "already_flipped", "correct", "pred", "pre_explanation_pred", "source", "l1", "l2",
                "linf", "mask_area"):
        assert rec[key].shape == (3,), key
    torch.testing.assert_close(rec["mask_area"], rec["mask"].float().mean((1, 2, 3)))
    # outside the mask the counterfactual is the input
    outside = rec["mask"].expand_as(x) == 0
    assert torch.equal(rec["image"][outside], x[outside])
    assert (rec["success"] == (rec["pred"] == rec["target"])).all()


def test_a_samples_explanation_is_the_same_in_a_batch_of_1_and_of_4():
    method = ACE(tiny_backbone(), tiny_classifier(), PRE, POST, target=[1, 2, 3, 4, 5, 6, 7, 8, 9, 0])
    x, seeds, labels = digits_like(4, seed=3), [10, 11, 12, 13], [3, 1, 4, 1]
    together = _explain(method, _batch(x, seeds, labels))
    for i in range(4):
        alone = _explain(method, _batch(x[i : i + 1], seeds[i : i + 1], labels[i : i + 1]))
        for key, value in alone.items():
            if value.dtype.is_floating_point:
                torch.testing.assert_close(value[0], together[key][i], atol=1e-5, rtol=1e-5, msg=key)
            else:
                assert torch.equal(value[0], together[key][i]), key


def test_a_target_the_classifier_already_predicts_is_reported_as_flipped_not_attacked():
    calls = []

    class Spy:  # the pre-explanation, recording what it is asked to attack
        chain = PRE.chain

        def __call__(self, backbone, classifier, x, target, *, generators):
            calls.append((x.clone(), target.clone(), len(generators)))
            return PRE(backbone, classifier, x, target, generators=generators)

    # FixedLogits: bright images are class 9, dark ones class 0; the target is 9 for all
    method = ACE(tiny_backbone(), FixedLogits(), Spy(), POST, target=9, misclassified_to_label=False)
    x = digits_like(3) * 0.2
    x[0] += 0.5  # bright: already class 9
    x[2] -= 0.5  # dark
    x[1] += 0.5
    rec = _explain(method, _batch(x, [0, 1, 2], [9, 9, 0]))
    assert rec["source"].tolist() == [9, 9, 0]
    assert rec["already_flipped"].tolist() == [True, True, False]
    assert rec["success"][:2].all()
    assert torch.equal(rec["image"][:2], x[:2]) and not rec["mask"][:2].any()
    assert torch.equal(rec["pre_explanation_uint8"][:2], rec["input_uint8"][:2])
    # only the third image was attacked
    assert len(calls) == 1 and torch.equal(calls[0][0], x[2:]) and calls[0][1].tolist() == [9] and calls[0][2] == 1
    # nothing to attack: no call at all
    calls.clear()
    rec = _explain(method, _batch(x[:2], [0, 1], [9, 9]))
    assert not calls and rec["success"].all()


def test_bad_settings_are_refused_when_the_method_is_built():
    with pytest.raises(ConfigError, match="same DDPM chain"):
        ACE(tiny_backbone(), tiny_classifier(), PRE, PostProcessing(num_steps=10, tau=3))
    with pytest.raises(ConfigError, match="same DDPM chain"):
        ACE(tiny_backbone(), tiny_classifier(), PRE, PostProcessing(num_steps=10, tau=2, spacing="leading"))
    with pytest.raises(ConfigError, match="channel"):
        ACE(tiny_backbone(channels=3), tiny_classifier(), PreExplanation(10, 2), PostProcessing(10, 2))


def test_predict_refuses_inference_mode():
    method = ACE(tiny_backbone(), tiny_classifier(), PRE, POST, target=1)
    with torch.inference_mode(), pytest.raises(ConfigError, match="inference_mode"):
        method.predict_step(_batch(digits_like(1), [0], [0]), 0)
