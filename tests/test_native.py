"""The native kernels: quantized matmuls on GGUF blocks, fused prologues, rope + cache write,
decode attention; and the engine on a Q4_1 model, where they make every row batch-invariant."""
from array import array

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import test_engine
from fastmode import kernels
from fastmode.model.llama import Rotary
from fastmode.weights.gguf import GGUFFile, dequantize, q4_0_to_q4_1
from gguf_writer import TYPE_IDS, quantize, write_gguf


@pytest.fixture(scope="module")
def lib():
    lib = kernels.load()
    if lib is None:
        pytest.skip("the native kernels cannot be built here (no C compiler)")
    return lib


def blocks(kind, n, k, seed=0):
    """A random [n, k] matrix quantized to `kind`: (type id, raw blocks, its float values)."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    raw = np.frombuffer(quantize(w, kind), dtype=np.uint8)
    exact = dequantize(raw, TYPE_IDS[kind], n * k).reshape(n, k)
    return TYPE_IDS[kind], kernels.pack(TYPE_IDS[kind], torch.from_numpy(raw.reshape(n, -1).copy())), exact


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_quantized_matmul_matches_the_dequantized_weights(lib, kind):
    wtype, raw, exact = blocks(kind, 96, 320)  # 10 blocks a row: one group of 8 and 2 more
    x = torch.randn(7, 320)
    y = kernels.matmul(lib, wtype, raw, 96, 320, x)
    ref = F.linear(x, exact)
    # only the activations are rounded (to 8 bits per 32-value block)
    assert ((y - ref).norm() / ref.norm()).item() < 0.02


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
# 64: weight rows 16 at a time on AVX-512 VNNI (x rows in tiles of 1 to 8), else 8; 200: 8 at a time
# (not a multiple of the tiles); 100: per row
@pytest.mark.parametrize("n", [64, 200, 100])
def test_every_row_is_bit_identical_in_any_batch_and_with_any_thread_count(lib, kind, n):
    wtype, raw, exact = blocks(kind, n, 576, seed=1)
    x = torch.randn(13, 576)
    full = kernels.matmul(lib, wtype, raw, n, 576, x)
    ref = F.linear(x, exact)
    assert ((full - ref).norm() / ref.norm()).item() < 0.02
    for m in range(1, 13):  # every tile size, a tile and its remainder, and one row at a time
        assert torch.equal(kernels.matmul(lib, wtype, raw, n, 576, x[:m]), full[:m]), m
        assert torch.equal(kernels.matmul(lib, wtype, raw, n, 576, x[m:m + 1]), full[m:m + 1]), m
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernels.matmul(lib, wtype, raw, n, 576, x), full)
    finally:
        torch.set_num_threads(threads)


def test_rms_norm_prologue_rows_are_bit_identical_in_any_batch_and_with_any_thread_count(lib):
    """A thread sums its rows' squares four rows at a time (each row's sum in its own order), 64
    rows to a buffer: a row's result is the same alone, in any batch and on any thread count."""
    wtype, raw, _ = blocks("Q4_1", 64, 576, seed=3)
    x = torch.randn(150, 576) * torch.logspace(-2, 2, 150)[:, None]
    norm = torch.rand(576) + 0.5
    full = kernels.matmul(lib, wtype, raw, 64, 576, x, kernels.PRO_RMSNORM, norm, 1e-5)
    for m in (*range(1, 10), 13, 70, 129):
        assert torch.equal(kernels.matmul(lib, wtype, raw, 64, 576, x[:m], kernels.PRO_RMSNORM, norm, 1e-5), full[:m]), m
    for i in (0, 5, 77, 149):
        assert torch.equal(kernels.matmul(lib, wtype, raw, 64, 576, x[i:i + 1], kernels.PRO_RMSNORM, norm, 1e-5),
                           full[i:i + 1]), i
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # 150 rows on one thread: past a buffer of 64 sums
        assert torch.equal(kernels.matmul(lib, wtype, raw, 64, 576, x, kernels.PRO_RMSNORM, norm, 1e-5), full)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def avx2_lib(lib, tmp_path_factory):
    """The kernels built without AVX-512 (their AVX2 path), where this CPU has it; else None."""
    if not lib.fm_has_avx512():
        return None
    avx2 = kernels.build_with(["-mno-avx512f"], tmp_path_factory.mktemp("avx2"))
    assert avx2 is not None and avx2.fm_has_avx2() and not avx2.fm_has_avx512()
    return avx2


