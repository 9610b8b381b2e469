"""The one request object of `register` and `segment` (single image or batch), and the attributes it carries."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AtlasMorphError
from ..inference.refine_defaults import REFINE_LOSS, REFINE_STEPS

if TYPE_CHECKING:  # the bids package reads images (nibabel): not imported for --help
    from ..bids import BidsSelection

COMMANDS = ("register", "segment")


def attribute_values(age: float | None, sex: str | None, extra: list[str] | None) -> dict[str, object] | None:
    """Collect --age, --sex and --attr NAME=VALUE into one dict (None when nothing was given)."""
    values: dict[str, object] = {}
    if age is not None:
        values["age"] = age
    if sex is not None:
        values["sex"] = sex
    for item in extra or []:
        if "=" not in item:
            raise AtlasMorphError(f"--attr expects NAME=VALUE, got '{item}'")
        k, v = (x.strip() for x in item.split("=", 1))
        if k in values:  # --attr age=75 with --age 40, or the same name twice: no silent winner
            first = (f"--{k} {values[k]}" if (k == "age" and age is not None) or (k == "sex" and sex is not None)
                     else f"--attr {k}={values[k]}")
            raise AtlasMorphError(f"{k} is given twice ({first} and --attr {k}={v}); give it once")
        values[k] = v
    return values or None


@dataclass
class SubjectRequest:
    """What one `register` or `segment` run was asked to do, built by the command line (or a caller).

    `image` is a T1 image, or a batch (a folder, a .txt list, a cohort .csv or a BIDS dataset). A single image names
    its outputs in `outputs` (output name -> path; the names of cli.outputs: moved, template, warp,
    inverse, affine, labels, jacobian for register; dseg, probseg for segment; brainmask, brain,
    quality, qc for both); a batch names them in `output_names` (--outputs) and writes them to `out_dir`.
    `vol` is segment's volumes table. `attrs` are the --age/--sex/--attr values (a cohort CSV's cells
    win over them in a batch).
    """

    command: str
    image: Path
    attrs: dict[str, object] | None = None
    outputs: dict[str, Path | None] = field(default_factory=dict)
    mask: Path | None = None
    skullstripped: bool = False
    refine: int = REFINE_STEPS
    refine_loss: str = REFINE_LOSS  # --refine-loss: the refinement's image term (refine_defaults.REFINE_LOSSES)
    warp_format: str = "fs"
    model_path: Path | None = None
    threads: int | None = None
    strict: bool = False
    vol: Path | None = None
    out_dir: Path | None = None
    output_names: str | None = None
    skip_existing: bool = False
    template: Path | None = None  # --template: a template T1 in MNI space (e.g. from `build`) instead of the model's
    template_labels: Path | None = None  # --template-labels: its labels (FreeSurfer ids or 4D probabilities)
    bids: BidsSelection | None = None  # which images of a BIDS dataset (--participant-label, ...)

    def __post_init__(self) -> None:
        if self.command not in COMMANDS:
            raise ValueError(self.command)

    def check_template(self) -> None:
        """--template and --template-labels go together and exclude the attributes (one-line errors)."""
        if (self.template is None) != (self.template_labels is None):
            raise AtlasMorphError("--template and --template-labels go together (the template's T1 and its label map)")
        if self.template is not None and self.attrs:
            raise AtlasMorphError("--template excludes --age/--sex/--attr: they choose the model's conditional "
                                  "template, which --template replaces")

    def requested(self) -> dict[str, Path]:
        """The single-image outputs that were asked for (name -> path)."""
        return {k: Path(v) for k, v in self.outputs.items() if v is not None}
