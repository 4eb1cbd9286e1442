"""``equidiff VERB [overrides]``: compose ``conf/`` with Hydra, build the objects, run ``trainer.VERB``.

VERB is one of Lightning's verbs: fit, validate, test, predict. Everything after it goes to
Hydra (``experiment=digits/sample seed=3 trainer=ddp_cpu``, ``-m`` sweeps, ``--cfg job``,
``--help``). The flow is the lightning-hydra-template one: instantiate the DataModule, the
method (a thin LightningModule that receives built objects), callbacks, loggers and Trainer,
then call the verb. Building comes first: a bad path, layout or pairing fails before
anything is written.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

VERBS = ("fit", "validate", "test", "predict")
USAGE = f"""usage: equidiff {{{",".join(VERBS)}}} [key=value ...] [-m] [--cfg job] [--help]

  equidiff fit experiment=digits/ddpm          train the tiny digits DDPM (embedded data)
  equidiff predict experiment=digits/sample    draw DDIM samples from it
  equidiff predict experiment=digits/sample trainer=ddp_cpu trainer.devices=2 paths.output_dir=out/x
  equidiff predict --help                      config groups and options
  equidiff predict experiment=digits/sample --cfg job    print the composed config
"""

log = logging.getLogger("equidiff")


def conf_dir() -> Path:
    """The ``conf/`` folder: $EQUIDIFF_CONF, else the one beside the package (editable install)."""
    env = os.environ.get("EQUIDIFF_CONF")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not (path / "config.yaml").exists():
        raise SystemExit(f"equidiff: no conf/config.yaml at {path}; install equidiff from its repository with "
                         "`make install` (editable), or set EQUIDIFF_CONF to the repository's conf/ folder")
    return path


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    verb = argv[0]
    if verb not in VERBS:
        raise SystemExit(f"equidiff: unknown verb {verb!r}; choose one of {', '.join(VERBS)}\n\n{USAGE}")

    _check_experiment(argv[1:])
    _check_override_keys(argv[1:])
    import hydra

    original_argv = list(sys.argv)

    from equidiff.errors import ConfigError

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
    def _task(cfg):
        # Lightning re-executes sys.argv for DDP ranks > 0: give it back the verb.
        sys.argv[:] = original_argv
        try:
            return run(cfg, verb)
        except ConfigError as e:  # a bad input: the message says what to do, no traceback needed
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"equidiff: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    from equidiff.utils.distributed import launcher_watch

    sys.argv[:] = [original_argv[0], *argv[1:]]
    try:
        with launcher_watch():  # DDP ranks that Lightning starts as subprocesses end when this process ends
            _task()
    finally:
        sys.argv[:] = original_argv


def experiments() -> list[str]:
    """Every experiment name (conf/experiment/<name>.yaml, nested folders as group/name).

    Files whose name starts with ``_`` hold settings shared by several experiments and are not listed.
    """
    root = conf_dir() / "experiment"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if not p.name.startswith("_"))


def _check_experiment(overrides: list[str]) -> None:
    """An unknown experiment name is an error listing the real ones (Hydra does not, for nested names)."""
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "experiment" and value and "," not in value and "(" not in value:
            if value not in experiments():
                raise SystemExit(f"equidiff: unknown experiment {value!r}. Available experiments:\n  "
                                 + "\n  ".join(experiments()))


def _check_override_keys(args: list[str]) -> None:
    """A ``key=value`` of a key no config has names the nearest key (Hydra would advise ``+key=value``)."""
    from equidiff.utils.config_check import unknown_override_keys

    msg = unknown_override_keys(args, str(conf_dir()))
    if msg:
        raise SystemExit(f"equidiff: error: {msg}")


# --------------------------------------------------------------------------- the job


def _check_multirun(cfg) -> bool:
    """Hydra -m with in-process DDP re-launches the whole sweep in every child: refuse it.

    Returns whether the run's folder is the sweep job's own folder (Hydra created it for this run)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from equidiff.errors import ConfigError

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    hc = HydraConfig.get()
    strategy = str(cfg.trainer.get("strategy", "auto"))
    devices = cfg.trainer.get("devices", 1)
    if "ddp" in strategy.lower() and devices not in (1, "1") and not SLURMEnvironment.detect():
        raise ConfigError("a Hydra -m sweep cannot spawn DDP processes itself (every child would re-run the whole "
                          "sweep); sweep with hydra/launcher=slurm (one SLURM job per run, one task per GPU), or "
                          "run each job without -m")
    # every job of a sweep writes to its own sweep folder unless the sweep sets paths.output_dir itself
    if not any(o.startswith("paths.output_dir=") for o in hc.overrides.task):
        cfg.paths.output_dir = hc.runtime.output_dir
        return True
    return False