@pytest.mark.parametrize("prologue", ["none", "rms_norm", "swiglu"])
def test_rows_quantized_in_parts_equal_rows_quantized_whole(lib, avx2_lib, prologue):
    """With fewer rows than threads (a lone row: every standard pass), each row's blocks are
    quantized in parts, one a thread, its prologue run over each part: the products are the
    bits of one thread's, which keeps rows whole, and of the same rows among more rows; on
    the AVX2 path too (whose tiles read the quantized rows' chunks pre-broadcast), with the
    same bits."""
    k = 576
    w = np.random.default_rng(5).standard_normal((512, k)).astype(np.float32)  # 512 x 18 blocks: parallel from one row on
    raw = torch.from_numpy(np.frombuffer(quantize(w, "Q4_1"), dtype=np.uint8).reshape(512, -1).copy())
    pro, width, norm = {"none": (kernels.PRO_NONE, k, None), "rms_norm": (kernels.PRO_RMSNORM, k, torch.rand(k) + 0.5),
                        "swiglu": (kernels.PRO_SWIGLU, 2 * k, None)}[prologue]
    x = torch.randn(6, width) * torch.logspace(-1, 1, 6)[:, None]
    before = getattr(kernels._local, "threads", 0)
    results = []
    try:
        for build in (b for b in (lib, avx2_lib) if b is not None):
            packed = kernels.pack(TYPE_IDS["Q4_1"], raw, build)
            kernels.set_threads(1)
            whole = kernels.matmul(build, TYPE_IDS["Q4_1"], packed, 512, k, x, pro, norm, 1e-5)
            for t in (2, 3):
                kernels.set_threads(t)
                assert torch.equal(kernels.matmul(build, TYPE_IDS["Q4_1"], packed, 512, k, x, pro, norm, 1e-5), whole), t
                for m in (1, 2, 3, 5):
                    got = kernels.matmul(build, TYPE_IDS["Q4_1"], packed, 512, k, x[:m], pro, norm, 1e-5)
                    assert torch.equal(got, whole[:m]), (t, m)
            results.append(whole)
    finally:
        kernels.set_threads(before)
    assert all(torch.equal(r, results[0]) for r in results)


def test_fused_prologues_and_the_residual_add(lib):
    wtype, raw, exact = blocks("Q4_1", 64, 288, seed=2)
    x = torch.randn(5, 288)
    norm = torch.rand(288) + 0.5
    y = kernels.matmul(lib, wtype, raw, 64, 288, x, kernels.PRO_RMSNORM, norm, 1e-5)
    ref = F.linear(F.rms_norm(x, (288,), norm, 1e-5), exact)
    assert ((y - ref).norm() / ref.norm()).item() < 0.02
    gate_up = torch.randn(5, 576)
    y = kernels.matmul(lib, wtype, raw, 64, 288, gate_up, kernels.PRO_SWIGLU)
    ref = F.linear(F.silu(gate_up[:, :288]) * gate_up[:, 288:], exact)
    assert ((y - ref).norm() / ref.norm()).item() < 0.02
    residual = torch.randn(5, 64)
    expected = residual + kernels.matmul(lib, wtype, raw, 64, 288, x)  # the same dot products, one add
    out = residual.clone()
    assert kernels.matmul(lib, wtype, raw, 64, 288, x, out=out) is out
    assert torch.equal(out, expected)


def test_pack_only_reorders_bytes():
    rows = torch.arange(3 * 10 * 20).remainder(251).to(torch.uint8).reshape(3, 200)  # 10 Q4_1 blocks a row
    packed = kernels.pack(kernels.Q4_1, rows)
    assert packed.shape == rows.shape
    for r in range(3):
        group = rows[r, :160].reshape(8, 20)
        assert packed[r, :16].tolist() == group[:, :2].reshape(-1).tolist()  # 8 scales first
        assert packed[r, 16:32].tolist() == group[:, 2:4].reshape(-1).tolist()  # then 8 minimums
        assert packed[r, 32:160].tolist() == group[:, 4:].reshape(-1).tolist()  # then the nibbles
        assert packed[r, 160:].tolist() == rows[r, 160:].tolist()  # the 2 blocks after the group as they were
    q8 = torch.arange(2 * 9 * 34).remainder(251).to(torch.uint8).reshape(2, 306)  # 9 Q8_0 blocks a row
    packed8 = kernels.pack(kernels.Q8_0, q8)
    group = q8[0, :272].reshape(8, 34)
    assert packed8[0, :16].tolist() == group[:, :2].reshape(-1).tolist()
    assert packed8[0, 16:272].tolist() == group[:, 2:].reshape(-1).tolist()
    assert packed8[0, 272:].tolist() == q8[0, 272:].tolist()


def test_q4_0_converts_to_q4_1_exactly():
    w = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    raw = np.frombuffer(quantize(w, "Q4_0"), dtype=np.uint8)
    converted = q4_0_to_q4_1(raw.reshape(-1, 18))
    assert torch.equal(dequantize(raw, TYPE_IDS["Q4_0"], w.size),
                       dequantize(converted.reshape(-1), TYPE_IDS["Q4_1"], w.size))


def test_load_blocks_keeps_quantized_matrices_only(tmp_path):
    rng = np.random.default_rng(4)
    write_gguf(tmp_path / "t.gguf", {"general.architecture": "llama"},
               {"q": (rng.standard_normal((8, 64)), "Q4_0"), "f": (rng.standard_normal((8, 64)), "F16")})
    f = GGUFFile(tmp_path / "t.gguf")
    wtype, raw = f.load_blocks("q")
    assert wtype == TYPE_IDS["Q4_1"] and raw.shape == (8, 2 * 20)
    assert torch.equal(dequantize(raw.numpy().reshape(-1), wtype, 8 * 64).reshape(8, 64), f.load("q"))
    assert f.load_blocks("f") is None


