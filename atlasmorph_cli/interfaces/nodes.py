"""nipype interfaces for `atlasmorph template`, `register` and `segment`.

Why command-line wrappers (``CommandLine``) and not in-process ``BaseInterface`` calls into
`cli.run`:

* Process isolation. Each node is its own process: torch's thread pool is sized by ``--threads``
  (``num_threads``) and does not fight the other MultiProc workers for the cores, the memory of a
  subject (model, fields, native-grid slabs) goes back to the system when the node ends, and a
  crash in one subject cannot take the workflow engine down with it.
* Cluster-friendly. With the SLURM/SGE/PBS plugins every node becomes a batch job anyway; a plain
  command needs only ``atlasmorph`` on the compute node's PATH (no pickled Python state), and the
  exact command line is what nipype hashes, logs (``command.txt``) and shows in crash files, so a
  failed node can be rerun by hand.
* The CLI is the tested surface: the interfaces add no second code path with its own defaults.

The cost is loading torch and the model once per node (a few seconds), small next to a
registration. For many subjects in one process (model loaded once) use the CLI's batch mode instead
(``atlasmorph segment cohort.csv --out-dir DIR``).

Output files follow one convention. An output that the command always writes (``-o`` of template and
segment) is a ``File`` named by default from the input (``name_source``/``name_template``). An output
written only on request is ``traits.Either(Bool, File)``: ``True`` writes it under its default name
(``name_template``), a path writes it there, ``False``/undefined does not write it. Default names
land in the node's working directory; ``_list_outputs`` reports absolute paths.

``num_threads`` maps to ``--threads`` and is ``nohash`` (it does not change results), and nipype's
MultiProc plugin reads it as the node's ``n_procs``. ``use_gpu`` is a scheduling hint only: MultiProc
counts such nodes against ``n_gpu_procs``; the ``template``/``register``/``segment`` commands run on
the CPU, so leave it False unless your installation runs them on a GPU.
"""
from __future__ import annotations

import os
import shlex

from nipype.interfaces.base import (
    CommandLine,
    CommandLineInputSpec,
    File,
    TraitedSpec,
    Undefined,
    isdefined,
    traits,
)
from nipype.utils.filemanip import split_filename

from ..geometry.transforms import WARP_FORMATS

__all__ = ["Template", "Register", "Segment", "Build"]


def _on_request(argstr: str, name_template: str, desc: str, *, name_source: str | None = None,
                default: bool | None = None):
    """An output written only when asked: True (default name), a path, or False/undefined (not written)."""
    meta = dict(argstr=argstr, name_template=name_template, hash_files=False, on_request=True,
                desc=f"{desc} (True: default name '{name_template}'; a path; False: not written)")
    if name_source:
        meta["name_source"] = name_source
    if default is not None:
        meta.update(default=default, usedefault=True)
    return traits.Either(traits.Bool, File, **meta)


def _outputs_of(inputs: type[CommandLineInputSpec]) -> type[TraitedSpec]:
    """A command's output spec: an existing File for each output its inputs name (the traits with
    ``hash_files=False``: always-written files and on-request outputs), described as there."""
    files = {name: File(exists=True, desc=trait.desc.split(" (True: ")[0])
             for name, trait in inputs().traits().items() if trait.hash_files is False}
    # named and placed as a class statement would be, so that nipype's workers can pickle the outputs
    return type(TraitedSpec)(inputs.__name__.replace("Input", "Output"), (TraitedSpec,),
                             {"__module__": __name__, **files})


class _ModelInputSpec(CommandLineInputSpec):
    """Inputs every atlasmorph command shares."""

    age = traits.Float(argstr="--age %g", desc="age in years")
    sex = traits.Str(argstr="--sex %s", desc="sex code the model knows (F or M)")
    attributes = traits.Dict(traits.Str, traits.Any, argstr="--attr %s",
                             desc="other model attributes, NAME -> VALUE (each becomes --attr NAME=VALUE)")
    model = File(exists=True, argstr="--model %s", desc="model file (.safetensors); default: the shipped model")
    num_threads = traits.Int(1, usedefault=True, argstr="--threads %d", nohash=True,
                             desc="CPU threads for torch (nipype MultiProc reads it as n_procs)")
    use_gpu = traits.Bool(False, usedefault=True, nohash=True,
                          desc="scheduling hint for MultiProc's GPU slots only (the commands run on CPU)")