def build(cfg):
    """Instantiate DataModule, method, callbacks, loggers and Trainer from a composed config.

    Checked first: every ``_target_`` node holds only its target's parameters; then, once the method is built,
    its chains' step counts against its diffusion model. ``fingerprint.yaml`` is written by a callback, put
    first, right before the first result (``equidiff.utils.runs.FingerprintCommit``).
    """
    from hydra.utils import instantiate

    from equidiff.errors import ConfigError
    from equidiff.utils.config_check import check_chain_steps, check_targets
    from equidiff.utils.runs import FingerprintCommit

    for key in ("method", "data", "trainer"):
        if cfg.get(key) is None:
            raise ConfigError(f"no {key} configured: pick an experiment (experiment=digits/sample) or set {key}=...")
    check_targets(cfg)
    datamodule = _instantiate(instantiate, cfg.data)
    model = _instantiate(instantiate, cfg.method)
    check_chain_steps(cfg, model)
    callbacks = [FingerprintCommit(cfg)]
    callbacks += [_instantiate(instantiate, c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [_instantiate(instantiate, c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = _instantiate(instantiate, cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, model, trainer


def _instantiate(instantiate, node, **kwargs):
    """Hydra's instantiate, with a ConfigError raised while building an object passed on as it is: Hydra wraps
    it in an InstantiationException ("Error in call to target ..."), which would hide the message that says
    what to do."""
    from hydra.errors import InstantiationException

    from equidiff.errors import ConfigError

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ if isinstance(cause, InstantiationException) else None
        if cause is not None:
            raise cause from None
        raise


def run(cfg, verb: str):
    """Run ``trainer.<verb>`` for a composed config; return what the verb returns (metrics for test).

    The order makes bad input cheap and harmless: config checks and building (nothing written), then the
    launching process takes the folder (``RunFolder``: a lock a second run meets), re-checks that a predict
    resumes a folder of its own configuration, and only then writes. A run that fails before its first result
    leaves the folder as it found it. DDP ranks > 0 (children of the same job) neither lock nor clean up.
    """
    import lightning as L
    from omegaconf import OmegaConf

    from equidiff.callbacks.resume import fit_ckpt_path
    from equidiff.errors import ConfigError
    from equidiff.utils.lock import launching_process
    from equidiff.utils.precision import check_predict_precision, set_tf32
    from equidiff.utils.runs import FingerprintCommit, RunFolder, check_resume_compatible, save_run_config
    from equidiff.utils.signals import stop_on_signals

    output_dir, sweep_job_folder = Path(cfg.paths.output_dir), False
    try:
        sweep_job_folder = _check_multirun(cfg)
        output_dir = Path(cfg.paths.output_dir)
        if cfg.get("verbs") and verb not in cfg.verbs:
            raise ConfigError(f"this experiment ({cfg.task_name}) is meant for `equidiff {'|'.join(cfg.verbs)}`, "
                              f"not `equidiff {verb}`")
        if cfg.get("seed") is not None:
            L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        if verb == "predict":
            check_predict_precision(cfg.trainer.get("precision", "32-true"))
            check_resume_compatible(cfg, output_dir)  # early, to fail before the (long) build
        set_tf32(cfg.get("tf32"))
        datamodule, model, trainer = build(cfg)
        # fit resumes from <output_dir>/checkpoints/last.ckpt by itself (equidiff/callbacks/resume.py)
        ckpt_path = fit_ckpt_path(cfg, trainer) if verb == "fit" else cfg.get("ckpt_path")
    except BaseException:
        if sweep_job_folder and launching_process():
            _remove_if_empty(output_dir)  # the empty job folder Hydra made for this run
        raise
    folder = RunFolder(output_dir, made_for_this_run=sweep_job_folder).open() if launching_process() else None
    handler, failed = None, True
    try:
        if folder is not None:
            if verb == "predict":
                check_resume_compatible(cfg, output_dir)  # again, now that no other run can write here
            save_run_config(cfg, output_dir)
            handler = logging.FileHandler(output_dir / "equidiff.log")
            handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
            logging.getLogger().addHandler(handler)
            log.info("equidiff %s: output in %s", verb, output_dir.resolve())
            log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
        kwargs = {"model": model, "datamodule": datamodule}
        if ckpt_path:
            kwargs["ckpt_path"] = ckpt_path
        if verb == "predict":
            kwargs["return_predictions"] = False
        with stop_on_signals(trainer, verb, output_dir):  # SIGTERM/SIGUSR1: save, say so, exit 128+signum
            result = getattr(trainer, verb)(**kwargs)
        if folder is not None:
            next(c for c in trainer.callbacks if isinstance(c, FingerprintCommit)).commit()
            _report(verb, output_dir)
        failed = False
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if folder is not None:
            folder.close(failed)
    return result


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()  # only succeeds on an empty folder: never removes anything written
    except OSError:
        pass


def _report(verb: str, output_dir: Path) -> None:
    lines = [f"equidiff {verb} done. Output: {output_dir.resolve()}"]
    for name in ("samples.npz", "metrics.json", "grid.png", "samples.csv"):
        if (output_dir / name).exists():
            lines.append(f"  {name:<13} {(output_dir / name).resolve()}")
    log.info("\n".join(lines))


if __name__ == "__main__":
    main()