def test_rope_store_rotates_in_place_and_writes_the_cache(lib):
    heads, kv_heads, dim, t = 4, 2, 16, 5
    rope = Rotary(dim, 64, 10000.0)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim)
    positions = torch.tensor([3, 9, 10, 11, 0])
    slots = torch.tensor([7, 2, 5, 1])  # 4 real rows, one padding row
    kc, vc = (torch.zeros(12, kv_heads, dim, dtype=kernels.KV_DTYPE) for _ in range(2))
    before = qkv.clone()
    kernels.rope_store(lib, qkv, heads, kv_heads, dim, rope.cos, rope.signed_sin, positions, slots, 4, kc, vc)
    qk = before[:, :(heads + kv_heads) * dim].view(t, heads + kv_heads, dim)
    expected = Rotary.apply(qk, *rope.tables(positions))
    assert torch.allclose(qkv[:, :(heads + kv_heads) * dim].view(t, heads + kv_heads, dim), expected, atol=1e-5)
    for row, slot in enumerate(slots.tolist()):
        # stored in f16, rounded to nearest even as torch rounds
        assert torch.equal(kc[slot], qkv[row, heads * dim:(heads + kv_heads) * dim].view(kv_heads, dim).half())
        assert torch.equal(vc[slot], before[row, (heads + kv_heads) * dim:].view(kv_heads, dim).half())
    untouched = [s for s in range(12) if s not in slots.tolist()]
    assert kc[untouched].abs().sum() == 0 and vc[untouched].abs().sum() == 0  # nothing else, padding row included
    stored, rotated = kc.clone(), qkv.clone()
    for bad_pos, bad_slots in ((torch.tensor([3, 9, 64, 11, 0]), slots), (positions, torch.tensor([7, 2, 12, 1]))):
        with pytest.raises(kernels.KernelError, match="out of range"):
            kernels.rope_store(lib, qkv, heads, kv_heads, dim, rope.cos, rope.signed_sin, bad_pos, bad_slots, 4, kc, vc)
    assert torch.equal(kc, stored) and torch.equal(qkv, rotated)  # a refused call writes nothing


def test_decode_attention_from_the_paged_cache(lib):
    heads, kv_heads, dim = 4, 2, 16
    k, v = torch.randn(40, kv_heads, dim).half(), torch.randn(40, kv_heads, dim).half()
    slots = torch.randperm(40)[:20]
    q = torch.randn(3, heads, dim)
    lengths = torch.tensor([20, 7, 1])
    out = kernels.attention_rows(lib, q, k, v, slots, torch.zeros(3, dtype=torch.long), lengths, dim ** -0.5)
    for r, n in enumerate(lengths.tolist()):
        keys = k[slots[:n]].float().repeat_interleave(2, 1).transpose(0, 1)  # [heads, n, dim]
        vals = v[slots[:n]].float().repeat_interleave(2, 1).transpose(0, 1)
        p = torch.softmax(q[r].unsqueeze(1) @ keys.transpose(1, 2) * dim ** -0.5, -1)
        assert torch.allclose(out[r], (p @ vals).squeeze(1), atol=1e-5)
        alone = kernels.attention_rows(lib, q[r:r + 1], k, v, slots, torch.zeros(1, dtype=torch.long),
                                       lengths[r:r + 1], dim ** -0.5)
        assert torch.equal(alone[0], out[r])  # a row's result does not depend on the other rows


@pytest.mark.parametrize("dim", [8, 64, 136])  # one vector; the register block; a block and a part
def test_attention_over_any_number_of_keys_and_threads(lib, dim):
    """Key counts around the kernel's 8-key steps, long rows split over threads, large scores."""
    heads, kv_heads, n_keys = 6, 3, 300
    k, v = (torch.randn(n_keys, kv_heads, dim) * 3).half(), torch.randn(n_keys, kv_heads, dim).half()
    slots = torch.randperm(n_keys)
    lengths = torch.tensor([1, 7, 8, 9, 16, 17, 300, 250])
    q = torch.randn(len(lengths), heads, dim) * 3
    offsets = torch.zeros(len(lengths), dtype=torch.long)
    outs, threads_before = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(kernels.attention_rows(lib, q, k, v, slots, offsets, lengths, dim ** -0.5))
    finally:
        torch.set_num_threads(threads_before)
    assert torch.equal(outs[0], outs[1])
    for r, n in enumerate(lengths.tolist()):
        keys = k[slots[:n]].float().repeat_interleave(2, 1).transpose(0, 1)
        vals = v[slots[:n]].float().repeat_interleave(2, 1).transpose(0, 1)
        p = torch.softmax((q[r].unsqueeze(1) @ keys.transpose(1, 2)).double() * dim ** -0.5, -1).float()
        assert torch.allclose(outs[0][r], (p @ vals).squeeze(1), atol=2e-5, rtol=1e-4)


