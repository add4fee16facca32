"""The engine on another device or precision: bfloat16 on this CPU, and on a CUDA GPU when the
machine has one (those tests skip here). The lanes must stay bit-identical on every device."""
import pytest
import torch

from fastmode.config import EngineConfig
from fastmode.engine.engine import Engine
from fastmode.engine.request import Lane
from fastmode.settings import SettingsError, load_settings
from fastmode.weights.registry import load_model
from test_engine import _verify_vs_sequential, prompts, run

CUDA = torch.cuda.is_available()


def engine_on(device: str, dtype: str, **overrides) -> Engine:
    """A fresh tiny-random model (the engine moves its model) on this device and dtype."""
    loaded = load_model("tiny-random")
    config = EngineConfig(kv_cache_tokens=4096, block_size=16, prefill_chunk=32, device=device, dtype=dtype,
                          **overrides)
    return Engine(loaded.model, config, loaded.tokenizer.eos_ids)


PLACES = [("cpu", "bfloat16"), *([("cuda", "bfloat16"), ("cuda", "float32")] if CUDA else [])]


@pytest.mark.parametrize("device,dtype", PLACES)
def test_model_and_cache_live_on_the_device_in_the_dtype(device, dtype):
    engine = engine_on(device, dtype)
    want = getattr(torch, dtype)
    assert engine.cache.k.dtype == engine.cache.v.dtype == want
    assert engine.cache.k.device.type == device
    assert {p.dtype for p in engine.model.parameters()} == {want}
    assert engine.model.rope.cos.dtype == torch.float32  # positions stay exact
    assert engine.model.device.type == device


@pytest.mark.parametrize("device,dtype", PLACES)
def test_lanes_give_identical_greedy_tokens(device, dtype):
    engine = engine_on(device, dtype)
    ps = prompts(8, seed=4)
    std, _ = run(engine, ps, Lane.STANDARD)
    fast, _ = run(engine, ps, Lane.FAST)
    assert std == fast
    assert engine.stats["accepted"] > 0, "no draft was accepted: verification was not exercised"
    alone = [run(engine, [p], Lane.STANDARD)[0][0] for p in ps[:3]]
    assert alone == std[:3]


@pytest.mark.parametrize("device,dtype", PLACES)
def test_verification_rows_equal_one_token_passes_bit_for_bit(device, dtype):
    verified, sequential = _verify_vs_sequential(engine_on(device, dtype), prompts(1, seed=6)[0][:30])
    assert verified.dtype == torch.float32 and verified.device.type == "cpu"  # sampled on the host
    assert torch.equal(verified, sequential)


def test_bfloat16_follows_float32_closely():
    """Same weights in another precision: the logits differ by rounding only."""
    p = prompts(1, seed=6)[0][:30]
    f32, _ = _verify_vs_sequential(engine_on("cpu", "float32"), p)
    b16, _ = _verify_vs_sequential(engine_on("cpu", "bfloat16"), p)
    assert not torch.equal(f32, b16)
    assert torch.allclose(f32, b16, atol=0.1 * f32.abs().max().item())


@pytest.mark.parametrize("field,value,message", [
    ("dtype", "fp8", "dtype must be one of"),
    ("dtype", 16, "dtype must be one of"),
    ("device", "tpu", "device must be"),
    ("device", "cpu:1", "device must be"),
    ("device", "cuda:x", "device must be"),
])
def test_bad_device_or_dtype_is_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{field: value})


def test_settings_file_names_a_bad_device(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('[engine]\ndevice = "gpu"\n')
    with pytest.raises(SettingsError, match="device must be"):
        load_settings(path)
    path.write_text('[engine]\ndevice = "cuda:1"\ndtype = "bfloat16"\n')
    engine = load_settings(path).engine
    assert (engine.device, engine.dtype) == ("cuda:1", "bfloat16")


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        engine_on("cuda", "bfloat16")

