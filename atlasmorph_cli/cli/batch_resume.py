"""An interrupted batch keeps what it finished, and a rerun with --skip-existing does only the rest.

* `keep_finished`: when a batch is interrupted (Ctrl-C, SIGTERM from kill/SLURM/docker stop), the
  volumes of the subjects already segmented are written to the volumes table before the command
  ends, and one line says how many subjects are complete and how to continue. (Each subject's files
  are written together, so a subject is complete or absent; a SIGKILL cannot be caught, so there the
  table of that run is lost, but the subjects' files stay.)
* `skip_finished`: with ``--skip-existing``, a subject whose outputs all exist is not redone. For
  ``segment`` its row is taken over, verbatim, from the existing volumes table; a subject whose files
  exist but that has no row there is redone, so the table is always complete.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .volumes_table import read_volume_rows, write_volumes


def _complete(paths: list[Path]) -> bool:
    return bool(paths) and all(p.is_file() for p in paths)


@contextmanager
def keep_finished(vol: Path | None, volumes: list, voxel_mm3: list, subjects: list,
                  outputs_of: Callable[[object], list[Path]]) -> Iterator[None]:
    """On an interruption inside the block, write the volumes gathered so far to `vol` (segment), say
    how far the batch got, and let the interruption go on (exit code 130, or 143 for SIGTERM)."""
    try:
        yield
    except KeyboardInterrupt:
        done = [s for s in subjects if _complete(outputs_of(s))]
        names = ", ".join(f"sub-{s.label}" for s in done[:10]) + (f", ... ({len(done) - 10} more)" if len(done) > 10 else "")
        note = ""
        if vol is not None and volumes:
            write_volumes(vol, volumes, voxel_mm3)
            note = f"; their volumes are in {vol}"
        print(f"atlasmorph: batch interrupted: {len(done)} of {len(subjects)} subjects have all their outputs"
              f"{f' ({names})' if done else ''}{note}; rerun the same command with --skip-existing to do the rest",
              file=sys.stderr, flush=True)
        raise


def skip_finished(subjects: list, outputs_of: Callable[[object], list[Path]], vol: Path | None,
                  volumes: list, voxel_mm3: list) -> tuple[list, list]:
    """(subjects still to do, subjects skipped). For segment, the skipped subjects' table rows are
    appended to `volumes` (as verbatim rows) so the new table holds every finished subject."""
    old = read_volume_rows(vol) if vol is not None else {}
    todo, skipped = [], []
    for s in subjects:
        if _complete(outputs_of(s)) and (vol is None or s.id in old):
            skipped.append(s)
            if vol is not None:
                volumes.append((s.id, old[s.id]))
                voxel_mm3.append(1.0)
        else:
            todo.append(s)
    return todo, skipped