class _SubjectInputSpec(_ModelInputSpec):
    in_file = File(exists=True, mandatory=True, argstr="%s", position=0,
                   desc="T1, any orientation: whole-head (brain-extracted first), skull-stripped, or with mask_file")
    mask_file = File(exists=True, argstr="--mask %s", xor=["skullstripped"], desc="brain mask on the image's grid")
    skullstripped = traits.Bool(argstr="--skullstripped", xor=["mask_file"],
                                desc="in_file is already brain-extracted (its non-zero voxels are the brain)")
    brain_mask_file = _on_request("--brain-mask %s", "%s_brainmask.nii.gz", "brain mask used (input's grid)",
                                  name_source="in_file")
    brain_file = _on_request("--brain %s", "%s_brain.nii.gz", "skull-stripped image (input's grid)",
                             name_source="in_file")
    quality_file = _on_request("--quality %s", "%s_qc.json", "quality check (JSON)", name_source="in_file")
    qc_file = _on_request("--qc %s", "%s_qc.png", "QC picture (three planes, outlines, score)", name_source="in_file")
    strict = traits.Bool(argstr="--strict", desc="fail the node (exit code 3) when the subject fails the quality check")
    refine = traits.Range(low=0, argstr="--refine %d",
                          desc="instance-optimisation steps on the network's warp (default: the command's, 5)")
    refine_loss = traits.Enum("ncc", "model", argstr="--refine-loss %s",
                              desc="image term of the refinement: local NCC (the command's default) or the model's own")
    template = File(exists=True, argstr="--template %s", requires=["template_labels"], xor=["age", "sex", "attributes"],
                    desc="template T1 in MNI space (e.g. Build's out_file) instead of the model's conditional template")
    template_labels = File(exists=True, argstr="--template-labels %s", requires=["template"],
                           desc="label map of `template` (FreeSurfer ids, or 4D probabilities)")


class _AtlasMorphCommand(CommandLine):
    """Shared behaviour: resolve output names (bools -> default names), format --attr, list outputs."""

    _cmd = "atlasmorph"

    def _filename_from_source(self, name, chain=None):
        spec = self.inputs.trait(name)
        if not spec.on_request:
            return super()._filename_from_source(name, chain)
        value = getattr(self.inputs, name)
        if not isdefined(value) or value is False:
            return Undefined
        if value is not True and "%s" not in value:
            return value
        template = spec.name_template if value is True else value
        if spec.name_source:
            source = getattr(self.inputs, spec.name_source)
            if not isdefined(source):
                return Undefined
            template = template % split_filename(source)[1]
        return template

    def _format_arg(self, name, spec, value):
        if spec.on_request:
            fname = self._filename_from_source(name)
            return spec.argstr % shlex.quote(fname) if isdefined(fname) else None
        if name == "attributes":
            return " ".join(spec.argstr % shlex.quote(f"{k}={v}") for k, v in sorted(value.items())) or None
        return super()._format_arg(name, spec, value)

    def _list_outputs(self):
        outputs = self.output_spec().get()
        for name in outputs:
            fname = self._filename_from_source(name)
            if isdefined(fname):
                outputs[name] = os.path.abspath(fname)
        return outputs


# ----------------------------------------------------------------------------------------- template
class TemplateInputSpec(_ModelInputSpec):
    out_file = File("template.nii.gz", usedefault=True, argstr="-o %s", hash_files=False,
                    desc="template T1 (model grid, MNI space)")
    labels_file = _on_request("--labels %s", "template_labels.nii.gz", "hard label map (FreeSurfer ids)",
                              default=True)
    probs_file = _on_request("--probs %s", "template_probs.nii.gz", "4D label probabilities (background + 34)")
    png_file = _on_request("--png %s", "template.png", "montage of slices")


TemplateOutputSpec = _outputs_of(TemplateInputSpec)


class Template(_AtlasMorphCommand):
    """`atlasmorph template`: the attribute-matched template on the model grid.

    >>> t = Template(age=70, sex="F")
    >>> t.cmdline
    'atlasmorph template --age 70 --labels template_labels.nii.gz --threads 1 -o template.nii.gz --sex F'
    """

    _cmd = "atlasmorph template"
    input_spec = TemplateInputSpec
    output_spec = TemplateOutputSpec


# ----------------------------------------------------------------------------------------- register
class RegisterInputSpec(_SubjectInputSpec):
    moved_file = _on_request("-o %s", "%s_moved.nii.gz", "subject moved into template space",
                             name_source="in_file", default=True)
    template_file = _on_request("-O %s", "%s_template.nii.gz", "template moved into subject space",
                                name_source="in_file")
    warp_file = _on_request("-t %s", "%s_warp.nii.gz", "subject->template warp (template grid)",
                            name_source="in_file", default=True)
    inverse_warp_file = _on_request("-T %s", "%s_invwarp.nii.gz",
                                    "template->subject warp (subject grid)", name_source="in_file")
    affine_file = _on_request("--affine %s", "%s_affine.txt", "affine part, ITK/ANTs text",
                              name_source="in_file")
    labels_file = _on_request("--labels %s", "%s_labels.nii.gz", "template labels in subject space",
                              name_source="in_file")
    jacobian_file = _on_request("--jacobian %s", "%s_logjac.nii.gz",
                                "log-Jacobian determinant (template grid)", name_source="in_file")
    warp_format = traits.Enum(*WARP_FORMATS, argstr="--warp-format %s",
                              desc="fs: RAS mm (intent 1006); itk: LPS (intent 1007) for antsApplyTransforms")


