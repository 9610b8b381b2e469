"""BIDS input and derivatives (atlasmorph_cli.bids): walker, filters, attributes, naming, sidecars."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from atlasmorph_cli.bids import (
    OUTPUTS, DerivativesWriter, GeneratedBy, derivative_name, find_bids_inputs, is_bids_root, parse_entities,
    sidecar_path,
)
from atlasmorph_cli.errors import AtlasMorphError
from atlasmorph_cli.labels import STRUCTURES

# The BIDS-derivatives file name templates (spec: derivatives/imaging.md, common-data-types.md) for what
# AtlasMorph writes: the source T1w's entities in BIDS order, then space/desc, or from/to/mode (BEP014).
_LABEL = "[a-zA-Z0-9]+"
_SOURCE = (rf"sub-{_LABEL}(_ses-{_LABEL})?(_acq-{_LABEL})?(_ce-{_LABEL})?(_rec-{_LABEL})?(_run-[0-9]+)?"
           rf"(_echo-[0-9]+)?(_part-(mag|phase|real|imag))?(_chunk-[0-9]+)?")
DERIVATIVE_NAME = re.compile(
    rf"^{_SOURCE}("
    rf"(_space-{_LABEL})?(_desc-{_LABEL})?_(T1w|dseg|probseg|mask|map|qc)\.(nii\.gz|json|png)"
    rf"|_from-{_LABEL}_to-{_LABEL}_mode-(image|points)(_desc-{_LABEL})?_xfm\.(nii\.gz|txt|h5|json)"
    rf")$")


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _tsv(path: Path, rows: list[list[str]]) -> None:
    _touch(path, "".join("\t".join(r) + "\n" for r in rows))


@pytest.fixture
def dataset(tmp_path) -> Path:
    """sub-01..03 plain, sub-04 without T1w, sub-05 with two sessions, sub-06 with acq/run and no
    participants row; a missing age, an unknown sex spelling, decoys in derivatives/ and hidden folders."""
    root = tmp_path / "raw"
    _touch(root / "dataset_description.json", json.dumps({"Name": "toy", "BIDSVersion": "1.10.0",
                                                          "DatasetDOI": "doi:10.0000/toy"}))
    _tsv(root / "participants.tsv", [["participant_id", "age", "sex", "site"],
                                     ["sub-01", "34.5", "M", "HH"],
                                     ["sub-02", "n/a", "female", "Guys"],
                                     ["sub-03", "61", "X", "HH"],
                                     ["sub-04", "45", "f", "n/a"],
                                     ["sub-05", "70", "MALE", ""]])
    for s in ("01", "02", "03"):
        _touch(root / f"sub-{s}" / "anat" / f"sub-{s}_T1w.nii.gz")
        _touch(root / f"sub-{s}" / "anat" / f"sub-{s}_T1w.json", "{}")
    _touch(root / "sub-04" / "anat" / "sub-04_T2w.nii.gz")  # a subject without T1w
    _tsv(root / "sub-05" / "sub-05_sessions.tsv", [["session_id", "age", "sex"],
                                                    ["ses-1", "70.2", "n/a"],
                                                    ["ses-2", "72.5", "n/a"]])
    for ses in ("1", "2"):
        _touch(root / "sub-05" / f"ses-{ses}" / "anat" / f"sub-05_ses-{ses}_T1w.nii.gz")
    for name in ("sub-06_acq-mprage_run-1_T1w.nii", "sub-06_acq-mprage_run-2_T1w.nii", "sub-06_acq-fast_T1w.nii.gz"):
        _touch(root / "sub-06" / "anat" / name)
    _touch(root / "sub-06" / "anat" / "sub-07_T1w.nii.gz")  # contradicts its folder: ignored
    _touch(root / "sub-06" / "anat" / ".sub-06_T1w.nii.gz")  # hidden: ignored
    _touch(root / "derivatives" / "other" / "sub-01" / "anat" / "sub-01_desc-x_T1w.nii.gz")
    _touch(root / ".git" / "sub-09" / "anat" / "sub-09_T1w.nii.gz")
    _touch(root / "sourcedata" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    return root


def _ids(found) -> list[str]:
    return [i.id for i in found]


# ---------------------------------------------------------------------------------------- walker
def test_walker_finds_every_t1w_and_reports_subjects_without(dataset):
    found = find_bids_inputs(dataset)
    assert _ids(found) == ["sub-01", "sub-02", "sub-03", "sub-05_ses-1", "sub-05_ses-2",
                           "sub-06_acq-fast", "sub-06_acq-mprage_run-1", "sub-06_acq-mprage_run-2"]
    assert found.without_t1w == ["04"]
    assert found.has_sessions
    s6 = found.inputs[-1]
    assert list(s6.entities.items()) == [("sub", "06"), ("acq", "mprage"), ("run", "2")]
    assert s6.path == dataset / "sub-06" / "anat" / "sub-06_acq-mprage_run-2_T1w.nii"
    assert (found.inputs[3].subject, found.inputs[3].session) == ("05", "1")
    assert is_bids_root(dataset) and not is_bids_root(dataset / "sub-01")


def test_filters(dataset):
    assert _ids(find_bids_inputs(dataset, ["sub-01", "03"])) == ["sub-01", "sub-03"]
    assert _ids(find_bids_inputs(dataset, ["01,02"])) == ["sub-01", "sub-02"]
    only = find_bids_inputs(dataset, session_labels=["ses-2"])
    assert _ids(only) == ["sub-05_ses-2"]
    assert "01" in only.without_t1w  # a subject without that session has nothing to process
    assert _ids(find_bids_inputs(dataset, entities={"acq": "mprage", "run": "01"})) == ["sub-06_acq-mprage_run-1"]
    assert _ids(find_bids_inputs(dataset, entities={"acq": ["fast", "acq-mprage"]})) == [
        "sub-06_acq-fast", "sub-06_acq-mprage_run-1", "sub-06_acq-mprage_run-2"]
    with pytest.raises(AtlasMorphError, match="no folder sub-99"):
        find_bids_inputs(dataset, ["01", "99"])
    with pytest.raises(AtlasMorphError, match="no folder ses-3"):
        find_bids_inputs(dataset, session_labels=["3"])
    with pytest.raises(AtlasMorphError, match="not an entity of anatomical images"):
        find_bids_inputs(dataset, entities={"task": "rest", "foo": "x"})
    with pytest.raises(AtlasMorphError, match="--participant-label"):
        find_bids_inputs(dataset, entities={"sub": "01"})
    with pytest.raises(AtlasMorphError, match="no T1w image matches"):
        find_bids_inputs(dataset, entities={"rec": "norm"})
    with pytest.raises(AtlasMorphError, match="letters and digits"):
        find_bids_inputs(dataset, ["../01"])


def test_not_a_bids_dataset(tmp_path):
    with pytest.raises(AtlasMorphError, match="no such folder"):
        find_bids_inputs(tmp_path / "nothing")
    with pytest.raises(AtlasMorphError, match="no dataset_description.json"):
        find_bids_inputs(tmp_path)
    _touch(tmp_path / "dataset_description.json", "{}")
    with pytest.raises(AtlasMorphError, match="no sub-\\* folders"):
        find_bids_inputs(tmp_path)


def test_parse_entities():
    assert parse_entities("sub-01_ses-a_run-1_T1w.nii.gz") == ({"sub": "01", "ses": "a", "run": "1"}, "T1w")
    assert parse_entities("sub-01_T1w.json") == ({"sub": "01"}, "T1w")
    for bad in ("T1w.nii.gz", "ses-1_sub-01_T1w.nii", "sub-01_run-1_run-2_T1w.nii", "sub-0_1_T1w.nii",
                "sub-01_acq-a-b_T1w.nii"):
        assert parse_entities(bad) is None, bad


# ------------------------------------------------------------------------------------ attributes
def test_attributes_from_participants_and_sessions(dataset):
    by_id = {i.id: i for i in find_bids_inputs(dataset)}
    assert by_id["sub-01"].attrs == {"age": 34.5, "sex": "M", "site": "HH"}
    assert by_id["sub-01"].warnings == ()
    assert by_id["sub-02"].attrs == {"sex": "F", "site": "Guys"}  # 'n/a' age: missing, no warning
    assert by_id["sub-02"].warnings == ()
    # an unknown sex spelling: missing, with a warning naming the subject, the file and the value
    assert by_id["sub-03"].attrs == {"age": 61.0, "site": "HH"}
    (w,) = by_id["sub-03"].warnings
    assert "sub-03" in w and "participants.tsv" in w and "'X'" in w
    # sessions.tsv overrides per session; its 'n/a' keeps the participant's value
    assert by_id["sub-05_ses-1"].attrs == {"age": 70.2, "sex": "M"}
    assert by_id["sub-05_ses-2"].attrs == {"age": 72.5, "sex": "M"}
    assert by_id["sub-06_acq-fast"].attrs == {}  # no participants.tsv row


def test_session_value_replaces_an_unreadable_participant_value(tmp_path):
    root = tmp_path / "raw"
    _touch(root / "dataset_description.json", "{}")
    _tsv(root / "participants.tsv", [["participant_id", "Age", "Sex"], ["sub-a", "old", "unknown"]])
    _tsv(root / "sub-a" / "sub-a_sessions.tsv", [["session_id", "age", "sex"], ["ses-1", "40", "Female"],
                                                 ["ses-2", "41", "n/a"]])
    for s in ("1", "2"):
        _touch(root / "sub-a" / f"ses-{s}" / "anat" / f"sub-a_ses-{s}_T1w.nii.gz")
    s1, s2 = find_bids_inputs(root)
    assert s1.attrs == {"age": 40.0, "sex": "F"} and s1.warnings == ()
    assert s2.attrs == {"age": 41.0}
    (w,) = s2.warnings
    assert "sub-a" in w and "'unknown'" in w


def test_broken_tables_and_missing_participants(tmp_path):
    root = tmp_path / "raw"
    _touch(root / "dataset_description.json", "{}")
    _touch(root / "sub-1" / "anat" / "sub-1_T1w.nii.gz")
    found = find_bids_inputs(root)
    assert found.inputs[0].attrs == {} and "no participants.tsv" in found.warnings[0]
    _tsv(root / "participants.tsv", [["participant_id", "age"], ["sub-1", "30"], ["1", "31"]])
    with pytest.raises(AtlasMorphError, match="sub-1 has two rows"):
        find_bids_inputs(root)
    _touch(root / "participants.tsv", "participant_id\tage\nsub-1 30\n")
    with pytest.raises(AtlasMorphError, match="separated by tabs"):
        find_bids_inputs(root)
    _tsv(root / "participants.tsv", [["subject", "age"], ["sub-1", "30"]])
    with pytest.raises(AtlasMorphError, match="no 'participant_id' column"):
        find_bids_inputs(root)


# ----------------------------------------------------------------------------------- derivatives
MODEL = GeneratedBy(model_name="atlasmorph-test", model_sha256="ab" * 32, version="9.9.9")


def test_derivative_names_follow_the_bids_templates(dataset):
    found = find_bids_inputs(dataset)
    for inp in found:
        for output in OUTPUTS:
            name = derivative_name(inp, output)
            assert DERIVATIVE_NAME.match(name), name
            assert name.startswith(inp.id + "_")
    s5 = found.inputs[3]
    assert derivative_name(s5, "dseg") == "sub-05_ses-1_desc-atlasmorph_dseg.nii.gz"
    assert derivative_name(found.inputs[-1], "warp") == \
        "sub-06_acq-mprage_run-2_from-T1w_to-template_mode-image_xfm.nii.gz"
    assert derivative_name(s5, "affine") == "sub-05_ses-1_from-T1w_to-template_mode-image_desc-affine_xfm.txt"
    assert derivative_name(s5, "moved") == "sub-05_ses-1_space-template_T1w.nii.gz"
    with pytest.raises(AtlasMorphError, match="unknown output"):
        derivative_name(s5, "everything")


def test_source_entities_stay_valid_bids(dataset):
    """bids-validator's raw-name rules accept the inputs and the source part of every derivative name."""
    bv = pytest.importorskip("bids_validator")
    validator = bv.BIDSValidator()
    found = find_bids_inputs(dataset)
    for inp in found:
        assert validator.is_bids("/" + inp.relative_path(dataset)), inp.path
        for output in OUTPUTS:
            name = derivative_name(inp, output)
            entities, _ = parse_entities(name.removesuffix(OUTPUTS[output].extension))
            source = "_".join(f"{k}-{v}" for k, v in entities.items() if k in inp.entities) + "_T1w.nii.gz"
            folder = f"sub-{inp.subject}/" + (f"ses-{inp.session}/" if inp.session else "")
            assert validator.is_bids(f"/{folder}anat/{source}"), name
            assert validator.is_bids(f"/derivatives/atlasmorph/{folder}anat/{name}")
    for top in ("participants.tsv", "dataset_description.json", "sub-05/sub-05_sessions.tsv"):
        assert validator.is_bids("/" + top)