# ---- the engine on a Q4_1 model: the engine's lane tests, on the native kernels ---------

def test_native_lanes_give_identical_greedy_tokens(make_q4_engine):
    test_engine.test_fast_and_standard_give_identical_greedy_tokens(make_q4_engine)


def test_native_lanes_agree_when_drafts_are_often_wrong(make_q4_engine, monkeypatch):
    test_engine.test_lanes_agree_when_drafts_are_often_wrong(make_q4_engine, monkeypatch)


def test_native_output_does_not_depend_on_batch_company(make_q4_engine):
    test_engine.test_output_does_not_depend_on_batch_company(make_q4_engine)


def test_native_chunked_prefill_matches_across_lanes(make_q4_engine):
    test_engine.test_long_prompt_prefills_in_chunks_and_matches_across_lanes(make_q4_engine)


def test_native_verification_needs_no_padding(make_q4_engine):
    engine = make_q4_engine(invariant_numerics=True)
    assert engine.runner.sizes == [] and engine.runner.padded(3) == 3  # nothing to pad for
    verified, sequential = test_engine._verify_vs_sequential(engine, test_engine.prompts(1, seed=6)[0][:30])
    assert torch.equal(verified, sequential)


def test_one_call_blocks_equal_the_layer_by_layer_path(make_q4_engine):
    """A native pass runs every block in one call (fm_blocks); it calls the same kernels in the
    same order as the layer-by-layer path, so logits are bit-identical."""
    engine = make_q4_engine()
    model = engine.model
    prompt = test_engine.prompts(1, seed=13)[0][:30]
    one_call, sequential = test_engine._verify_vs_sequential(engine, prompt)
    assert torch.equal(one_call, sequential)
    table = model._table
    try:
        model._table = None  # the layer-by-layer path
        layered, _ = test_engine._verify_vs_sequential(make_q4_engine(), prompt)
    finally:
        model._table = table
    assert torch.equal(one_call, layered)


def test_one_call_taps_equal_the_layer_by_layer_taps(make_q4_engine):
    """With taps (what the draft head reads) a native pass runs its blocks in one call per tap
    range, reading layers by pointer: the tapped states and logits equal the layer-by-layer
    path's bit for bit (a decode pass with drafts)."""
    prompt = test_engine.prompts(1, seed=14)[0][:30]

    def tapped_pass(engine):
        engine.add("probe", prompt, test_engine.SamplingParams(max_tokens=20), test_engine.Lane.STANDARD, lambda d: None)
        engine.step()
        req = engine.requests["probe"]
        logits, ranges, features = engine.runner.run([test_engine.Scheduled(req, 1, [5, 17, 99])], taps=(0, 1))
        return logits, ranges, features

    engine = make_q4_engine()
    assert engine.model.one_call
    one_call = tapped_pass(engine)
    table = engine.model._table
    try:
        engine.model._table = None  # the layer-by-layer path
        layered = tapped_pass(make_q4_engine())
    finally:
        engine.model._table = table
    assert one_call[1] == layered[1] == [(0, 4)]
    assert one_call[2].shape == (4, 2, engine.model.arch.hidden_size)
    assert torch.equal(one_call[0], layered[0]) and torch.equal(one_call[2], layered[2])


def test_one_call_blocks_refuse_slots_and_positions_out_of_range(make_q4_engine):
    engine = make_q4_engine()
    model, cache = engine.model, engine.cache
    lib = kernels.load()
    x = torch.randn(2, model.arch.hidden_size)
    model._dims[6] = cache.k.shape[1]
    before, k_before = x.clone(), cache.k.clone()
    far = model.rope.cos.shape[0]  # the first position past the rope tables
    cases = (([0, 1], [0, cache.k.shape[1]], [1, 1], [0, 1]),  # a key slot out of range
             ([0, 1], [0, 1], [3, 3], [0, 1]),                 # more keys than slots
             ([0, far], [0, 1], [1, 2], [0, 1]),               # a position past the tables
             ([0, 1], [0, 1], [1, 2], [0, cache.k.shape[1]]))  # a row's own cache slot out of range
    for positions, kv_slots, lengths, slots in cases:
        ints = array("q", [5, 6] + positions + [0, 0] + lengths)  # ids, positions, key offsets, key counts
        with pytest.raises(kernels.KernelError, match="out of range"):
            kernels.blocks(lib, model._table, model._dims, 1e-5, 0.125, x, model.rope.cos, model.rope.signed_sin,
                           ints, torch.tensor(slots), torch.tensor(kv_slots), cache.k, cache.v)
    assert torch.equal(x, before) and torch.equal(cache.k, k_before)  # nothing written
    with pytest.raises(kernels.KernelError, match="outside the vocabulary"):
        kernels.embed_rows(lib, model.embed.weight, array("q", [1, model.arch.vocab_size]), 2)


