"""The `equidiff` command: verbs, help, config printing and bad input (clear errors, nothing written)."""

import pytest

from equidiff.cli import main
from tests.helpers import run_cli


def test_usage_and_unknown_verb(capsys):
    main(["--help"])
    assert "usage: equidiff {fit,validate,test,predict}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown verb 'sample'"):
        main(["sample", "experiment=digits/sample"])


def test_hydra_help_and_cfg_job():
    r = run_cli(["predict", "--help"])
    assert r.returncode == 0, r.stderr
    assert "Config groups" in r.stdout and "experiment/digits:" in r.stdout and "sample" in r.stdout

    r = run_cli(["predict", "experiment=digits/sample", "--cfg", "job"])
    assert r.returncode == 0, r.stderr
    assert "_target_: equidiff.methods.Sampling" in r.stdout
    assert "inference_mode: false" in r.stdout


def _bad(tmp_path, capsys, args):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([*args, f"paths.output_dir={out}", "logger=none"])
    assert e.value.code not in (0, None)
    assert not out.exists(), "a failed run must not write anything"
    cap = capsys.readouterr()
    return cap.out + cap.err + str(e.value.code)


def test_unknown_experiment(tmp_path, capsys):
    msg = _bad(tmp_path, capsys, ["predict", "experiment=digits/nope"])
    assert "unknown experiment 'digits/nope'" in msg and "digits/sample" in msg and "digits/ddpm" in msg


def test_unknown_override(tmp_path, capsys):
    msg = _bad(tmp_path, capsys, ["predict", "experiment=digits/sample", "sampler.num_stepz=3"])
    assert "num_stepz" in msg and "did you mean 'sampler.num_steps'" in msg  # the nearest key, not Hydra's "+"


def test_missing_weights_folder(tmp_path, capsys):
    msg = _bad(tmp_path, capsys, ["predict", "experiment=digits/sample", f"diffusion.path={tmp_path}/no_model"])
    assert "does not exist" in msg and "equidiff fit experiment=digits/ddpm" in msg


def test_hub_id_while_offline(tmp_path, capsys):
    msg = _bad(tmp_path, capsys, ["predict", "experiment=digits/sample", "diffusion.path=nobody/not-cached-model"])
    assert "HF_HUB_OFFLINE=1" in msg and "huggingface-cli download" in msg


def test_classifier_and_diffusion_that_do_not_match(tmp_path, capsys, tiny_pipeline_dir):
    msg = _bad(tmp_path, capsys, ["predict", "experiment=digits/sample", f"diffusion.path={tiny_pipeline_dir}",
                                  "classifier=torchvision_resnet50", "classifier.name=resnet18",
                                  "classifier.weights_path=null"])
    assert "3-channel" in msg and "1-channel" in msg


def test_classifier_image_size_mismatch_names_the_fix(tmp_path, capsys, tiny_pipeline_dir):
    msg = _bad(tmp_path, capsys, ["predict", "experiment=digits/sample", f"diffusion.path={tiny_pipeline_dir}",
                                  "classifier=torchvision_resnet50", "classifier.name=resnet18",
                                  "classifier.weights_path=null", "+classifier.gray_to_rgb=true"])
    assert "224x224" in msg and "8x8" in msg and "classifier.resize=true" in msg


def test_dataset_folder_in_the_wrong_layout(tmp_path, capsys):
    (tmp_path / "not_cifar").mkdir()
    (tmp_path / "not_cifar" / "readme.txt").write_text("hello")
    msg = _bad(tmp_path, capsys, ["test", "experiment=digits/ddpm", "data=cifar10",
                                  f"data.root={tmp_path}/not_cifar", "verbs=null"])
    assert "cifar-10-batches-py" in msg


def test_wrong_verb_for_an_experiment(tmp_path, capsys):
    msg = _bad(tmp_path, capsys, ["fit", "experiment=digits/sample"])
    assert "equidiff predict" in msg