def test_paths_and_dataset_description(dataset):
    out = dataset / "derivatives" / "atlasmorph"
    writer = DerivativesWriter(out, MODEL, dataset)
    s5 = find_bids_inputs(dataset, ["05"]).inputs[0]
    paths = writer.paths_for(s5, ["dseg", "probseg", "warp", "qc"])
    assert paths["dseg"] == out / "sub-05" / "ses-1" / "anat" / "sub-05_ses-1_desc-atlasmorph_dseg.nii.gz"
    assert paths["qc"].parent == out / "sub-05" / "ses-1" / "figures"
    assert paths["dseg"].parent.is_dir()

    desc_path = writer.write_dataset_description()
    desc = json.loads(desc_path.read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"] == "1.10.0"
    assert desc["Name"] == "AtlasMorph outputs for toy"
    (gen,) = desc["GeneratedBy"]
    assert gen == {"Name": "AtlasMorph", "Version": "9.9.9", "ModelName": "atlasmorph-test",
                   "ModelSHA256": "ab" * 32,
                   "Description": "Conditional-template registration and atlas segmentation with the model "
                                  "atlasmorph-test"}
    assert desc["SourceDatasets"] == [{"URL": "bids:raw:", "DOI": "doi:10.0000/toy"}]
    assert desc["DatasetLinks"] == {"raw": "../.."}
    with open(out / "desc-atlasmorph_dseg.tsv", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    assert rows[0] == ["index", "name", "color"] and len(rows) == 1 + len(STRUCTURES)
    assert rows[1] == ["2", "Left-Cerebral-White-Matter", "#f5f5f5"]
    assert (out / "descriptions.tsv").read_text().startswith("desc_id\tdescription\natlasmorph\t")

    writer.write_dataset_description()  # the same model again: fine
    other = DerivativesWriter(out, GeneratedBy("another-model", "cd" * 32), dataset)
    with pytest.raises(AtlasMorphError, match="holds outputs of atlasmorph-test"):
        other.write_dataset_description()
    _touch(out / "dataset_description.json", json.dumps({"Name": "x", "GeneratedBy": [{"Name": "fMRIPrep"}]}))
    with pytest.raises(AtlasMorphError, match="holds outputs of fMRIPrep"):
        writer.write_dataset_description()
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


def test_sidecars(dataset, tmp_path):
    out = tmp_path / "deriv"  # outside the raw dataset: DatasetLinks still resolves
    writer = DerivativesWriter(out, MODEL, dataset)
    writer.write_dataset_description()
    raw = out / json.loads((out / "dataset_description.json").read_text())["DatasetLinks"]["raw"]
    s5 = find_bids_inputs(dataset, ["05"], ["2"]).inputs[0]

    path = writer.write_sidecar(s5, "dseg", {"age": 72.5, "sex": "M"}, {"qc_score": 0.93, "qc_flagged": False})
    assert path == sidecar_path(writer.path_for(s5, "dseg")) and path.name.endswith("_dseg.json")
    meta = json.loads(path.read_text())
    (source,) = meta["Sources"]
    assert source == "bids:raw:sub-05/ses-2/anat/sub-05_ses-2_T1w.nii.gz"
    assert (raw / source.removeprefix("bids:raw:")).resolve() == s5.path.resolve()
    assert meta["SpatialReference"] == source and meta["Manual"] is False
    assert meta["Model"] == "atlasmorph-test" and meta["ModelSHA256"] == "ab" * 32
    assert meta["Attributes"] == {"age": 72.5, "sex": "M"}
    assert meta["Quality"] == {"qc_score": 0.93, "qc_flagged": False}

    probs = json.loads(writer.write_sidecar(s5, "probseg", None).read_text())
    assert probs["LabelMap"][0] == "Background" and len(probs["LabelMap"]) == 1 + len(STRUCTURES)
    assert probs["Attributes"] is None and "Quality" not in probs  # population-average template
    moved = json.loads(writer.write_sidecar(s5, "moved", {"age": 72.5}).read_text())
    assert "SpatialReference" not in moved and moved["SkullStripped"] is True
    mask = writer.sidecar(s5, "brainmask", None, extra={"Description": "deepbet"})
    assert mask["Type"] == "Brain" and mask["Description"] == "deepbet"
    assert writer.write_sidecar(s5, "affine", None).name.endswith("_desc-affine_xfm.json")
    with pytest.raises(AtlasMorphError, match="no sidecar"):
        writer.write_sidecar(s5, "quality", None)


def test_volumes_table(dataset, tmp_path):
    writer = DerivativesWriter(tmp_path / "d", MODEL, dataset)
    inputs = {i.id: i for i in find_bids_inputs(dataset)}
    rows = [(inputs["sub-01"], ["1000.5", "0.9"]), (inputs["sub-05_ses-2"], ["990", ""]),
            (inputs["sub-06_acq-mprage_run-2"], ["1001", "0.7"])]
    path = writer.write_volumes(rows, ["total_brain", "qc_score"], {"total_brain": {"Units": "mm^3"}})
    with open(path, newline="") as fh:
        table = list(csv.reader(fh, delimiter="\t"))
    assert table == [["participant_id", "session_id", "acq", "run", "total_brain", "qc_score"],
                     ["sub-01", "n/a", "n/a", "n/a", "1000.5", "0.9"],
                     ["sub-05", "ses-2", "n/a", "n/a", "990", "n/a"],
                     ["sub-06", "n/a", "mprage", "2", "1001", "0.7"]]
    assert json.loads(path.with_suffix(".json").read_text()) == {"total_brain": {"Units": "mm^3"}}
    with pytest.raises(AtlasMorphError, match="1 volume cells for 2 columns"):
        writer.write_volumes([(inputs["sub-01"], ["1"])], ["total_brain", "qc_score"])


def test_never_writes_outside_the_output_folder(dataset, tmp_path):
    out = tmp_path / "deriv"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    os.symlink(elsewhere, out / "sub-01")
    writer = DerivativesWriter(out, MODEL, dataset)
    s1 = find_bids_inputs(dataset, ["01"]).inputs[0]
    with pytest.raises(AtlasMorphError, match="outside the output folder"):
        writer.path_for(s1, "dseg")
    assert not any(elsewhere.iterdir())
    _touch(tmp_path / "file")
    with pytest.raises(AtlasMorphError, match="not a folder"):
        DerivativesWriter(tmp_path / "file", MODEL, dataset)


def test_generated_by_for_a_model_file(tmp_path):
    model = _touch(tmp_path / "my-model.safetensors", "not really a model")
    gen = GeneratedBy.for_model(model)
    assert gen.model_name == "my-model"
    assert gen.model_sha256 == hashlib.sha256(b"not really a model").hexdigest()
    assert gen.as_json()["Name"] == "AtlasMorph"


# -------------------------------------------------------------------------------------- real data
def test_bids_dataset_from_ixi_subjects(data_dir, ixi_rows, tmp_path):
    """Five IXI scans as a BIDS dataset (links to the shared T1s): one subject with two sessions, a
    missing age, an unknown sex spelling and a subject without T1w; ages and sexes come back as in the CSV."""
    import nibabel as nib

    rows = ixi_rows[:5]
    root = tmp_path / "ixi-bids"
    _touch(root / "dataset_description.json", json.dumps({"Name": "IXI subset", "BIDSVersion": "1.10.0"}))
    labels = [re.sub("[^a-zA-Z0-9]", "", r["subject"]) for r in rows]
    table = [["participant_id", "age", "sex"]]
    for n, (label, r) in enumerate(zip(labels, rows)):
        age = "n/a" if n == 1 else r["age"]
        sex = "Unknown" if n == 2 else {"M": "male", "F": "female"}[r["sex"]]
        table.append([f"sub-{label}", age, sex])
        t1 = data_dir / "ixi" / r["t1"]
        if n == 0:  # two sessions: the same scan twice, the second a year older
            _tsv(root / f"sub-{label}" / f"sub-{label}_sessions.tsv",
                 [["session_id", "age"], ["ses-1", r["age"]], ["ses-2", str(float(r["age"]) + 1)]])
            for ses in ("1", "2"):
                link = root / f"sub-{label}" / f"ses-{ses}" / "anat" / f"sub-{label}_ses-{ses}_T1w.nii.gz"
                link.parent.mkdir(parents=True)
                os.symlink(t1, link)
        elif n == 4:
            (root / f"sub-{label}" / "anat").mkdir(parents=True)  # no T1w
        else:
            link = root / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
            link.parent.mkdir(parents=True)
            os.symlink(t1, link)
    _tsv(root / "participants.tsv", table)

    found = find_bids_inputs(root)
    assert [i.subject for i in found] == [labels[0], labels[0], labels[1], labels[2], labels[3]]
    assert found.without_t1w == [labels[4]]
    ses1, ses2, missing_age, odd_sex, plain = found.inputs
    assert ses1.attrs == {"age": float(rows[0]["age"]), "sex": rows[0]["sex"]}
    assert ses2.attrs["age"] == pytest.approx(float(rows[0]["age"]) + 1)
    assert missing_age.attrs == {"sex": rows[1]["sex"]}
    assert odd_sex.attrs == {"age": float(rows[2]["age"])} and "'Unknown'" in odd_sex.warnings[0]
    assert plain.attrs == {"age": float(rows[3]["age"]), "sex": rows[3]["sex"]} and plain.warnings == ()
    assert nib.load(str(ses1.path)).shape == (120, 120, 90)  # the links reach the real scans

    out = root / "derivatives" / "atlasmorph"
    writer = DerivativesWriter(out, MODEL, root)
    writer.write_dataset_description()
    for inp in found:
        writer.write_sidecar(inp, "dseg", inp.attrs)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_dseg.json"))
    assert written == sorted(
        f"sub-{i.subject}/" + (f"ses-{i.session}/" if i.session else "") + f"anat/{i.id}_desc-atlasmorph_dseg.json"
        for i in found)