def test_native_model_stays_close_to_its_float_twin(tiny_q4, make_q4_engine):
    """The same GGUF dequantized to float32 and run in torch: logits agree closely (only the
    activations' 8-bit rounding differs), so the native path computes the same model."""
    from fastmode.weights.registry import load_model
    from fastmode.engine.engine import Engine
    from tests.conftest import small_engine_config
    float_twin = load_model(tiny_q4.name, native_kernels=False)  # the GGUF's path
    assert not float_twin.model.native
    prompt = test_engine.prompts(1, seed=11)[0][:30]  # one prefill chunk
    a, _ = test_engine._verify_vs_sequential(make_q4_engine(), prompt)
    b, _ = test_engine._verify_vs_sequential(
        Engine(float_twin.model, small_engine_config(), float_twin.tokenizer.eos_ids), prompt)
    cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    assert cos > 0.99
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.75


def _arch(**changes):
    import dataclasses
    from fastmode.weights.tiny import tiny_arch, tiny_tokenizer
    return dataclasses.replace(tiny_arch(tiny_tokenizer().vocab_size), **changes)


def test_float_models_with_any_head_size_decode_in_torch(make_engine):
    """Heads the native attention cannot take (head_dim % 8 != 0) still run on float weights."""
    from fastmode.engine.engine import Engine
    from fastmode.weights.registry import _build
    from fastmode.weights.tiny import tiny_state_dict
    from tests.conftest import small_engine_config
    arch = _arch(hidden_size=48, num_heads=4, num_kv_heads=2)  # head_dim 12
    model = _build(arch, tiny_state_dict(arch))
    engine = Engine(model, small_engine_config(), [])
    ps = test_engine.prompts(3, seed=2)
    std, _ = test_engine.run(engine, ps, test_engine.Lane.STANDARD, max_tokens=8)
    fast, _ = test_engine.run(engine, ps, test_engine.Lane.FAST, max_tokens=8)
    assert std == fast and all(len(o) == 8 for o in std)


def test_a_quantized_model_with_qkv_bias_runs_native_and_matches_its_float_twin(lib):
    """Qwen2-style q/k/v biases: the quantized layers keep them (and the block runs native)."""
    from fastmode.engine.engine import Engine
    from fastmode.weights.loader import QuantWeight
    from fastmode.weights.registry import _build
    from fastmode.weights.tiny import tiny_state_dict
    from tests.conftest import small_engine_config
    arch = _arch(qkv_bias=True)
    sd = tiny_state_dict(arch)
    for i in range(arch.num_layers):
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.randn(sd[f"blocks.{i}.attn.qkv.weight"].shape[0]) * 0.1
    quant, floats = dict(sd), dict(sd)
    for name, w in sd.items():
        if name.startswith("blocks.") and name.endswith(".weight") and w.dim() == 2:
            raw = np.frombuffer(quantize(w.numpy(), "Q8_0"), dtype=np.uint8)
            quant[name] = QuantWeight(TYPE_IDS["Q8_0"], torch.from_numpy(raw.reshape(w.shape[0], -1).copy()), w.shape[1])
            floats[name] = dequantize(raw, TYPE_IDS["Q8_0"], w.numel()).reshape(w.shape)
    native, twin = _build(arch, quant), _build(arch, floats)
    assert native.native and not twin.native
    prompt = test_engine.prompts(1, seed=12)[0][:30]
    a, _ = test_engine._verify_vs_sequential(Engine(native, small_engine_config(), []), prompt)
    b, _ = test_engine._verify_vs_sequential(Engine(twin, small_engine_config(), []), prompt)
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() > 0.99
    # the one-call pass adds the biases as the layer-by-layer path does, also with two threads
    # sharing the heads
    assert native.one_call
    two, _ = test_engine._verify_vs_sequential(Engine(native, small_engine_config(num_threads=2), []), prompt)
    table = native._table
    try:
        native._table = None
        layered, _ = test_engine._verify_vs_sequential(Engine(native, small_engine_config(), []), prompt)
    finally:
        native._table = table
    assert torch.equal(a, layered) and torch.equal(two, layered)


def test_thread_chooser_follows_the_measurements():
    from fastmode.engine.runner import ThreadChooser
    c = ThreadChooser([2, 1], explore_every=5)
    assert c.pick(3) == 2  # untried counts first, in order
    c.observe(2, 3, 0.010)
    assert c.pick(3) == 1
    c.observe(1, 3, 0.020)
    picks = [c.pick(3) for _ in range(10)]
    assert picks.count(2) >= 8 and 1 in picks  # the faster count, and now and then the other
    for _ in range(6):  # the machine gets busy: two threads become slow, one is tried again
        c.observe(2, 3, 0.050)
    picks = [c.pick(3) for _ in range(10)]
    assert picks.count(1) >= 8 and 2 in picks
    assert c.pick(8) == 2  # another pass size has its own measurements


