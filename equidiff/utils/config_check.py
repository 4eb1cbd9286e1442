"""Config checks before anything is built or written: unknown keys named with the nearest known one.

* ``unknown_override_keys``: a ``key=value`` override of a key that no config has. Hydra's own message for it
  advises ``+key=value``, which only adds a key nothing reads (or that the object's constructor then rejects
  with a raw ``TypeError``); equidiff names the nearest existing key instead.
* ``check_targets``: every node with a ``_target_`` only holds keys that its function or class accepts, so a
  ``+sampler.num_step=10`` is a ``ConfigError`` naming ``sampler.num_steps`` at start-up, not a ``TypeError``
  when the sampler is first called.
* ``check_chain_steps``: the step counts of the sampling chains fit the diffusion model's training steps.
"""

from __future__ import annotations

import difflib
import inspect

from omegaconf import OmegaConf

from equidiff.errors import ConfigError

_HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def _dotted_keys(node, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}{k}"
            out.append(key)
            out += _dotted_keys(v, f"{key}.")
    return out


def _nearest(key: str, candidates: list[str]) -> str | None:
    best = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return best[0] if best else None


def _override_list(args: list[str]) -> list[str] | None:
    """The plain (not sweep, not hydra) overrides among CLI arguments, or None when they cannot be parsed."""
    try:
        from hydra._internal.utils import get_args_parser
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = get_args_parser().parse_args(args)
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
    except (Exception, SystemExit):  # Hydra reports a bad command line itself
        return None
    return [o.input_line for o in overrides
            if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]


def unknown_override_keys(args: list[str], config_dir: str) -> str | None:
    """A message naming each ``key=value`` override whose key no config has, with the nearest key; else None."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException

    overrides = _override_list(args)
    if not overrides or GlobalHydra.instance().is_initialized():
        return None
    unknown: list[str] = []
    cfg = None
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        for _ in range(len(overrides) + 1):
            try:
                cfg = compose(config_name="config", overrides=overrides)
                break
            except ConfigCompositionException as e:
                key = getattr(e.__cause__, "full_key", None)
                culprit = [o for o in overrides if key and o.partition("=")[0].lstrip("~") == key]
                if not key or "not in struct" not in str(e.__cause__) or not culprit:
                    return None  # another composition error: Hydra's own message says it
                unknown.append(key)
                overrides = [o for o in overrides if o not in culprit]
    if not unknown or cfg is None:
        return None
    known = _dotted_keys(OmegaConf.to_container(cfg, resolve=False))
    lines = []
    for key in unknown:
        best = _nearest(key, known)
        lines.append(f"unknown config key {key!r}" + (f"; did you mean {best!r}?" if best else ""))
    return ("\n".join(lines) + "\n(`equidiff VERB ... --cfg job` prints every key of the composed config; a key no "
            "config has is read by nothing, so adding it with +key=... would not help.)")


def _params(fn, skip_self: bool = False) -> tuple[list[str], bool] | None:
    """(keyword-passable parameter names, whether it also takes **kwargs) of a callable."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())[1 if skip_self else 0:]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _signature_params(target) -> list[str] | None:
    """Keyword-passable parameter names of a function or class; None when it takes any keyword (**kwargs).

    An equidiff class whose ``__init__`` takes ``**kwargs`` passes them on to its base class (the DataModules:
    ``batch_size``, ``seed``, ...): its parameters are its own plus its bases', up to a base without **kwargs.
    """
    got = _params(target)
    if got is None:
        return None
    names, var_kw = got
    if not var_kw:
        return names
    if not (inspect.isclass(target) and target.__module__.startswith("equidiff.")):
        return None
    names = []
    for base in target.__mro__:
        init = base.__dict__.get("__init__")
        if init is None:
            continue
        if base is object or not base.__module__.startswith("equidiff."):
            return None  # **kwargs reach a class we do not own: anything may be accepted
        got = _params(init, skip_self=True)
        if got is None:
            return None
        names += [n for n in got[0] if n not in names]
        if not got[1]:
            return names
    return None


def check_targets(cfg) -> None:
    """Every key of a ``_target_`` node is a parameter of that target (see the module docstring)."""
    from hydra.utils import get_object

    container = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    errors = []

    def walk(node, path: str) -> None:
        if isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}.{i}" if path else str(i))
            return
        if not isinstance(node, dict):
            return
        target = node.get("_target_")
        if isinstance(target, str) and "${" not in target:
            try:
                obj = get_object(target)
            except Exception:  # noqa: BLE001 - an unimportable target is reported when it is built
                obj = None
            params = _signature_params(obj) if obj is not None else None
            if params is not None:
                for key in node:
                    if key in _HYDRA_KEYS or key in params:
                        continue
                    best = _nearest(str(key), params)
                    where = f"{path}.{key}" if path else str(key)
                    errors.append(f"{where}: {target} has no parameter {key!r}"
                                  + (f"; did you mean {path + '.' if path else ''}{best}?" if best else "")
                                  + f" (its parameters: {', '.join(params)})")
        for k, v in node.items():
            if k != "hydra":
                walk(v, f"{path}.{k}" if path else str(k))

    walk(container, "")
    if errors:
        raise ConfigError("unknown parameter(s) in the config:\n  " + "\n  ".join(errors))


def check_chain_steps(cfg, model) -> None:
    """Check ``num_steps``, ``eta`` and ``tau`` of the method's chains against its backbone's scheduler.

    Walks ``method`` (and ``sampler`` when the method uses it) for nodes with a ``num_steps`` key. ``tau`` is
    checked where it is an int (ACE's tau counts steps of the chain; a float tau elsewhere is a tolerance).
    """
    from equidiff.diffusion.schedulers import check_num_steps

    scheduler = getattr(getattr(model, "backbone", None), "scheduler", None)
    if scheduler is None or cfg.get("method") is None:
        return
    method = OmegaConf.to_container(cfg.method, resolve=False)
    roots = {"method": method}
    if "${sampler}" in str(method) and cfg.get("sampler") is not None:
        roots["sampler"] = OmegaConf.to_container(cfg.sampler, resolve=False)

    def walk(node, path: str) -> None:
        if not isinstance(node, dict):
            return
        if "num_steps" in node:
            value = OmegaConf.select(cfg, path, throw_on_missing=False)
            tau = value.get("tau")
            check_num_steps(scheduler, value.get("num_steps"), eta=value.get("eta"),
                            tau=tau if isinstance(tau, int) and not isinstance(tau, bool) else None,
                            name=f"{path}.num_steps")
        for k, v in node.items():
            walk(v, f"{path}.{k}")

    for name, node in roots.items():
        walk(node, name)
