"""Engine: input checks, save → load (fresh process), and every refusal case."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import segfast
from segfast import EngineFileError, InputError, models
from segfast.runtime import engine_file


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return models.create("unet", tiny=True, in_channels=3, num_classes=4).eval()


@pytest.fixture(scope="module")
def engine(unet):
    return segfast.compile(unet, torch.randn(1, 3, 40, 48), backend="torch", output="mask")


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.randn(1, 3, 40), "must be 4-D"),
        (torch.randn(1, 2, 40, 48), "channels is 2, engine expects 3"),
        (torch.randn(1, 3, 41, 48), "height is 41, engine expects 40.*static"),
        (torch.randn(2, 3, 40, 48), "batch is 2"),
        (torch.zeros(1, 3, 40, 48, dtype=torch.uint8), "floating-point.*uint8 frames"),
        (np.zeros((1, 3, 40, 48), np.float32), "torch.from_numpy"),
    ],
)
def test_bad_inputs_are_refused(engine, bad, match):
    with pytest.raises(InputError, match=match):
        engine(bad)


def test_wrong_input_count(engine):
    x = torch.randn(1, 3, 40, 48)
    with pytest.raises(InputError, match="takes 1 input"):
        engine(x, x)


def test_half_input_to_fp32_engine_is_accepted(engine, unet):
    x = torch.randn(1, 3, 40, 48)
    assert engine(x.half()).shape == (1, 40, 48)


def test_summary_names_the_fusions(engine):
    text = engine.summary()
    for word in (
        "backend torch",
        "bn_fold",
        "skip_concat",
        "head_conv",
        "ops:",
        "activation bytes",
    ):
        assert word in text
    assert "Engine(backend='torch'" in repr(engine)


def test_save_load_in_a_fresh_process(engine, tmp_path):
    x = torch.randn(1, 3, 40, 48)
    path = engine.save(tmp_path / "unet.segfast")
    torch.save(x, tmp_path / "x.pt")
    torch.save(engine(x), tmp_path / "y.pt")
    script = textwrap.dedent(
        f"""
        import torch, segfast
        eng = segfast.load({str(path)!r})
        x = torch.load({str(tmp_path / "x.pt")!r})
        y = torch.load({str(tmp_path / "y.pt")!r})
        assert eng.backend == "torch" and eng.output == "mask", eng
        assert torch.equal(eng(x), y)
        assert eng.info.fusions["skip_concat"] == 3
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_dynamic_engine_round_trip(unet, tmp_path):
    eng = segfast.compile(unet, torch.randn(1, 3, 32, 32), backend="torch", dynamic=True)
    loaded = segfast.load(eng.save(tmp_path / "d.segfast"))
    x = torch.randn(1, 3, 45, 29)
    assert torch.allclose(loaded(x), eng(x))
    with pytest.raises(EngineFileError, match="built for input"):
        segfast.load(tmp_path / "d.segfast", input_shape=(1, 3, 1, 29))


def _rewrite(path, mutate_meta=None, mutate_tensors=None, rehash=True):
    """Rewrite an engine file's header/tensors (optionally with fresh digests)."""
    from safetensors.torch import save_file

    meta, tensors = engine_file.read(path)
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_meta:
        mutate_meta(meta)
    if rehash:
        meta["weights_sha256"] = engine_file.weights_digest(tensors)
        meta["header_sha256"] = engine_file.header_digest(meta)
    save_file(tensors, str(path), metadata={"segfast_engine": json.dumps(meta)})


@pytest.fixture
def saved(engine, tmp_path):
    return engine.save(tmp_path / "e.segfast")


def test_truncated_file_is_refused(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 3])
    with pytest.raises(EngineFileError, match="truncated or corrupt"):
        segfast.load(saved)


def test_tampered_weights_are_refused(saved):
    def flip(tensors):
        k = next(k for k in tensors if k.endswith("weight"))
        tensors[k] = tensors[k] + 1e-3

    _rewrite(saved, mutate_tensors=flip, rehash=False)
    with pytest.raises(EngineFileError, match="weights do not match their sha256"):
        segfast.load(saved)