def test_thread_chooser_is_not_held_by_one_slow_pass():
    """Interference only ever slows a pass: one slow pass of a count (the first after a start,
    or while another process ran) must not keep the count unused once it is measured fast."""
    from fastmode.engine.runner import ThreadChooser
    c = ThreadChooser([2, 1], explore_every=5)
    c.observe(2, 1, 0.050)  # a slow first pass on two threads
    c.observe(1, 1, 0.003)
    assert c.pick_best(1) == 1
    c.observe(2, 1, 0.0025)  # the next time two threads are tried, they are fast
    assert c.pick_best(1) == 2
    for _ in range(3):  # and a count that stays slow is dropped again
        c.observe(2, 1, 0.009)
    assert c.pick_best(1) == 1


def test_native_lanes_agree_while_the_thread_count_changes_every_pass(make_q4_engine, monkeypatch):
    """Every decode pass alternates between one and two threads: the native kernels' results do
    not depend on the thread count, so the lanes still give the same tokens."""
    from fastmode.engine.runner import ThreadChooser
    engine = make_q4_engine()
    chooser = ThreadChooser([2, 1])
    turn = iter(range(10 ** 6))
    monkeypatch.setattr(chooser, "pick", lambda rows: 1 + next(turn) % 2)
    engine.runner.threads = chooser
    ps = test_engine.prompts(4, seed=21)
    std, _ = test_engine.run(engine, ps, test_engine.Lane.STANDARD)
    fast, _ = test_engine.run(engine, ps, test_engine.Lane.FAST)
    assert std == fast
    assert {t for t, _ in chooser.seconds} == {1, 2}
    reference = make_q4_engine(num_threads=2)
    assert test_engine.run(reference, ps, test_engine.Lane.STANDARD)[0] == std


def test_native_model_stays_on_the_cpu_in_float32(tiny_q4):
    """Engine placement: the native kernels are the CPU's float32 path."""
    with pytest.raises(ValueError, match="native kernels runs on the CPU in float32"):
        tiny_q4.model.place(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="load it without native kernels"):
        tiny_q4.model.place(torch.device("cuda", 0), torch.float32)
    assert next(tiny_q4.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_avx512_vnni_tiles_equal_the_avx2_tiles_bit_for_bit(lib, avx2_lib, kind):
    """Where the CPU has AVX-512 VNNI the tiles use it (16 or 8 rows interleaved); their integer
    sums are exact and their float steps the same, so every output equals the AVX2 build's bit
    for bit: results do not depend on the instruction set."""
    if not lib.fm_has_vnni512():
        pytest.skip("this CPU has no AVX-512 VNNI: there is one path only")
    avx2 = avx2_lib
    assert avx2 is not None and avx2.fm_has_avx2() and not avx2.fm_has_vnni512()
    x = torch.randn(9, 1536) * torch.linspace(0.01, 30.0, 1536)  # small and large activation blocks
    for n in (64, 40):  # 16 rows interleaved (8 on AVX2); 8 rows interleaved on both
        assert lib.fm_row_interleaved(n) == (16 if n % 16 == 0 else 8) and avx2.fm_row_interleaved(n) == 8
        w = np.random.default_rng(n).standard_normal((n, 1536)).astype(np.float32)
        raw = torch.from_numpy(np.frombuffer(quantize(w, kind), dtype=np.uint8).reshape(n, -1).copy())
        ours, theirs = kernels.pack(TYPE_IDS[kind], raw, lib), kernels.pack(TYPE_IDS[kind], raw, avx2)
        for m in (1, 4, 6, 9):
            assert torch.equal(kernels.matmul(lib, TYPE_IDS[kind], ours, n, 1536, x[:m]),
                               kernels.matmul(avx2, TYPE_IDS[kind], theirs, n, 1536, x[:m])), (n, m)


@pytest.mark.parametrize("dim", [8, 24, 64, 136])  # a half vector; one and a half; whole vectors; a block and a part
def test_avx512_attention_equals_the_avx2_attention_bit_for_bit(lib, avx2_lib, dim):
    """On AVX-512 attention runs two keys a vector for the scores and sixteen values a vector
    for the weighted sums, with each lane's operations and their order unchanged: the same bits
    as the AVX2 build, for any number of keys (the last 8 partly filled) and heads per kv head."""
    if not lib.fm_has_avx512():
        pytest.skip("this CPU has no AVX-512: there is one path only")
    avx2 = avx2_lib
    assert avx2 is not None and avx2.fm_has_avx2() and not avx2.fm_has_avx512()
    n_keys = 300
    for heads, kv_heads in ((9, 3), (4, 2), (8, 8), (12, 3)):  # 3, 2, 1 and 4 (3 + 1) query heads a kv head
        k, v = (torch.randn(n_keys, kv_heads, dim) * 3).half(), torch.randn(n_keys, kv_heads, dim).half()
        slots = torch.randperm(n_keys)
        lengths = torch.tensor([1, 2, 3, 7, 8, 9, 15, 16, 17, 161, 250, 300])
        q = torch.randn(len(lengths), heads, dim) * 3
        offsets = torch.zeros(len(lengths), dtype=torch.long)
        ours = kernels.attention_rows(lib, q, k, v, slots, offsets, lengths, dim ** -0.5)
        theirs = kernels.attention_rows(avx2, q, k, v, slots, offsets, lengths, dim ** -0.5)
        assert torch.equal(ours, theirs), (heads, kv_heads)


def test_portable_build_rounds_the_kv_cache_to_f16_like_torch(lib, tmp_path):
    """Without F16C the kernels convert to f16 in C: round to nearest even, subnormals,
    overflow to infinity, the same bits as torch's conversion."""
    plain = kernels.build_with(["-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c"], tmp_path)
    if plain is None:
        pytest.skip("this compiler cannot build the portable kernels with those flags")
    assert not plain.fm_has_avx2()
    heads, kv_heads, dim, t = 1, 1, 8, 64
    rope = Rotary(dim, 4, 10000.0)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim)
    special = torch.tensor([1e-8, -3e-7, 6.1e-5, 65504.0, 65520.0, 70000.0, -1e9, 0.0])
    halfway = torch.tensor([1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 2049.0, 2051.0, -1.0 - 2.0 ** -11, 5e-5, 1e-3, 7.0])
    qkv[:2, (heads + kv_heads) * dim:] = torch.stack([special, halfway])  # v rows: stored without rotation
    qkv[2:, (heads + kv_heads) * dim:] *= torch.logspace(-6, 4, t - 2)[:, None]
    kc, vc = (torch.zeros(t, kv_heads, dim, dtype=kernels.KV_DTYPE) for _ in range(2))
    v_rows = qkv[:, (heads + kv_heads) * dim:].clone()
    kernels.rope_store(plain, qkv, heads, kv_heads, dim, rope.cos, rope.signed_sin, torch.zeros(t, dtype=torch.long),
                       torch.arange(t), t, kc, vc)
    assert torch.equal(vc.view(t, dim).view(torch.int16), v_rows.half().view(torch.int16))


