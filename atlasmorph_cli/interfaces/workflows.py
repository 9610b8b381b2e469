"""A ready nipype workflow: register and segment every subject of a cohort, one volumes CSV at the end.

    from atlasmorph_cli.interfaces.workflows import build_workflow

    wf = build_workflow(model="model.safetensors", threads=1, masks=True, base_dir="work")
    wf.inputs.inputnode.in_file = ["s01_T1.nii.gz", "s02_T1.nii.gz"]
    wf.inputs.inputnode.mask_file = ["s01_mask.nii.gz", "s02_mask.nii.gz"]
    wf.inputs.inputnode.age = [70.0, 34.2]
    wf.inputs.inputnode.sex = ["F", "M"]
    wf.inputs.inputnode.subject_id = ["s01", "s02"]      # optional: ids in the volumes CSV
    wf.run(plugin="MultiProc", plugin_args={"n_procs": 4})

Subjects are fanned out with MapNodes (one `atlasmorph register` and one `atlasmorph segment` process
per subject; MultiProc/SLURM/SGE run them in parallel), then a Function node merges the one-row
volume CSVs into a cohort CSV (``volumes.csv``). The ``outputnode`` carries, per subject (lists in
input order): ``moved_file`` (subject in template space), ``warp_file`` (subject->template warp),
``inverse_warp_file`` (template->subject warp), ``labels_file`` (template labels in subject space),
``seg_file`` (segmentation) and, once, ``volumes_csv``. Connect it to a DataSink to collect the files.
"""
from __future__ import annotations

from pathlib import Path

from nipype.interfaces.utility import Function, IdentityInterface
from nipype.pipeline.engine import MapNode, Node, Workflow

from .nodes import Register, Segment

OUTPUT_FIELDS = ["moved_file", "warp_file", "inverse_warp_file", "labels_file", "seg_file", "volumes_csv"]


def merge_volumes(volumes_files, subject_ids=None):
    """Concatenate one-row volume CSVs (`atlasmorph segment --vol`) into volumes.csv in the working folder.

    The subject column becomes `subject_ids[i]` when ids are given (else it keeps the input file name).
    Runs inside a nipype Function node, hence the imports in the body.
    """
    import csv
    import os

    header, rows = None, []
    for i, path in enumerate(volumes_files):
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            this_header = next(reader)
            if header is None:
                header = this_header
            elif this_header != header:
                raise ValueError(f"{path}: columns differ from {volumes_files[0]}")
            for row in reader:
                if subject_ids:
                    row[0] = str(subject_ids[i])
                rows.append(row)
    out = os.path.abspath("volumes.csv")
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header or ["subject"])
        writer.writerows(rows)
    return out


def build_workflow(
    name: str = "atlasmorph",
    model: str | Path | None = None,
    threads: int = 1,
    masks: bool = False,
    warp_format: str = "fs",
    base_dir: str | Path | None = None,
    use_gpu: bool = False,
) -> Workflow:
    """A workflow registering and segmenting each subject given to its ``inputnode``.

    inputnode fields (lists of equal length): ``in_file`` (T1 images: whole-head ones are brain-extracted
    by each command, skull-stripped ones are used as they are, see inference.brain_extraction),
    ``age``, ``sex``, ``mask_file`` (only read with ``masks=True``) and optional ``subject_id``.
    ``model``: model file (default: the shipped model); ``threads``: torch threads per process (the
    nodes' n_procs for MultiProc); ``warp_format``: fs or itk; ``use_gpu``: MultiProc GPU-slot hint only.
    """
    wf = Workflow(name=name, base_dir=str(base_dir) if base_dir is not None else None)
    inputnode = Node(IdentityInterface(fields=["in_file", "age", "sex", "mask_file", "subject_id"]),
                     name="inputnode")
    iterfield = ["in_file", "age", "sex"] + (["mask_file"] if masks else [])
    common = dict(num_threads=threads, use_gpu=use_gpu)
    if model is not None:
        common["model"] = str(Path(model).resolve())

    register = MapNode(Register(labels_file=True, inverse_warp_file=True, warp_format=warp_format, **common),
                       iterfield=iterfield, name="register")
    segment = MapNode(Segment(volumes_file=True, **common), iterfield=iterfield, name="segment")
    cohort = Node(Function(input_names=["volumes_files", "subject_ids"], output_names=["volumes_csv"],
                           function=merge_volumes), name="cohort_volumes")
    outputnode = Node(IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")

    for node in (register, segment):
        wf.connect([(inputnode, node, [(f, f) for f in iterfield])])
    wf.connect([
        (segment, cohort, [("volumes_file", "volumes_files")]),
        (inputnode, cohort, [("subject_id", "subject_ids")]),
        (register, outputnode, [("moved_file", "moved_file"), ("warp_file", "warp_file"),
                                ("inverse_warp_file", "inverse_warp_file"), ("labels_file", "labels_file")]),
        (segment, outputnode, [("seg_file", "seg_file")]),
        (cohort, outputnode, [("volumes_csv", "volumes_csv")]),
    ])
    return wf
