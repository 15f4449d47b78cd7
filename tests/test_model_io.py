import os

import onnx
import pytest
from builders import planted_mlp

import condense_graph as cg
from condense_graph.model_io import load_model, save_model


def test_load_copies_and_never_touches_the_callers_model():
    model = planted_mlp([4, 8, 2], [3])
    before = model.SerializeToString()
    cg.condense(model, threshold=0.9999)
    assert model.SerializeToString() == before
    assert load_model(model) is not model


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path):
    model = planted_mlp([4, 8, 2], [3])
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    size = save_model(model, path)
    assert size == path.stat().st_size and onnx.load(path).graph.name == "planted_mlp"
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_save_into_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(cg.CondenseError, match="does not exist"):
        save_model(planted_mlp([4, 8, 2], [3]), tmp_path / "nope" / "m.onnx")


def test_model_level_fields_survive_a_rewrite():
    model = planted_mlp([4, 8, 2], [3])
    model.producer_name, model.doc_string, model.model_version = "maker", "docs", 7
    onnx.helper.set_model_props(model, {"author": "someone"})
    reduced = cg.condense(model, threshold=0.9999).model
    assert (reduced.producer_name, reduced.doc_string, reduced.model_version) == ("maker", "docs", 7)
    assert reduced.metadata_props[0].key == "author"
    assert [(o.domain, o.version) for o in reduced.opset_import] == [
        (o.domain, o.version) for o in model.opset_import
    ]
    assert reduced.graph.initializer[0].dims == [3, 4]


def test_a_model_read_with_external_data_has_the_bytes_of_one_read_from_one_file(tmp_path):
    # onnx marks loaded external tensors DEFAULT explicitly; left so, a reduction of the file would
    # differ in bytes from a reduction that went through runtime's external-data files
    model = planted_mlp([4, 8, 2], [3])
    save_model(model, tmp_path / "one.onnx")
    save_model(model, tmp_path / "split.onnx", external_data=True)
    one, split = load_model(tmp_path / "one.onnx"), load_model(tmp_path / "split.onnx")
    assert split.SerializeToString() == one.SerializeToString() == model.SerializeToString()
