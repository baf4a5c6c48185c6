"""Export (oneref.checkpoint.export): ONNX Runtime and torch.export programs against the eager model.

The tiny model (random init, 64 px, small vocabulary) is exported once per kind and format; each
file is then run on several batch sizes and text lengths, with and without padding.
"""

from __future__ import annotations

import copy
import functools
import json
import sys

import pytest
import torch

from oneref.checkpoint import export as export_mod
from oneref.checkpoint.export import (
    ExportError,
    InferenceGraph,
    export_model,
    export_onnx,
    export_program,
    max_text_length,
)
from oneref.models.registry import create_model

ATOL = 1e-4
# (batch, text length, pad the first row): batch 1, the shortest text, lengths not seen at export
CASES = [(1, 2, False), (2, 5, True), (3, 17, True), (2, 40, False)]


def tiny(seg_head: bool) -> torch.nn.Module:
    """A fresh copy of the cached tiny model (the random init itself takes seconds on 2 cores)."""
    return copy.deepcopy(_tiny(seg_head))


@functools.cache
def _tiny(seg_head: bool) -> torch.nn.Module:
    torch.manual_seed(1 + seg_head)
    model = create_model("tiny", img_size=64, vocab_size=1000, seg_head=seg_head)
    with torch.no_grad():  # BatchNorm statistics that are not the identity: eval mode must be exported
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.train()  # export must switch to eval and back


