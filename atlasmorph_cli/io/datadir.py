"""Where the development data (IXI subjects, MNI152 reference) lives, if anywhere."""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "ATLASMORPH_DATA"


def find_data_dir() -> Path | None:
    """The data folder: ``$ATLASMORPH_DATA`` if set, else ``../shared/data`` beside the repository.

    The repository root is the parent of the package directory (this file is in atlasmorph_cli/io/). Returns None when the environment
    variable is unset (or empty) and the sibling folder does not exist. A set variable is returned
    as given (expanded), even if it does not exist, so callers can report the bad path.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    candidate = repo_root.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None