@pytest.mark.parametrize(
    ("old", "new"),
    [(b'precision\\": \\"fp32', b'precision\\": \\"fp16'),  # one flipped bit: 3 → 1
     (b'backend\\": \\"torch', b'backend\\": \\"eager')],
)  # fmt: skip
def test_a_changed_header_field_is_refused(saved, old, new):
    """The fields beside the program and the weights (backend, precision, shapes,
    options) are covered by a digest of their own: they loaded as edited before."""
    data = saved.read_bytes()
    assert data.count(old) == 1
    saved.write_bytes(data.replace(old, new))
    with pytest.raises(EngineFileError, match="header does not match its sha256"):
        segfast.load(saved)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.pop("segfast_version"), "'segfast_version' is missing or malformed"),
        (lambda m: m["inputs"][0].__setitem__("dtype", "gloat32"), "'inputs' is missing"),
        (lambda m: m.__setitem__("backend", "uorch"), "unknown backend 'uorch'"),
    ],
)
def test_a_header_without_its_digest_is_checked_field_by_field(saved, edit, match):
    """Files from before the header digest: a corrupt field is an EngineFileError, not a
    KeyError / AttributeError / ValueError from deep in loading."""

    def mutate(meta):
        meta.pop("header_sha256")
        edit(meta)

    _rewrite(saved, mutate_meta=mutate, rehash=False)
    with pytest.raises(EngineFileError, match=match):
        segfast.load(saved)


def test_tampered_program_is_refused(saved):
    def edit(meta):
        # still valid JSON, but not the program that was hashed
        meta["program"] = meta["program"].replace("aten.relu", "aten.sigmoid", 1) + " "

    _rewrite(saved, mutate_meta=edit)
    with pytest.raises(EngineFileError, match="program does not match"):
        segfast.load(saved)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("torch_version", "1.13.1", "built with torch 1.13.1"),
        ("segfast_version", "9.0.0", "built with segfast 9.0.0"),
        ("format_version", 99, "format"),
    ],
)
def test_other_versions_are_refused(saved, key, value, match):
    _rewrite(saved, mutate_meta=lambda m: m.__setitem__(key, value))
    with pytest.raises(EngineFileError, match=match):
        segfast.load(saved)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_engine_is_refused_without_a_gpu(saved):
    _rewrite(saved, mutate_meta=lambda m: m.__setitem__("device", {"type": "cuda", "name": "H100"}))
    with pytest.raises(EngineFileError, match="built for CUDA"):
        segfast.load(saved)


def test_other_shape_is_refused(saved):
    with pytest.raises(EngineFileError, match="built for input"):
        segfast.load(saved, input_shape=(1, 3, 64, 64))
    assert segfast.load(saved, input_shape=(1, 3, 40, 48)).input_shape == (1, 3, 40, 48)


def test_not_an_engine(tmp_path):
    p = tmp_path / "w.safetensors"
    segfast.save_weights(models.create("unet", tiny=True), p)
    with pytest.raises(EngineFileError, match="not a segfast engine"):
        segfast.load(p)
    with pytest.raises(EngineFileError, match="does not exist"):
        segfast.load(tmp_path / "missing.segfast")


