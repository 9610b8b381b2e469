"""An interrupted batch keeps what it finished, and a rerun with --skip-existing does only the rest.

* `keep_finished`: when a batch is interrupted (Ctrl-C, SIGTERM from kill/SLURM/docker stop), the
  volumes of the subjects already segmented are written to the volumes table before the command
  ends, and one line says how many subjects are complete and how to continue. (Each subject's files
  are written together, so a subject is complete or absent; a SIGKILL cannot be caught, so there the
  table of that run is lost, but the subjects' files stay.)
* `skip_finished`: with ``--skip-existing``, a subject whose outputs all exist is not redone. For
  ``segment`` its row is taken over, verbatim, from the existing volumes table (volumes.csv, or a BIDS
  dataset's volumes.tsv); a subject whose files exist but that has no row there is redone, so the
  table is always complete.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _complete(paths: list[Path]) -> bool:
    return bool(paths) and all(p.is_file() for p in paths)


@contextmanager
def keep_finished(layout, volumes: list, subjects: list) -> Iterator[None]:
    """On an interruption inside the block, write the volumes gathered so far (segment) through `layout`
    (cli.batch.FolderOutputs or cli.bids_batch.BidsOutputs), say how far the batch got, and let the
    interruption go on (exit code 130, or 143 for SIGTERM)."""
    try:
        yield
    except KeyboardInterrupt:
        done = [s for s in subjects if _complete(layout.outputs_of(s))]
        names = ", ".join(s.tag for s in done[:10]) + (f", ... ({len(done) - 10} more)" if len(done) > 10 else "")
        note = ""
        if layout.vol is not None and volumes:
            layout.write_table(volumes)
            note = f"; their volumes are in {layout.vol}"
        print(f"atlasmorph: batch interrupted: {len(done)} of {len(subjects)} subjects have all their outputs"
              f"{f' ({names})' if done else ''}{note}; rerun the same command with --skip-existing to do the rest",
              file=sys.stderr, flush=True)
        raise


def skip_finished(subjects: list, layout, volumes: list) -> tuple[list, list]:
    """(subjects still to do, subjects skipped). For segment, the skipped subjects' table rows are
    appended to `volumes` (as verbatim rows) so the new table holds every finished subject."""
    old = layout.read_table(subjects) if layout.vol is not None else {}
    todo, skipped = [], []
    for s in subjects:
        if _complete(layout.outputs_of(s)) and (layout.vol is None or s.id in old):
            skipped.append(s)
            if layout.vol is not None:
                volumes.append((s.id, old[s.id]))
        else:
            todo.append(s)
    return todo, skipped
