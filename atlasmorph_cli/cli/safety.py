"""Guards against losing data: no output may replace an input, and a SIGTERM ends a command cleanly.

* `outputs_not_inputs` (a decorator on `template`), `check_distinct` (a single register/segment request) and
  `check_batch_outputs`: an output path that
  is an input (the image, its mask, the model, a batch's cohort CSV or list, any subject's image)
  is refused before any work, whatever the spelling (relative, absolute, through a symbolic or hard
  link). FreeSurfer and ANTs tools would silently overwrite; losing a T1 to its own label map is
  worse than an error, and choosing another name is easy, so AtlasMorph refuses rather than renames.
* `terminate_as_interrupt`: SIGTERM (kill, SLURM at the time limit, docker stop) and SIGHUP are
  turned into the same exception as Ctrl-C, so every `finally` runs: temporary ``.part`` files are
  removed, a batch writes the volumes of the subjects it finished, and the exit code is 128 + signal.
"""
from __future__ import annotations

import functools
import inspect
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import AtlasMorphError

INPUT_ARGS = {"image": "the input image", "mask": "the --mask image", "model_path": "the model file"}


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_distinct(outputs: dict[str, Path], inputs: dict[str, Path]) -> None:
    """Refuse an output that is one of the inputs (outputs: option -> path, inputs: description -> path)."""
    for flag, out in outputs.items():
        for what, inp in inputs.items():
            if _same(Path(out), Path(inp)):
                raise AtlasMorphError(f"{out}: this output is {what}; writing it would destroy the input "
                                      f"(give {flag} another path)")


def outputs_not_inputs(fn: Callable) -> Callable:
    """Decorate a command runner: every Path argument that is not an input is an output and must differ
    from the inputs (arguments named in INPUT_ARGS)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = sig.bind_partial(*args, **kwargs).arguments
        inputs = {desc: Path(bound[name]) for name, desc in INPUT_ARGS.items() if bound.get(name) is not None}
        outputs = {name: v for name, v in bound.items() if name not in INPUT_ARGS and isinstance(v, Path)}
        if inputs and outputs:
            check_distinct({f"--{k.replace('_', '-')}" if len(k) > 1 else k: v for k, v in outputs.items()}, inputs)
        return fn(*args, **kwargs)

    return wrapper


def check_batch_outputs(source: Path, subjects: Iterable, out_dir: Path, output_paths: Callable[[object], list[Path]],
                        vol: Path | None, model: Path | None) -> None:
    """A batch's outputs (every subject's files in --out-dir, the volumes table) must not be inputs; the
    temporary files a killed earlier run left beside these outputs are removed."""
    inputs: dict[Path, str] = {}
    for s in subjects:
        inputs[Path(s.t1)] = f"the image of subject {s.id}"
        if getattr(s, "mask", None) is not None:
            inputs[Path(s.mask)] = f"the mask of subject {s.id}"
    if source.is_file():
        inputs[source] = "the batch list" if source.suffix.lower() == ".txt" else "the cohort CSV"
    if model is not None:
        inputs[Path(model)] = "the model file"
    resolved = {}
    for p, what in inputs.items():
        try:
            resolved[p.resolve()] = what
        except OSError:
            pass
    planned = [p for s in subjects for p in output_paths(s)]
    if vol is not None:
        planned.append(vol)
    from ..io.volumes import remove_stale_temporaries

    remove_stale_temporaries(planned)  # left by a killed earlier run of this batch
    for out in planned:
        what = resolved.get(out.resolve())
        if what is None and out.exists():  # hard links and other spellings of an existing file
            what = next((w for p, w in inputs.items() if _same(out, p)), None)
        if what is not None:
            flag = "--vol" if vol is not None and out == vol else "--out-dir"
            raise AtlasMorphError(f"{out}: this output is {what}; writing it would destroy an input "
                                  f"(choose another {flag})")


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM or SIGHUP arrives (a KeyboardInterrupt, so cleanup runs)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []


def _raise(signum, frame):  # noqa: ARG001
    _received.append(signum)
    raise Terminated(signum)


def received_signal() -> int | None:
    """The SIGTERM/SIGHUP received in this process (Typer turns the interruption into exit code 130)."""
    return _received[-1] if _received else None


def interruption_message() -> tuple[str, int]:
    """('atlasmorph: terminated by SIGTERM', 143) after a signal, else ('atlasmorph: interrupted', 130)."""
    sig = received_signal()
    if sig is None:
        return "atlasmorph: interrupted", 130
    return f"atlasmorph: terminated by {signal.Signals(sig).name}", 128 + sig


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `Terminated` in the main thread; the previous handlers
    are restored after it (a no-op outside the main thread, e.g. in a nipype worker thread)."""
    previous = {}
    _received.clear()
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                previous[sig] = signal.signal(sig, _raise)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