def test_directory_paths(engine, tmp_path):
    """A directory was "does not exist" on load and a raw rename error on save."""
    folder = tmp_path / "e.segfast"
    folder.mkdir()
    with pytest.raises(EngineFileError, match="is a directory, not an engine file"):
        segfast.load(folder)
    with pytest.raises(EngineFileError, match=r"e\.segfast is a directory; give the path"):
        engine.save(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["e.segfast"]


def test_a_path_that_cannot_be_written_is_an_engine_file_error(engine, tmp_path):
    """A raw OSError / SafetensorError before; the file already there is untouched."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(EngineFileError, match="cannot write"):
        engine.save(tmp_path / "afile" / "e.segfast")
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cpu_engine_asked_onto_cuda_without_a_gpu(saved):
    """Used to say the CPU engine "was built for CUDA (None)"."""
    with pytest.raises(EngineFileError, match=r"cannot load .* on cuda: no GPU here"):
        segfast.load(saved, device="cuda")


def test_load_moves_the_program_to_the_device(saved):
    """The weights are read onto the CPU; compiling them for another device raised
    "an exported program on cpu cannot be compiled for cuda" — every GPU engine file
    failed to load. The meta device shows the move without a GPU."""
    eng = segfast.load(saved, device="meta")
    out = eng(torch.randn(1, 3, 40, 48, device="meta"))
    assert (out.device.type, tuple(out.shape)) == ("meta", (1, 40, 48))


@pytest.mark.gpu
def test_cpu_engine_file_loads_onto_the_gpu(saved, unet):
    x = torch.randn(1, 3, 40, 48, device="cuda")
    eng = segfast.load(saved, device="cuda")
    report = segfast.check(eng, copy.deepcopy(unet).to("cuda"), [x])
    assert report.passed, str(report)


def test_dynamic_batch_round_trip_keeps_batch_one(unet, tmp_path):
    """Loading rebuilds from the stored program (traced at batch 2), whose module refuses
    ``eval()``: admitting batch 1 again needs check() to accept it as the reference."""
    eng = segfast.compile(unet, torch.randn(1, 3, 32, 32), backend="torch", dynamic=["batch"])
    loaded = segfast.load(eng.save(tmp_path / "b.segfast"))
    assert loaded.info.inputs[0].dynamic["batch"] == eng.info.inputs[0].dynamic["batch"]
    assert loaded.info.inputs[0].dynamic["batch"][0] == 1
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded(x[:1]), eng(x[:1]))
    assert torch.allclose(loaded(x), eng(x))


def test_failed_save_leaves_nothing(engine, tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "e.segfast"
    target.write_bytes(b"previous content")

    def boom(*a, **k):
        raise OSError("no space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(EngineFileError, match="no space"):
        engine.save(target)
    assert target.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["e.segfast"]


DATA = Path(__file__).resolve().parents[1] / "data"


V1_ENGINE = DATA / "engine_v1_torch_mask.segfast"
WRITTEN_WITH_THIS_TORCH = torch.__version__.startswith("2.13.")


@pytest.mark.skipif(not WRITTEN_WITH_THIS_TORCH, reason="the file was written with torch 2.13")
def test_an_engine_file_written_by_an_earlier_segfast_loads():
    """tests/data/engine_v1_torch_mask.segfast was written by segfast 0.1.0 before the
    layering change (compile in compiler/api.py, load in runtime/engine_file.py) with
    torch 2.13: a small conv/BN/pool/upsample/concat net, ``backend="torch"``,
    ``output="mask"``, dynamic batch. It loads and gives the masks it gave then."""
    from safetensors.torch import load_file

    io = load_file(str(DATA / "engine_v1_io.safetensors"))
    eng = segfast.load(V1_ENGINE)
    assert (eng.backend, eng.output, eng.info.inputs[0].dynamic["batch"][0]) == ("torch", "mask", 1)
    assert torch.equal(eng(io["x"]), io["mask"])
    assert torch.equal(eng(io["x1"]), io["mask1"])
    assert torch.equal(io["mask"], io["logits"].argmax(1).to(torch.uint8))
    assert eng.info.fusions["skip_concat_resize"] == 1
    assert "two-source prologue" in eng.summary()


@pytest.mark.skipif(WRITTEN_WITH_THIS_TORCH, reason="the file loads under torch 2.13 (above)")
def test_an_engine_file_from_another_torch_is_refused_by_version():
    with pytest.raises(EngineFileError, match=r"built with torch 2\.13\.0.*Rebuild"):
        segfast.load(V1_ENGINE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_engine_is_a_snapshot_of_the_model(backend, tmp_path):
    """Changing the model after compile (an in-place weight update, a dtype conversion)
    reaches neither the engine nor the engine file it saves."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.Conv2d(8, 2, 1),
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 12, 12)
    eng = segfast.compile(model, x, backend=backend)
    before = eng(x).clone()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
        model[1].running_mean.add_(1.0)
    model.double()
    assert torch.equal(eng(x), before)
    loaded = segfast.load(eng.save(tmp_path / "snap.segfast"))
    torch.testing.assert_close(loaded(x), before, rtol=1e-5, atol=1e-6)


def test_stored_options_no_backend_reads_are_dropped_on_load(unet, tmp_path, monkeypatch):
    """compile refuses option keys no backend reads; an engine file that stored one (a
    key ignored before that check, or one a later version no longer reads) still loads,
    without it, and says so."""
    eng = segfast.compile(unet, torch.randn(1, 3, 40, 48), backend="torch",
                          options={"winograd": False})  # fmt: skip
    path = tmp_path / "e.segfast"
    eng.save(path)
    from segfast import api

    known = [k for k in api.known_options() if k != "winograd"]
    monkeypatch.setattr(api, "known_options", lambda: known)  # "winograd" is now unknown
    again = segfast.load(path)
    assert "engine file options no backend reads, ignored: ['winograd']" in again.summary()
    x = torch.randn(1, 3, 40, 48)
    assert torch.allclose(again(x), eng(x), atol=1e-4)
