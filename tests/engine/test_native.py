"""The native decode kernels (p2pllm.engine.native): linear_dense (float32 and bfloat16
weights), linear_int8 and linear_int4 against float64 references, the same bits for a row
whatever rows run with it, dtypes, input checks, the QuantWeight layouts and GGUF Q4 blocks
they take, the switches around them, and the dense few-row linears of a model."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import p2pllm.engine.model as model_mod
from p2pllm.engine import native
from p2pllm.engine.loader import load_slice
from p2pllm.engine.quant import QuantWeight, gguf_dequantize, quantize_int4, repack_gguf
from tests.engine.conftest import ARCHS, native_missing
from tests.engine.test_quant import _blocks

CI = os.environ.get("CI") == "true"
EPS = 2.0**-24  # float32 unit roundoff
ROWS = [*range(1, 18), 40]  # 1..17 (every blocking of the kernels' 8/4/2/1 rows) and 40
# (N, K): K not a multiple of 16 or 32, N not a multiple of 4, N over the 64-row thread grain
DENSE_SHAPES = [(1, 1), (5, 7), (3, 31), (7, 16), (16, 33), (33, 100), (130, 47), (64, 128)]
INT4_SHAPES = [(1, 32), (5, 64), (33, 96), (130, 256)]  # int4: K a multiple of 32


def test_the_kernels_build_in_ci() -> None:
    """CI machines have g++: there the kernels must build (a failed build would otherwise only
    log a warning and every test here would skip). Elsewhere a machine without a compiler
    skips (and CI=true turns any such skip into a failure)."""
    kern = native.kernels()
    if CI:
        assert kern is not None, native._state.get("error")
    elif kern is None:
        pytest.skip(native_missing())
    assert callable(kern.linear_dense) and callable(kern.linear_int8)
    assert callable(kern.linear_int4)


@pytest.fixture
def kern() -> Any:
    k = native.kernels()
    if k is None:
        pytest.skip(native_missing())
    return k


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check(y: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, k: int) -> None:
    """y (float32) against a float64 reference: within float32 accumulation error, a bound
    of 2 K eps (|x| @ |w|.T) per output (the kernels' sums have at most ~K/16 + 16 terms)."""
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = (y.double() - ref).abs()
    bound = 2 * (k + 32) * EPS * mag + 1e-30
    assert torch.all(err <= bound), float((err / bound).max())
    # and not vacuous: the reference is not ~0 everywhere
    assert ref.abs().max() > 0.1


def _rows_identical(fn: Any, x: torch.Tensor) -> None:
    """fn(x)[i] is bit for bit fn(x[i:i+1]) and fn(x[a:b])[i-a]: a row's output does not
    depend on the rows it runs with (speculative windows verify what decode would give)."""
    y = fn(x)
    m = x.shape[0]
    for i in range(m):
        assert torch.equal(fn(x[i:i + 1]), y[i:i + 1]), i
    for a, b in ((1, m), (m // 2, m), (0, max(1, m - 3))):
        if a < b:
            assert torch.equal(fn(x[a:b].contiguous()), y[a:b]), (a, b)


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=_gen(seed))


# -- linear_dense ------------------------------------------------------------------------------


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_linear_dense_against_float64(kern: Any, shape: tuple[int, int],
                                      wdtype: torch.dtype) -> None:
    n, k = shape
    w = torch.randn(n, k, generator=_gen(n * 1000 + k)).to(wdtype)
    w64 = w.double()
    for m in ROWS:
        x = _x(m, k, m)
        y = kern.linear_dense(x, w)
        _check(y, x.double() @ w64.t(), x.double().abs() @ w64.abs().t(), k)
    _rows_identical(lambda t: kern.linear_dense(t, w), _x(40, k, 99))


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_linear_dense_bfloat16_input(kern: Any, wdtype: torch.dtype) -> None:
    """A bfloat16 input is widened exactly and the float32 result rounded once to bfloat16
    (to nearest even, as torch rounds): the same bits as rounding the float32 call's output."""
    n, k = 70, 45
    w = torch.randn(n, k, generator=_gen(1)).to(wdtype)
    for m in (1, 3, 16, 40):
        x = _x(m, k, m).bfloat16()
        y = kern.linear_dense(x, w)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert torch.equal(y, kern.linear_dense(x.float(), w).bfloat16())
        ref = x.double() @ w.double().t()
        assert torch.all((y.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-3 * ref.abs().max())
    _rows_identical(lambda t: kern.linear_dense(t, w), _x(17, k, 5).bfloat16())


def test_rows_identical_whatever_the_threads(kern: Any) -> None:
    """Threads split the weight's rows, never a sum: 1 and 2 threads give the same bits."""
    w = torch.randn(300, 96, generator=_gen(2))
    q = torch.randint(-127, 128, (300, 96), generator=_gen(3), dtype=torch.int8)
    s = torch.rand(300, generator=_gen(4)) * 0.01
    x = _x(11, 96, 5)
    before = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append((kern.linear_dense(x, w), kern.linear_int8(x, q, s)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# -- linear_int8 -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_linear_int8_against_float64(kern: Any, shape: tuple[int, int]) -> None:
    n, k = shape
    g = _gen(n * 7 + k)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.05 + 0.001
    w64 = q.double() * scale.double()[:, None]
    for m in ROWS:
        x = _x(m, k, m + 50)
        y = kern.linear_int8(x, q, scale)
        _check(y, x.double() @ w64.t(), x.double().abs() @ w64.abs().t(), k)
        yb = kern.linear_int8(x.bfloat16(), q, scale)
        assert yb.dtype == torch.bfloat16
        assert torch.equal(yb, kern.linear_int8(x.bfloat16().float(), q, scale).bfloat16())
    _rows_identical(lambda t: kern.linear_int8(t, q, scale), _x(40, k, 98))


# -- linear_int4 -------------------------------------------------------------------------------


def _int4(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (N, K) 0..15, packed (N, K/2) in Q4 order, dm (N, K/32, 2) float32)."""
    g = _gen(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    b = codes.reshape(n, k // 32, 32)
    packed = (b[..., :16] | (b[..., 16:] << 4)).reshape(n, k // 2).contiguous()
    d = torch.rand(n, k // 32, generator=g) * 0.05 + 0.001
    mn = -torch.rand(n, k // 32, generator=g) * 0.4
    return codes, packed, torch.stack([d, mn], -1).contiguous()


def _int4_weight(codes: torch.Tensor, dm: torch.Tensor, magnitude: bool = False
                 ) -> torch.Tensor:
    """float64 d * code + mn; ``magnitude``: d * code + |mn| (the terms the kernel sums)."""
    n, k = codes.shape
    c = codes.double().reshape(n, k // 32, 32)
    mn = dm[..., 1:2].double()
    return (c * dm[..., 0:1].double() + (mn.abs() if magnitude else mn)).reshape(n, k)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    n = packed.shape[0]
    b = packed.reshape(n, -1, 16)
    return torch.cat([b & 0x0F, b >> 4], dim=-1).reshape(n, -1)


@pytest.mark.parametrize("shape", INT4_SHAPES)
def test_linear_int4_against_float64(kern: Any, shape: tuple[int, int]) -> None:
    n, k = shape
    codes, packed, dm = _int4(n, k, n + k)
    assert torch.equal(_unpack(packed), codes)
    w64 = _int4_weight(codes, dm)
    # the kernel sums d * (q . x) and mn * sum(x) per group: bound by those terms' magnitudes
    mag_w = _int4_weight(codes, dm, magnitude=True)
    for m in ROWS:
        x = _x(m, k, m + 100)
        y = kern.linear_int4(x, packed, dm)
        _check(y, x.double() @ w64.t(), x.double().abs() @ mag_w.t(), k)
        yb = kern.linear_int4(x.bfloat16(), packed, dm)
        assert yb.dtype == torch.bfloat16
        assert torch.equal(yb, kern.linear_int4(x.bfloat16().float(), packed, dm).bfloat16())
    _rows_identical(lambda t: kern.linear_int4(t, packed, dm), _x(40, k, 97))


def test_int4_nibble_order_is_gguf_q4(kern: Any) -> None:
    """Byte j of a group holds code j (low nibble) and code j + 16 (high): one code set at a
    time picks out exactly that input."""
    n, k = 2, 64
    dm = torch.tensor([[[1.0, 0.0]] * 2] * 2)
    x = torch.arange(1, k + 1, dtype=torch.float32)[None]
    for j in (0, 5, 15, 16, 21, 31, 32, 47, 63):
        codes = torch.zeros(n, k, dtype=torch.uint8)
        codes[1, j] = 1
        b = codes.reshape(n, 2, 32)
        packed = (b[..., :16] | (b[..., 16:] << 4)).reshape(n, k // 2).contiguous()
        assert kern.linear_int4(x, packed, dm).tolist() == [[0.0, float(j + 1)]]


# -- bad inputs --------------------------------------------------------------------------------


def test_bad_inputs_raise(kern: Any) -> None:
    x = torch.randn(3, 64)
    w = torch.randn(8, 64)
    q8 = torch.zeros(8, 64, dtype=torch.int8)
    s = torch.ones(8)
    q4 = torch.zeros(8, 32, dtype=torch.uint8)
    dm = torch.ones(8, 2, 2)
    bad: list[tuple[Any, str]] = [
        # the input
        (lambda: kern.linear_dense(x.half(), w), "x must be float32 or bfloat16"),
        (lambda: kern.linear_dense(x.double(), w), "x must be float32 or bfloat16"),
        (lambda: kern.linear_dense(x.t().contiguous().t(), w), "contiguous"),
        (lambda: kern.linear_int4(torch.randn(3, 128)[:, ::2], q4, dm), "contiguous"),
        (lambda: kern.linear_dense(torch.randn(64), w), r"\(M, K\)"),
        (lambda: kern.linear_dense(torch.randn(3, 63), w), "63 columns, the weight 64"),
        (lambda: kern.linear_dense(torch.randn(0, 64), w), "x must have rows"),
        (lambda: kern.linear_int8(x.half(), q8, s), "x must be float32 or bfloat16"),
        (lambda: kern.linear_int4(torch.randn(3, 48), q4, dm), "48 columns, the weight 64"),
        # the weight
        (lambda: kern.linear_dense(x, w.half()), "w must be float32 or bfloat16"),
        (lambda: kern.linear_dense(x, w.to(torch.int8)), "w must be float32 or bfloat16"),
        (lambda: kern.linear_dense(x, torch.randn(64, 8).t()), "w must be"),
        (lambda: kern.linear_dense(x, torch.randn(8, 64, 1)), "w must be"),
        (lambda: kern.linear_int8(x, q8.to(torch.uint8), s), "q must be CPU int8"),
        (lambda: kern.linear_int8(x, q8, s.bfloat16()), "scale must be float32"),
        (lambda: kern.linear_int8(x, q8, torch.ones(7)), r"scale must be float32 \(N,\)"),
        (lambda: kern.linear_int4(x, q4.to(torch.int8), dm), "q must be CPU uint8"),
        (lambda: kern.linear_int4(torch.randn(3, 48), torch.zeros(8, 24, dtype=torch.uint8),
                                  torch.ones(8, 1, 2)), "multiple of 32"),
        (lambda: kern.linear_int4(x, q4, torch.ones(8, 2)), "dm must be float32"),
        (lambda: kern.linear_int4(x, q4, torch.ones(8, 1, 2)), "dm must be float32"),
        (lambda: kern.linear_int4(x, q4, dm.bfloat16()), "dm must be float32"),
    ]
    for call, message in bad:
        with pytest.raises(RuntimeError, match=message):
            call()


# -- QuantWeight layouts -------------------------------------------------------------------------


def _both_layouts(w: torch.Tensor, mode: str, monkeypatch: pytest.MonkeyPatch
                  ) -> tuple[QuantWeight, QuantWeight]:
    nat = QuantWeight.from_float(w, mode)
    with monkeypatch.context() as mp:
        mp.setenv("P2PLLM_NATIVE", "0")
        tor = QuantWeight.from_float(w, mode)
    assert (nat.layout, tor.layout, nat.kind, tor.kind) == ("native", "torch", mode, mode)
    return nat, tor


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quant_layouts_agree(kern: Any, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same float weight in both layouts: the same codes, the same weight up to torch's
    bfloat16 scales (int8: the same bf16 scales, widened), the same products up to torch's
    bfloat16 activations and outputs; the native one closer to float64 x @ dequantized.T."""
    w = torch.randn(96, 128, generator=_gen(11))
    nat, tor = _both_layouts(w, mode, monkeypatch)
    dn, dt = nat.dequantize(), tor.dequantize()
    if mode == "int8":
        assert torch.equal(nat.packed, tor.packed) and torch.equal(dn, dt)
        assert nat.scale32 is not None and torch.equal(nat.scale32, tor.scales.float())
        assert nat.nbytes() == tor.nbytes() + 96 * 4
    else:
        q, _, _ = quantize_int4(w)
        b = q.reshape(96, 4, 32)
        assert torch.equal(nat.packed, (b[..., :16] | (b[..., 16:] << 4)).reshape(96, 64))
        assert nat.scales.shape == (96, 4, 2) and nat.scales.dtype == torch.float32
        step = nat.scales[..., 0].repeat_interleave(32, dim=1)
        assert torch.all((dn - dt).abs() <= 2**-7 * (dn.abs() + 16 * step))  # bf16 (s, zero)
        assert torch.all((dn - w).abs() <= step / 2 + 1e-5)  # half a code step
    x = torch.randn(2, 7, 128, generator=_gen(12))
    yn = nat.matmul(x)
    with monkeypatch.context() as mp:
        mp.setenv("P2PLLM_NATIVE", "0")
        yt = tor.matmul(x)
    assert yn.dtype == torch.float32 and yt.dtype == torch.bfloat16 and yn.shape == (2, 7, 96)
    scale = yn.abs().max()
    assert (yn - yt.float()).abs().max() <= 0.02 * scale
    ref = (x.double() @ dn.double().t())
    err_n = (yn.double() - ref).abs().max()
    assert err_n <= 1e-5 * scale
    assert err_n < (yt.double() - ref).abs().max()  # float32 activations: closer
    # a bfloat16 input stays bfloat16 on the native layout, computed in float32
    yb = nat.matmul(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, nat.matmul(x.bfloat16().float()).bfloat16())


@pytest.mark.parametrize("ggml_type", [2, 3])  # Q4_0, Q4_1
def test_q4_gguf_repack_is_exact_in_the_native_layout(kern: Any, ggml_type: int) -> None:
    """The native layout keeps Q4 blocks' nibbles as they are and d and m (f16, exact in
    float32; Q4_0's min is -8d, exact too): it dequantizes to exactly gguf_dequantize's
    values, and multiplies by them (float32 accumulation aside)."""
    raw = _blocks(ggml_type, 48, 160, 21)
    values = gguf_dequantize(ggml_type, raw.shape, torch.from_numpy(raw.blocks))
    qw = repack_gguf(raw, "int4")
    assert (qw.kind, qw.layout, qw.group) == ("int4", "native", 32)
    qs = torch.from_numpy(raw.blocks).reshape(48, 5, -1)[..., -16:].reshape(48, 80)
    assert torch.equal(qw.packed, qs)  # the file's bytes, as they are
    assert torch.equal(qw.dequantize(), values)
    x = torch.randn(5, 160, generator=_gen(22))
    ref = x.double() @ values.double().t()
    mag_w = _int4_weight(_unpack(qw.packed), qw.scales, magnitude=True)
    _check(qw.matmul(x), ref, x.double().abs() @ mag_w.t(), 160)


def test_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    """P2PLLM_NATIVE=0 turns the kernels off (even when built and cached); a failed build
    is None (torch's kernels), and an error under P2PLLM_NATIVE=1."""
    monkeypatch.setenv("P2PLLM_NATIVE", "0")
    assert native.kernels() is None
    assert QuantWeight.from_float(torch.randn(16, 32), "int4").layout == "torch"
    monkeypatch.setattr(native, "_state", {"error": "native kernels not built (boom)"})
    monkeypatch.setenv("P2PLLM_NATIVE", "")
    assert native.kernels() is None
    monkeypatch.setenv("P2PLLM_NATIVE", "1")
    with pytest.raises(native.NativeBuildError, match="boom"):
        native.kernels()


# -- the dense few-row linears of a model ----------------------------------------------------------


class _Counting:
    """The kernels module, counting linear_dense calls."""

    def __init__(self, mod: Any) -> None:
        self.mod, self.dense = mod, 0

    def linear_dense(self, *a: Any) -> Any:
        self.dense += 1
        return self.mod.linear_dense(*a)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.mod, name)


def test_dense_linear_goes_native_up_to_the_row_limit(kern: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _Counting(kern)
    monkeypatch.setattr(native, "kernels", lambda: counting)
    w = torch.randn(40, 24, generator=_gen(31))
    b = torch.randn(40, generator=_gen(32))
    for rows, calls in ((1, 1), (model_mod.NATIVE_MAX_ROWS, 2), (model_mod.NATIVE_MAX_ROWS + 1, 2)):
        x = torch.randn(1, rows, 24, generator=_gen(rows))
        with torch.inference_mode():
            y = model_mod._dense_linear(x, w, b)
        assert counting.dense == calls and y.shape == (1, rows, 40)
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # bfloat16 too
        y = model_mod._dense_linear(torch.randn(2, 24).bfloat16(), w.bfloat16(), None)
    assert counting.dense == 3 and y.dtype == torch.bfloat16
    monkeypatch.setattr(model_mod, "NATIVE_DENSE", False)
    with torch.inference_mode():
        model_mod._dense_linear(torch.randn(2, 24), w, None)
    assert counting.dense == 3


@pytest.mark.parametrize("arch", ARCHS)
def test_native_dense_model_equals_f_linear(tiny: dict[str, Any], arch: str, kern: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 tiny model through the native few-row linears (the native layer off: it
    takes whole layers; test_engine_decode.py tests it): F.linear's logits (summation order
    apart) and greedy ids, and the kernel really ran (every linear of the 8-token prompt
    and of each step: fused qkv, o, fused gate/up, down of 3 layers and the head)."""
    from tests.engine.test_engine_fastpaths import _decode_logits

    model = load_slice(tiny[arch].path, dtype=torch.float32)
    prompt = [5, 9, 3, 17, 40, 2, 11, 8]
    monkeypatch.setattr(model_mod, "NATIVE_LAYER", False)
    monkeypatch.setattr(model_mod, "NATIVE_DENSE", False)
    monkeypatch.setattr(model_mod, "ONEDNN_FLOAT32", False)
    plain = _decode_logits(model, prompt, 8)
    monkeypatch.setattr(model_mod, "NATIVE_DENSE", True)
    counting = _Counting(kern)
    monkeypatch.setattr(native, "kernels", lambda: counting)
    fast = _decode_logits(model, prompt, 8)
    assert counting.dense == 9 * (4 * 3 + 1)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.argmax(-1), plain.argmax(-1))


def test_native_layout_is_the_default_where_built(kern: Any) -> None:
    """Where the kernels build, a load takes them: quantized weights in the native layout,
    no oneDNN packing of float32/bfloat16 (the native kernels read the plain weights)."""
    from p2pllm.engine.layout import PACK_FLOAT32_MIN_HIDDEN, can_pack
    from p2pllm.engine.loader import BUNDLED_MODELS_DIR

    assert not can_pack(torch.float32, "cpu", PACK_FLOAT32_MIN_HIDDEN)
    assert not can_pack(torch.bfloat16, "cpu", 4096)
    model = load_slice(BUNDLED_MODELS_DIR / "shakespeare", layers=(0, 1), quant="int4")
    layouts = {m.qweight.layout for m in model.modules() if hasattr(m, "qweight")}
    assert layouts == {"native"}


def test_ninja_beside_the_interpreter_is_found(tmp_path: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A virtualenv's p2pllmd run without the venv activated: the ninja the ``ninja`` wheel
    installed beside the interpreter is not on PATH, and torch's build needs it there."""
    import shutil
    import sys

    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "ninja").write_text("#!/bin/sh\n")
    (bindir / "ninja").chmod(0o755)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setitem(sys.modules, "ninja", None)  # the wheel's module: not importable
    assert shutil.which("ninja") is None
    native._ninja_on_path()
    assert shutil.which("ninja") == str(bindir / "ninja")
    assert os.environ["PATH"] == os.pathsep.join([str(bindir), str(tmp_path / "empty")])
    native._ninja_on_path()  # found: PATH left alone
    assert os.environ["PATH"].count(str(bindir)) == 1


def test_the_layers_exp_is_within_a_few_ulp(kern: Any) -> None:
    """The decoder layer's softmax and SiLU use the kernels' vectorised exp: within 4 ulp of
    float64's over float32's normal range; below it (next to) 0, NaN stays NaN."""
    x = torch.cat([torch.linspace(-87.3, 88.3, 100_001), torch.randn(10_000) * 5])
    got, want = kern.exp_f32(x).double(), torch.exp(x.double())
    ulp = (got - want).abs() / want / 2.0**-23
    assert float(ulp.max()) <= 4.0
    for n in (4, 16):  # the scalar tail and the vector body
        edge = kern.exp_f32(torch.tensor([-1e30, -100.0, 0.0, float("nan")] * (n // 4)))
        assert edge[0] == 0 and 0 <= edge[1] < 1e-37 and edge[2] == 1 and torch.isnan(edge[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 5])
def test_paged_attention_reads_rows_where_they_lie(kern: Any, dtype: torch.dtype,
                                                   window: int) -> None:
    """One query per row over keys scattered across chunks (chunk 0 unallocated, rows of
    different lengths, slots in no order) equals SDPA over those keys gathered, per row,
    the last ``window`` keys with a window; a slot outside the allocated chunks raises."""
    g = _gen(7)
    b, nh, nkv, hd, cs = 4, 6, 2, 16, 32
    chunks = [torch.empty(0, dtype=dtype)] + [
        torch.randn(2, nkv, cs, hd, generator=g).to(dtype) for _ in range(2)]
    ks = [c if c.numel() == 0 else c[0].unsqueeze(0) for c in chunks]
    vs = [c if c.numel() == 0 else c[1].unsqueeze(0) for c in chunks]
    lens = [9, 1, 15, 12]
    s = max(lens)
    perm = torch.randperm(2 * cs, generator=g) + cs  # global slots of chunks 1 and 2
    slot = torch.stack([perm[i * s:(i + 1) * s] for i in range(b)]).contiguous()
    q = torch.randn(b, nh, 3 * hd, generator=g).to(dtype)[:, :, :hd]  # strided rows
    out = kern.paged_attention(q, ks, vs, slot, torch.tensor(lens), cs, window, 0.3)
    assert out.dtype == torch.float32 and out.shape == (b, nh, hd)
    for i, n in enumerate(lens):
        lo = n - window if window and n > window else 0
        sl = slot[i, lo:n]
        keys = torch.stack([chunks[int(x) // cs][0, :, int(x) % cs] for x in sl], 1).float()
        vals = torch.stack([chunks[int(x) // cs][1, :, int(x) % cs] for x in sl], 1).float()
        ref = F.scaled_dot_product_attention(q[i].float().unsqueeze(1), keys, vals, scale=0.3,
                                             enable_gqa=True).squeeze(1)
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
    bad = slot.clone()
    bad[1, 0] = 3  # chunk 0: not allocated
    with pytest.raises(RuntimeError, match="allocated"):
        kern.paged_attention(q, ks, vs, bad, torch.tensor(lens), cs, window, 0.3)
    with pytest.raises(RuntimeError, match="lengths"):
        kern.paged_attention(q, ks, vs, slot, torch.tensor([9, 0, 15, 12]), cs, window, 0.3)
