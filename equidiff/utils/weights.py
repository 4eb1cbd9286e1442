"""Weights that do not fit an architecture: a ``ConfigError`` naming the file and a few of the mismatches.

Without it a diffusers folder whose weight file belongs to another architecture loads with its missing
parameters left on the ``meta`` device and fails later ("Cannot copy out of meta tensor"), after a run has
started; a shape mismatch is diffusers' ``ValueError`` about ``low_cpu_mem_usage``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from equidiff.errors import ConfigError

SHOWN = 5


def mismatch_error(source, what: str, *, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                   mismatched: Iterable[tuple[str, tuple, tuple]] = ()) -> ConfigError | None:
    """The error for weights in ``source`` that do not fit ``what``; None when nothing is wrong.

    ``mismatched``: (key, shape the architecture expects, shape in the file).
    """
    missing, unexpected, mismatched = sorted(missing), sorted(unexpected), list(mismatched)
    if not (missing or unexpected or mismatched):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) of the architecture missing from the file (e.g. "
                     f"{', '.join(missing[:SHOWN])})")
    if unexpected:
        parts.append(f"{len(unexpected)} key(s) in the file that the architecture does not have (e.g. "
                     f"{', '.join(unexpected[:SHOWN])})")
    if mismatched:
        shown = ", ".join(f"{k}: expected {tuple(e)}, file has {tuple(f)}" for k, e, f in mismatched[:SHOWN])
        parts.append(f"{len(mismatched)} shape mismatch(es) ({shown})")
    return ConfigError(f"the weights in {source} are not those of {what}: " + "; ".join(parts)
                       + ". The file belongs to another architecture or configuration: check the weights path and "
                       "the architecture settings (config.json next to diffusers weights).")


def check_state_dict(net, state: Mapping, source, what: str) -> None:
    """Raise ``mismatch_error`` unless ``state`` has exactly ``net``'s keys with its shapes (call it before
    ``net.load_state_dict(state)``, whose own message is a long raw dump)."""
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    found = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    err = mismatch_error(source, what, missing=set(expected) - set(found), unexpected=set(found) - set(expected),
                         mismatched=[(k, expected[k], found[k]) for k in expected
                                     if k in found and expected[k] != found[k]])
    if err is not None:
        raise err
