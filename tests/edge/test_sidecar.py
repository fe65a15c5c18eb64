"""Plan sidecars and engine-cache keys (segfast.edge.sidecar), without TensorRT: fake plan
bytes stand in for an engine — every check here runs before TensorRT would see them."""

from __future__ import annotations

import hashlib
import itertools
import json

import pytest

from segfast.edge import sidecar as S
from segfast.errors import EngineFileError, InputError

ONNX_A = hashlib.sha256(b"model a").hexdigest()
ONNX_B = hashlib.sha256(b"model b").hexdigest()
STATIC = {"input": S.Profile.fixed((1, 3, 64, 64))}
DYNAMIC = {"input": S.Profile((1, 3, 32, 32), (1, 3, 64, 64), (4, 3, 128, 128))}
BASE = {
    "onnx_sha256": ONNX_A,
    "profiles": STATIC,
    "precision": "fp16",
    "tensorrt_version": "10.8.0.43",
    "capability": (8, 7),
}


def test_cache_key_changes_exactly_when_it_must():
    variants = {
        "onnx_sha256": [ONNX_A, ONNX_B],
        "profiles": [
            STATIC,
            DYNAMIC,
            {"input": S.Profile.fixed((1, 3, 64, 96))},
            {"input": S.Profile((1, 3, 32, 32), (1, 3, 64, 64), (4, 3, 256, 256))},
            {"input": S.Profile((1, 3, 32, 32), (1, 3, 96, 96), (4, 3, 128, 128))},
            {
                "input": S.Profile((1, 3, 32, 32), (1, 3, 64, 64), (4, 3, 128, 128)),
                "labels": S.Profile.fixed((1,)),
            },
        ],
        "precision": ["fp32", "fp16"],
        "tensorrt_version": ["10.8.0.43", "10.9.0.34", "11.0.0.1"],
        "capability": [(8, 7), (8, 6), (9, 0)],
    }
    keys = {}
    for combo in itertools.product(*(range(len(v)) for v in variants.values())):
        kw = {name: variants[name][i] for name, i in zip(variants, combo, strict=True)}
        keys[combo] = S.cache_key(**kw)
    # every distinct setting gives a distinct key: nothing that matters is left out
    assert len(set(keys.values())) == len(keys)
    # and the key is a function of the settings alone: same settings, same key, whatever
    # the container types, the order of the profiles or the call
    assert S.cache_key(**BASE) == S.cache_key(**{**BASE, "capability": [8, 7]})
    two = {"b": S.Profile.fixed((1,)), "a": S.Profile.fixed((2, 3))}
    assert S.cache_key(**{**BASE, "profiles": two}) == S.cache_key(
        **{**BASE, "profiles": dict(reversed(list(two.items())))}
    )
    assert len(S.cache_key(**BASE)) == 64


def test_cache_key_rejects_bad_arguments():
    with pytest.raises(ValueError, match="64 lowercase hex"):
        S.cache_key(**{**BASE, "onnx_sha256": "abc"})
    with pytest.raises(ValueError, match="precision"):
        S.cache_key(**{**BASE, "precision": "int4"})
    with pytest.raises(ValueError, match="capability"):
        S.cache_key(**{**BASE, "capability": (9,)})
    with pytest.raises(ValueError, match="at least one"):
        S.cache_key(**{**BASE, "profiles": {}})
    with pytest.raises(TypeError, match="Profile"):
        S.cache_key(**{**BASE, "profiles": {"input": (1, 3, 64, 64)}})


def test_profile_validation_and_shape_check():
    with pytest.raises(ValueError, match="min ≤ opt ≤ max"):
        S.Profile((1, 3, 64, 64), (1, 3, 32, 32), (1, 3, 128, 128))
    with pytest.raises(ValueError, match="one rank"):
        S.Profile((1, 3, 64), (1, 3, 64, 64), (1, 3, 64, 64))
    with pytest.raises(ValueError, match="positive"):
        S.Profile.fixed((1, 0, 4))
    p = DYNAMIC["input"]
    p.check("input", (2, 3, 100, 40))
    with pytest.raises(InputError, match=r"between \[1, 3, 32, 32\] and \[4, 3, 128, 128\]"):
        p.check("input", (1, 3, 129, 64))
    with pytest.raises(InputError, match=r"shape \[1, 3, 64, 64\]"):
        STATIC["input"].check("input", (1, 3, 64, 65))