def test_kernels_give_the_same_rows_from_any_thread_and_from_two_threads_at_once(lib):
    """The kernels run on their own thread pool, whoever calls them: from the main thread, from
    another thread (as the engine's), and from two threads at once (two engines: one gets the
    pool, the other runs alone), the products are bit-identical and nothing waits forever."""
    import threading
    wtype, raw, _ = blocks("Q4_1", 64, 576, seed=3)
    x = torch.randn(7, 576)
    kernels.set_threads(2)
    try:
        ref = kernels.matmul(lib, wtype, raw, 64, 576, x)
    finally:
        kernels.set_threads(0)
    got, errors = {}, []

    def work(name, rounds):
        try:
            kernels.set_threads(2)
            for _ in range(rounds):
                got.setdefault(name, []).append(kernels.matmul(lib, wtype, raw, 64, 576, x))
        except Exception as e:  # reported below
            errors.append(e)

    workers = [threading.Thread(target=work, args=(name, 200)) for name in ("a", "b")]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in workers)
    assert all(torch.equal(y, ref) for ys in got.values() for y in ys) and len(got["a"]) == len(got["b"]) == 200


def test_a_forked_child_starts_its_own_pool(lib):
    """After fork the child has none of the parent's pool threads: its first team starts new ones
    instead of waiting for threads that do not exist."""
    import multiprocessing
    wtype, raw, _ = blocks("Q8_0", 64, 576, seed=4)
    x = torch.randn(5, 576)
    kernels.set_threads(2)
    try:
        ref = kernels.matmul(lib, wtype, raw, 64, 576, x)  # the parent's pool is running
    finally:
        kernels.set_threads(0)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def child():
        kernels.set_threads(2)
        queue.put(kernels.matmul(lib, wtype, raw, 64, 576, x).numpy())

    p = ctx.Process(target=child)
    p.start()
    p.join(timeout=60)
    assert p.exitcode == 0, "the child's product did not finish"
    assert np.array_equal(queue.get(timeout=10), ref.numpy())