RegisterOutputSpec = _outputs_of(RegisterInputSpec)


class Register(_AtlasMorphCommand):
    """`atlasmorph register`: a subject to its attribute-matched template (moved image and warp by default).

    >>> reg = Register(in_file="sub01.nii.gz", age=70, sex="F", labels_file=True)  # doctest: +SKIP
    >>> reg.cmdline  # doctest: +SKIP
    'atlasmorph register sub01.nii.gz --age 70 --labels sub01_labels.nii.gz -o sub01_moved.nii.gz --threads 1 --sex F -t sub01_warp.nii.gz'
    """

    _cmd = "atlasmorph register"
    input_spec = RegisterInputSpec
    output_spec = RegisterOutputSpec


# ----------------------------------------------------------------------------------------- segment
class SegmentInputSpec(_SubjectInputSpec):
    seg_file = File(argstr="-o %s", name_source="in_file", name_template="%s_dseg.nii.gz", keep_extension=False,
                    hash_files=False, desc="segmentation (34 structures, FreeSurfer ids)")
    probs_file = _on_request("--probs %s", "%s_probseg.nii.gz", "4D label probabilities in subject space",
                             name_source="in_file")
    volumes_file = _on_request("--vol %s", "%s_volumes.csv", "structure volumes in mm3 (CSV)",
                               name_source="in_file", default=True)


SegmentOutputSpec = _outputs_of(SegmentInputSpec)


class Segment(_AtlasMorphCommand):
    """`atlasmorph segment`: the 34-structure segmentation on the subject's grid (+ volumes CSV by default)."""

    _cmd = "atlasmorph segment"
    input_spec = SegmentInputSpec
    output_spec = SegmentOutputSpec


# ----------------------------------------------------------------------------------------- build
class BuildInputSpec(CommandLineInputSpec):
    in_file = File(exists=True, mandatory=True, argstr="%s", position=0,
                   desc="the group: a .txt list of T1 images or a cohort .csv (t1, optional mask/seg, attributes)")
    out_file = File("template.nii.gz", usedefault=True, argstr="-o %s", hash_files=False,
                    desc="built template T1 (model grid, MNI space)")
    labels_file = _on_request("--labels %s", "template_labels.nii.gz", "template label map (FreeSurfer ids)",
                              default=True)
    probs_file = _on_request("--probs %s", "template_probs.nii.gz", "4D label probabilities (background + 34)")
    hires_file = _on_request("--hires %s", "template_hires.nii.gz", "template T1 at the inputs' resolution")
    report_file = _on_request("--report %s", "build_report.json", "report (JSON)", default=True)
    iterations = traits.Range(low=1, argstr="--iterations %d", desc="register-average-correct rounds (default 3)")
    initial = File(exists=True, argstr="--initial %s", requires=["initial_labels"], xor=["age", "sex"],
                   desc="starting template T1 (default: the conditional template of the group's mean attributes)")
    initial_labels = File(exists=True, argstr="--initial-labels %s", requires=["initial"],
                          desc="label map of `initial`")
    age = traits.Float(argstr="--age %g", desc="start from the conditional template of this age")
    sex = traits.Str(argstr="--sex %s", desc="... and this sex")
    skullstripped = traits.Bool(argstr="--skullstripped", desc="every image without a mask is brain-extracted")
    refine = traits.Range(low=0, argstr="--refine %d", desc="instance-optimisation steps per registration")
    model = File(exists=True, argstr="--model %s", desc="model file (.safetensors); default: the shipped model")
    num_threads = traits.Int(1, usedefault=True, argstr="--threads %d", nohash=True,
                             desc="CPU threads for torch (nipype MultiProc reads it as n_procs)")
    quiet = traits.Bool(True, usedefault=True, argstr="--quiet", nohash=True, desc="no progress bar")


class BuildOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="built template T1")
    labels_file = File(exists=True, desc="template labels (FreeSurfer ids)")
    probs_file = File(exists=True, desc="4D label probabilities")
    hires_file = File(exists=True, desc="template T1 at the inputs' resolution")
    report_file = File(exists=True, desc="report (JSON)")


class Build(_AtlasMorphCommand):
    """`atlasmorph build`: a study template from a group of scans; its outputs feed Register/Segment's
    ``template``/``template_labels``.

    >>> Build(in_file="cohort.csv", iterations=2).cmdline  # doctest: +SKIP
    'atlasmorph build cohort.csv --iterations 2 --labels template_labels.nii.gz --threads 1 -o template.nii.gz --quiet --report build_report.json'
    """

    _cmd = "atlasmorph build"
    input_spec = BuildInputSpec
    output_spec = BuildOutputSpec