def inputs(model, b: int, n: int, pad: bool, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, 64, 64, generator=gen)
    ids = torch.randint(0, 1000, (b, n), generator=gen)
    mask = torch.zeros(b, n, dtype=torch.bool)
    if pad:
        mask[0, n // 2 :] = True
    return image, ids, mask


def eager(model, args) -> dict[str, torch.Tensor]:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(*args)
    model.train(was)
    return out


def assert_matches_eager(model, run, seed: int) -> None:
    for k, (b, n, pad) in enumerate(CASES):
        args = inputs(model, b, n, pad, seed=seed + k)
        want = eager(model, args)
        got = run(args)
        assert list(got) == list(InferenceGraph(model).output_names)
        for name, value in got.items():
            torch.testing.assert_close(value, want[name], atol=ATOL, rtol=0)


def test_exported_program_matches_eager():
    """In memory, the RES model (both outputs): the fast check of the default suite (~3 s)."""
    model = tiny(True)
    module = export_program(model).module()
    assert model.training  # restored after the export

    def run(args):
        with torch.no_grad():
            return module(*args)

    assert_matches_eager(model, run, seed=20)
    # padding changes the prediction, so the mask really is an input of the graph
    args = inputs(model, 2, 9, False, seed=30)
    padded = (args[0], args[1], args[2].clone().index_fill_(1, torch.tensor([7, 8]), True))
    assert not torch.allclose(run(args)["pred_box"], run(padded)["pred_box"])


# -- files: each export takes 5-10 s on 2 cores (ONNX about twice torch.export) -------------------
@pytest.fixture(scope="module", params=[False, True], ids=["rec", "res"])
def model(request):
    return tiny(request.param)


@pytest.fixture(scope="module")
def onnx_export(model, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return path, export_model(model, path, "onnx")


@pytest.mark.slow
def test_onnx_runtime_matches_eager(model, onnx_export):
    import onnxruntime as ort

    path, report = onnx_export
    assert model.training  # restored after the export
    assert report.max_abs_diff is not None and report.max_abs_diff < ATOL and report.files == (path,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == (["pred_box", "seg_mask"] if model.cfg.seg_head else ["pred_box"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes == {
        "image": ["batch", 3, 64, 64],
        "text_ids": ["batch", "text_len"],
        "text_padding_mask": ["batch", "text_len"],
    }
    meta = json.loads(session.get_modelmeta().custom_metadata_map["oneref"])
    assert meta["config"]["seg_head"] == model.cfg.seg_head and meta["text_len"] == [2, 1022]

    def run(args):
        feeds = dict(zip(("image", "text_ids", "text_padding_mask"), (a.numpy() for a in args)))
        return {k: torch.from_numpy(v) for k, v in zip(names, session.run(None, feeds))}

    assert_matches_eager(model, run, seed=10)


@pytest.mark.slow
def test_saved_program_matches_eager_and_describes_itself(model, tmp_path):
    path = tmp_path / "model.pt2"
    report = export_model(model, path, "torch_export")
    assert model.training and report.max_abs_diff is not None and report.max_abs_diff < ATOL
    assert report.files == (path,) and "batch dynamic, text length 2..1022" in report.summary()
    extra = {"oneref.json": ""}
    module = torch.export.load(path, extra_files=extra).module()
    meta = json.loads(extra["oneref.json"])
    assert meta["format"] == "torch_export" and meta["outputs"] == list(InferenceGraph(model).output_names)
    assert meta["config"]["img_size"] == 64 and meta["image_mean"] == [0.485, 0.456, 0.406]

    def run(args):
        with torch.no_grad():
            return module(*args)

    assert_matches_eager(model, run, seed=40)


@pytest.mark.slow
def test_static_text_length_and_batch():
    model = tiny(False)
    ep = export_program(model, text_lengths=9, batch=2)
    args = inputs(model, 2, 9, True, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(
            ep.module()(*args)["pred_box"], eager(model, args)["pred_box"], atol=ATOL, rtol=0
        )
    with pytest.raises(Exception, match="9|2"):  # the program's guards refuse other sizes
        ep.module()(*inputs(model, 2, 10, False, seed=2))


# -- bad input --------------------------------------------------------------------------------------
def test_unsupported_format(tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'tflite'; choose one of onnx, torch_export"):
        export_model(tiny(False), tmp_path / "m", "tflite")


def test_what_cannot_be_exported(tmp_path):
    for export in (lambda m: export_model(m, tmp_path / "m.pt2", "torch_export"), export_program):
        with pytest.raises(ExportError, match="can only export a OneRef model, got Linear"):
            export(torch.nn.Linear(2, 2))
    with pytest.raises(ExportError, match="can only export a OneRef model, got Linear"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"got PosixPath; load the checkpoint first"):
        export_model(tmp_path / "ckpt.pth", tmp_path / "m.pt2", "torch_export")

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = tiny(False)

    with pytest.raises(ExportError, match="got Wrapper; pass its .model"):
        export_model(Wrapper(), tmp_path / "m.pt2", "torch_export")
    with torch.device("meta"):
        unloaded = create_model("tiny", img_size=64, vocab_size=1000)
    with pytest.raises(ExportError, match="meta device: the weights were never loaded"):
        export_model(unloaded, tmp_path / "m.pt2", "torch_export")
    with pytest.raises(ExportError, match=r"torch.bfloat16: export a float32 model \(model.float\(\)\)"):
        export_model(tiny(False).bfloat16(), tmp_path / "m.pt2", "torch_export")


@pytest.mark.parametrize(
    ("lengths", "match"),
    [(1, "2 <= min <= max <= 1022"), ((10, 5), "2 <= min"), ((2, 1023), "1022"), ("long", "an int or a")],
)
def test_bad_text_lengths(tmp_path, lengths, match):
    with pytest.raises(ValueError, match=match):
        export_model(tiny(False), tmp_path / "m.pt2", "torch_export", text_lengths=lengths)


def test_bad_batch(tmp_path):
    with pytest.raises(ValueError, match="batch must be a positive int or None"):
        export_program(tiny(False), batch=0)


def test_exporter_failure_is_one_clear_error(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Could not guard on data-dependent expression")

    monkeypatch.setattr(torch.export, "export", broken)
    with pytest.raises(ExportError, match="torch.export failed on this model: RuntimeError: Could not guard"):
        export_program(tiny(False))


def test_a_mismatching_export_is_refused(tmp_path, monkeypatch):
    model = tiny(True)
    monkeypatch.setattr(export_mod, "export_program", lambda *a, **k: None)

    def off_by_a_little(path):
        def run(args):
            out = InferenceGraph(model)(*args)
            return {k: v + 1e-3 for k, v in out.items()}

        return run

    monkeypatch.setattr(export_mod, "_program_runner", off_by_a_little)
    with pytest.raises(
        ExportError, match=r"differs from the eager model by up to 0\.001 \(tolerance 0\.0001\)"
    ):
        export_model(model, tmp_path / "m.pt2", "torch_export")
    assert export_model(model, tmp_path / "m.pt2", "torch_export", atol=2e-3).max_abs_diff < 2e-3


def test_missing_extra_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"pip install 'oneref\[export\]'"):
        export_model(tiny(False), tmp_path / "m.onnx", "onnx")


def test_max_text_length_is_the_position_table():
    assert max_text_length(tiny(False)) == 1022