def test_argmax_rows_is_torch_argmax(lib):
    """The greedy verifier's scan: the first largest value, the first NaN before anything,
    infinities, ties and rows `stride` apart, as torch.argmax gives them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 1003, generator=g)
    x[1, 5] = x[1, 900] = float("nan")
    x[2] = 0.0
    x[2, 7] = -0.0
    x[3, 990:] = 1e9  # a tie at the end: the first of them
    x[4] = float("-inf")
    x[5, 3] = float("inf")
    x[6, 1002] = 50.0  # in the tail after the vector steps
    x[7] = torch.randint(0, 3, (1003,), generator=g).float()  # many ties
    for rows in (x, x[:, :1001], x[:, :5], x[:, :1]):
        assert kernels.argmax_rows(lib, rows) == rows.argmax(-1).tolist()
    from fastmode.engine.sampler import greedy_tokens
    assert greedy_tokens(x) == x.argmax(-1).tolist()
    assert greedy_tokens(x.double()) == x.argmax(-1).tolist()  # not float32: torch's own


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("n", [64, 200, 100])
def test_matmul_with_argmax_gives_argmax_rows_answer_from_any_thread_count(lib, kind, n):
    """The head's fused greedy choice: each thread scans the columns it computed, thread 0 joins
    the spans; the answer is the scan's over the whole row (ties across spans, NaN rows)."""
    w = np.random.default_rng(3).standard_normal((n, 576)).astype(np.float32)
    w[40] = w[10] = 4 * w[10]  # the same largest output in two threads' spans: the first wins
    raw = np.frombuffer(quantize(w, kind), dtype=np.uint8)
    wtype, packed = TYPE_IDS[kind], kernels.pack(TYPE_IDS[kind], torch.from_numpy(raw.reshape(n, -1).copy()))
    x = torch.randn(9, 576)
    x[0] = torch.from_numpy(w[10])
    x[5] = float("nan")
    norm = torch.rand(576) + 0.5
    before = getattr(kernels._local, "threads", 0)
    try:
        for t in (1, 2, 3):
            kernels.set_threads(t)
            for m in (1, 2, 3, 8, 9):
                for pro, nw in ((kernels.PRO_NONE, None), (kernels.PRO_RMSNORM, norm)):
                    plain = kernels.matmul(lib, wtype, packed, n, 576, x[:m], pro, nw, 1e-5)
                    got = torch.full((m,), -7, dtype=torch.int64)
                    y = kernels.matmul(lib, wtype, packed, n, 576, x[:m], pro, nw, 1e-5, argmax=got)
                    torch.testing.assert_close(y, plain, rtol=0, atol=0, equal_nan=True)  # the same bits
                    assert got.tolist() == kernels.argmax_rows(lib, y) == y.argmax(-1).tolist(), (t, m)
            assert kernels.argmax_rows(lib, y)[0] == 10
    finally:
        kernels.set_threads(before)
    with pytest.raises(kernels.KernelError):
        kernels.matmul(lib, wtype, packed, n, 576, x[:2], out=torch.zeros(2, n), argmax=torch.zeros(2, dtype=torch.int64))


def test_native_passes_hand_the_greedy_choice_over_with_the_logits(make_q4_engine):
    """The engine takes each row's argmax from the head's kernel call: it must be the scan's."""
    from fastmode.engine.sampler import greedy_tokens
    engine = make_q4_engine()
    seen = []
    run = engine.runner.run

    def checked(plan, taps=()):
        logits, ranges, features = run(plan, taps)
        assert engine.runner.greedy is not None and engine.runner.greedy == greedy_tokens(logits)
        seen.append(len(engine.runner.greedy))
        return logits, ranges, features

    engine.runner.run = checked
    test_engine.run(engine, test_engine.prompts(3, seed=2), test_engine.Lane.FAST)
    assert seen and max(seen) > 1  # passes with drafts among them


def test_every_row_is_set_exactly_when_the_logit_rows_are_all_rows_in_order(make_engine, make_q4_engine):
    """Checked on every pass of a float engine (padded passes) and a native one (prefill chunks,
    decode rows with drafts; there `logit_rows` is None for every row); on the native one both
    kinds of pass occur."""
    for engine in (make_engine(), make_q4_engine()):
        seen: list[bool] = []
        _check_every_row(engine, seen)
    assert True in seen and False in seen


def _check_every_row(engine, seen):
    native = engine.model.one_call
    real = engine.runner.build_native if native else engine.runner.build

    def build(plan):
        laid, ranges = real(plan)
        if native:
            wanted = list(range(laid.rows)) if laid.logit_rows is None else laid.logit_rows
            whole = wanted == list(range(laid.rows))
            assert (laid.logit_rows is None) == whole and laid.num_logits == sum(n for _, n in ranges)
        else:
            whole = laid.logit_rows.tolist() == list(range(len(laid.input_ids)))
            assert laid.every_row == whole
        seen.append(whole)
        return laid, ranges

    setattr(engine.runner, "build_native" if native else "build", build)
    long = test_engine.prompts(1, seed=3)[0] * 6  # prefill chunks, then decode with drafts
    test_engine.run(engine, [long, *test_engine.prompts(2, seed=4)], test_engine.Lane.FAST, max_tokens=20)


def test_a_decode_pass_leaves_torch_and_kernel_thread_counts_as_they_were(make_q4_engine, monkeypatch):
    """During a native pass (prompt or decode) torch runs on one thread and the kernels on the
    pass's chosen count (their own pool does the work); afterwards the calling thread has its
    counts back."""
    engine = make_q4_engine(num_threads=2)
    seen = []
    blocks_call = kernels.blocks
    monkeypatch.setattr(kernels, "blocks", lambda *a: (seen.append((torch.get_num_threads(), kernels.threads())),
                                                      blocks_call(*a))[1])
    before = torch.get_num_threads()
    test_engine.run(engine, test_engine.prompts(1, seed=5), test_engine.Lane.FAST)
    assert torch.get_num_threads() == before and kernels.threads() == before
    assert seen and all(t == 1 and k == 2 for t, k in seen)
