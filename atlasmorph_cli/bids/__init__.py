"""BIDS datasets in, BIDS derivatives out: the T1w walker, participants/sessions attributes, the writer.

    scan = find_bids_inputs(root, participant_labels, session_labels, {"acq": "mprage"})
    writer = DerivativesWriter(out_dir, GeneratedBy.for_model(model_path), root)
    writer.write_dataset_description()
    for inp in scan:                       # inp.path, inp.attrs ({'age': 41.5, 'sex': 'F'}), inp.warnings
        paths = writer.paths_for(inp, ["dseg", "probseg"])
        ...                                # write the images, then
        writer.write_sidecar(inp, "dseg", attributes_used, quality)
    writer.write_volumes(rows, columns)

docs/bids.md describes the naming and why there is no pybids dependency.
"""
from .attributes import read_dataset_attributes
from .derivatives import OUTPUTS, DerivativesWriter, GeneratedBy, derivative_name, sidecar_path
from .layout import BidsInput, BidsInputs, BidsSelection, find_bids_inputs, is_bids_root, parse_entities

__all__ = [
    "BidsInput", "BidsInputs", "BidsSelection", "DerivativesWriter", "GeneratedBy", "OUTPUTS", "derivative_name",
    "find_bids_inputs", "is_bids_root", "parse_entities", "read_dataset_attributes", "sidecar_path",
]