def _sidecar(plan_data: bytes, **over) -> dict:
    doc = S.make_sidecar(
        plan_data=plan_data,
        tensorrt_version="10.8.0.43",
        strongly_typed=True,
        capability=(8, 7),
        gpu_name="Orin (nvgpu)",
        precision="fp16",
        inputs=[S.TensorSpec("input", "float16", (-1, 3, -1, -1), DYNAMIC["input"])],
        outputs=[S.TensorSpec("mask", "uint8", (-1, -1, -1))],
        onnx_sha256=ONNX_A,
        opset=18,
        output="mask",
        threshold=0.5,
        preprocess={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        segfast_version="0.1.0",
        cuda={"runtime": "12.6", "driver": 12060},
        builder={"workspace": 1 << 30},
    )
    doc.update(over)
    return doc


@pytest.fixture
def plan(tmp_path):
    data = b"not really a TensorRT engine \x00\x01" * 50
    path = tmp_path / "m.plan"
    side = S.write_plan(path, data, _sidecar(data))
    assert side == tmp_path / "m.plan.json"
    return path, data


def test_round_trip(plan):
    path, data = plan
    meta, got = S.load_verified(path, tensorrt_version="10.8.0.43", capability=(8, 7))
    assert got == data
    assert meta.plan_sha256 == hashlib.sha256(data).hexdigest()
    assert meta.inputs[0].profile == DYNAMIC["input"]
    assert meta.outputs[0].dtype == "uint8"
    assert meta.output == "mask"
    assert meta.cache_key == S.cache_key(
        onnx_sha256=ONNX_A,
        profiles=DYNAMIC,
        precision="fp16",
        tensorrt_version="10.8.0.43",
        capability=(8, 7),
    )


def test_tampered_plan_is_refused(plan):
    path, data = plan
    path.write_bytes(data[:-1] + b"X")  # same size, one byte changed
    with pytest.raises(EngineFileError, match=r"sha256 .* does not match .* refusing"):
        S.read_plan(path)
    path.write_bytes(data[:-10])
    with pytest.raises(EngineFileError, match="truncated"):
        S.read_plan(path)


def test_missing_files_are_refused(plan):
    path, _ = plan
    S.sidecar_path(path).unlink()
    with pytest.raises(EngineFileError, match=r"sidecar m\.plan\.json is missing"):
        S.read_plan(path)
    with pytest.raises(EngineFileError, match="no such plan"):
        S.read_plan(path.with_name("other.plan"))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"format": "something-else"}', "not a segfast plan sidecar"),
    ],
)
def test_malformed_sidecar_is_refused(plan, text, match):
    path, _ = plan
    S.sidecar_path(path).write_text(text)
    with pytest.raises(EngineFileError, match=match):
        S.read_plan(path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.pop("plan"), "no field 'plan.sha256'"),
        (lambda d: d["plan"].update(sha256="00" * 31), "is not a sha256"),
        (lambda d: d["plan"].update(bytes="12"), "'plan.bytes' must be int"),
        (lambda d: d["plan"].update(bytes=True), "'plan.bytes' must be int"),
        (lambda d: d.update(format_version=2), "format version 2"),
        (lambda d: d["gpu"].update(capability=[8]), r"\[major, minor\]"),
        (lambda d: d.update(precision="int4"), "precision"),
        (lambda d: d["head"].update(output="boxes"), "head.output"),
        (lambda d: d.update(inputs=[]), "lists no inputs"),
        (lambda d: d["inputs"][0].pop("profile"), "no field 'profile'"),
        (lambda d: d["inputs"][0]["profile"].update(min=[1, 3, 256, 256]), "min ≤ opt ≤ max"),
        (lambda d: d["inputs"][0].update(shape=[1, 3, 64, 64]), "does not fit"),
        (lambda d: d["outputs"][0].update(shape="1x2"), "list of dimensions"),
    ],
)
def test_sidecar_fields_are_validated(plan, edit, match):
    path, _ = plan
    side = S.sidecar_path(path)
    doc = json.loads(side.read_text())
    edit(doc)
    side.write_text(json.dumps(doc))
    with pytest.raises(EngineFileError, match=match):
        S.read_plan(path)


def test_environment_mismatch_is_refused(plan):
    path, _ = plan
    meta, _ = S.read_plan(path)
    S.check_environment(meta, tensorrt_version="10.8.0.43", capability=(8, 7))
    with pytest.raises(
        EngineFileError, match=r"TensorRT 10.8.0.43, this machine has TensorRT 10.9"
    ):
        S.check_environment(meta, tensorrt_version="10.9.0.34", capability=(8, 7))
    with pytest.raises(
        EngineFileError, match=r"compute capability 8.7 \(Orin \(nvgpu\)\), this GPU is 9.0"
    ):
        S.check_environment(meta, tensorrt_version="10.8.0.43", capability=(9, 0))
    with pytest.raises(EngineFileError, match="TensorRT"):
        S.load_verified(path, tensorrt_version="11.0.0.1", capability=(8, 7))


def test_write_plan_refuses_a_sidecar_for_other_bytes(tmp_path):
    with pytest.raises(ValueError, match="does not describe"):
        S.write_plan(tmp_path / "m.plan", b"other", _sidecar(b"plan"))
    assert not (tmp_path / "m.plan").exists()
