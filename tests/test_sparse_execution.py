"""execution=sparse: kernels against dense arithmetic (compiled C and torch CSR), sparse layers
against masked dense layers, and whole runs that train the same model as execution=masked."""

import copy
import logging
import subprocess

import pytest
import torch
from torch import nn

from sparse_bench.errors import ConfigError
from sparse_bench.run import run
from sparse_bench.sparsity.execution import kernels
from sparse_bench.sparsity.execution.layers import SparseConv2d, SparseLinear, structure_from_linear
from sparse_bench.train.checkpoint import load_checkpoint

from conftest import Crash, compose, killed_after, read_jsonl, run_in_process

BACKENDS = ["c", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SPARSE_BENCH_KERNELS", request.param)
    if request.param == "c" and kernels.backend() != "c":
        pytest.skip("no C compiler on this machine")
    return request.param


def _random_csr(rows, cols, density, gen):
    mask = torch.rand(rows, cols, generator=gen) < density
    mask[0] = False  # an empty row
    lin = mask.reshape(-1).nonzero().squeeze(1)
    s = structure_from_linear(lin, rows, cols)
    values = torch.randn(lin.numel(), generator=gen)
    dense = torch.zeros(rows * cols)
    dense[lin] = values
    return s, values, dense.view(rows, cols), mask


@pytest.mark.parametrize("nb,batch", [(1, 1), (1, 7), (1, 16), (1, 100), (1, 133), (1, 300), (3, 37)])
def test_kernels_match_dense_products(backend, nb, batch):
    gen = torch.Generator().manual_seed(batch)
    rows, cols = 37, 53
    s, values, w, mask = _random_csr(rows, cols, 0.2, gen)
    xt = torch.randn(nb, cols, batch, generator=gen)
    dyt = torch.randn(nb, rows, batch, generator=gen)
    bias = torch.randn(rows, generator=gen)
    y = kernels.spmm(s["indptr"], s["indices"], values, xt, bias)
    torch.testing.assert_close(y, w @ xt + bias[:, None], rtol=1e-5, atol=1e-5)
    # the input gradient: the same kernel on the transposed structure
    dx = kernels.spmm(s["t_indptr"], s["t_indices"], values[s["t_perm"]], dyt)
    torch.testing.assert_close(dx, w.t() @ dyt, rtol=1e-5, atol=1e-5)
    g = kernels.sddmm(s["indptr"], s["indices"], dyt, xt)
    torch.testing.assert_close(g, (dyt @ xt.transpose(1, 2)).sum(0)[mask], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m", [1, 7, 128, 200, 300])
def test_row_major_kernels_match_dense_products(backend, m):
    """The kernels for (tokens, features) inputs: y = x W^T + b, dx = dy W, and dy^T x at the
    active positions, across row tiles (128 rows) and a short last tile."""
    gen = torch.Generator().manual_seed(m)
    rows, cols = 37, 53
    s, values, w, mask = _random_csr(rows, cols, 0.2, gen)
    x, dy, bias = torch.randn(m, cols, generator=gen), torch.randn(m, rows, generator=gen), torch.randn(rows)
    torch.testing.assert_close(kernels.spmm_rows(s["indptr"], s["indices"], values, x, bias), x @ w.t() + bias,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.spmm_rows(s["t_indptr"], s["t_indices"], values[s["t_perm"]], dy), dy @ w,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.sddmm_rows(s["indptr"], s["indices"], dy, x), (dy.t() @ x)[mask],
                               rtol=1e-4, atol=1e-4)


def test_kernels_with_no_nonzeros(backend):
    s = structure_from_linear(torch.zeros(0, dtype=torch.long), 4, 3)
    y = kernels.spmm(s["indptr"], s["indices"], torch.zeros(0), torch.randn(1, 3, 5), torch.ones(4))
    assert torch.equal(y, torch.ones(1, 4, 5))
    assert kernels.sddmm(s["indptr"], s["indices"], torch.randn(1, 4, 5), torch.randn(1, 3, 5)).numel() == 0


def test_missing_compiler_falls_back_to_torch_with_one_line(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    monkeypatch.delenv("SPARSE_BENCH_KERNELS", raising=False)
    with caplog.at_level(logging.WARNING, logger="sparse_bench"):
        assert kernels.backend() == "torch"
        assert kernels.backend() == "torch"
    lines = [r.message for r in caplog.records if "sparse kernels" in r.message]
    assert len(lines) == 1 and "no C compiler" in lines[0]
    monkeypatch.setattr(kernels, "_tried", False)  # let later tests load the real kernels again


def test_compiled_kernels_are_cached_by_source_hash(monkeypatch, tmp_path):
    if kernels._compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("SPARSE_BENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    assert kernels._load() is not None
    built = list(tmp_path.glob("spkernels-*.so"))
    assert len(built) == 1
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    mtime = built[0].stat().st_mtime_ns
    assert kernels._load() is not None and built[0].stat().st_mtime_ns == mtime  # not rebuilt


def _layer_pair(kind, gen):
    torch.manual_seed(0)
    if kind == "linear":
        dense = nn.Linear(40, 24)
        x = torch.randn(3, 5, 40, generator=gen)  # (batch, tokens, features): the row-major kernels
    elif kind == "linear_2d":  # (batch, features): the Linear kernels (CSR rows), the output a transposed view
        dense = nn.Linear(40, 24)
        x = torch.randn(7, 40, generator=gen)
    elif kind == "conv1x1":  # a matmul on the input as it is, no unfold
        dense = nn.Conv2d(12, 8, 1)
        x = torch.randn(4, 12, 5, 6, generator=gen)
    elif kind == "conv1x1_channel_major":  # the layout a sparse 3x3 conv returns: one feature-major matmul
        dense = nn.Conv2d(12, 8, 1)
        x = torch.randn(12, 5, 6, 4, generator=gen).permute(3, 0, 1, 2)
    elif kind == "conv_direct":  # stride 1: the direct kernels (C), or unfold (torch backend)
        dense = nn.Conv2d(5, 7, (3, 5), padding=(1, 2))
        x = torch.randn(6, 5, 7, 9, generator=gen)
    elif kind == "conv_direct_nopad":
        dense = nn.Conv2d(3, 4, 5)
        x = torch.randn(3, 3, 12, 11, generator=gen)
    elif kind == "conv_direct_batch16":  # vector tiles inside one column, partly inside the padding, or not
        dense = nn.Conv2d(4, 6, 3, padding=1)
        x = torch.randn(16, 4, 6, 9, generator=gen)
    elif kind == "conv_direct_widepad":  # more padding than the kernel reaches: outputs larger than inputs
        dense = nn.Conv2d(4, 6, 3, padding=2)
        x = torch.randn(16, 4, 5, 7, generator=gen)
    elif kind == "conv_strided_batch16":  # stride 2: the direct strided kernels (C), tiles of one position
        dense = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        x = torch.randn(16, 4, 8, 9, generator=gen).permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    elif kind == "conv1x1_strided":  # a ResNet downsampling shortcut
        dense = nn.Conv2d(6, 5, 1, stride=2)
        x = torch.randn(9, 6, 7, 8, generator=gen)
    elif kind == "conv_batch1_strided_nopad":  # one sample (scalar tiles), stride 2 without padding
        dense = nn.Conv2d(3, 5, (3, 2), stride=(2, 3))
        x = torch.randn(1, 3, 9, 10, generator=gen)
    elif kind == "conv_dilated":  # dilation: unfolded patches on either backend
        dense = nn.Conv2d(3, 4, 3, padding=2, dilation=2)
        x = torch.randn(2, 3, 7, 6, generator=gen)
    else:  # stride 2, padding 1, odd sizes
        dense = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        x = torch.randn(4, 3, 9, 11, generator=gen)
    mask = torch.rand(dense.weight.shape, generator=gen) < 0.3
    with torch.no_grad():
        dense.weight.mul_(mask)
    cls = SparseLinear if kind.startswith("linear") else SparseConv2d
    sparse = cls.from_dense(dense, mask)
    sparse.bias = nn.Parameter(dense.bias.detach().clone())
    return dense, sparse, mask, x


@pytest.mark.parametrize("kind", ["linear", "linear_2d", "conv", "conv1x1", "conv1x1_channel_major", "conv_direct",
                                  "conv_direct_nopad", "conv_direct_batch16", "conv_direct_widepad",
                                  "conv_strided_batch16", "conv1x1_strided", "conv_batch1_strided_nopad",
                                  "conv_dilated"])
def test_sparse_layer_matches_masked_dense_layer(backend, kind):
    gen = torch.Generator().manual_seed(1)
    dense, sparse, mask, x = _layer_pair(kind, gen)
    sparse.want_dense_grad = True
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = dense(x1), sparse(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    g = torch.randn(y1.shape, generator=gen)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.values.grad, dense.weight.grad[mask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.dense_grad.view_as(dense.weight), dense.weight.grad, rtol=1e-4, atol=1e-5)
    # nothing the layer holds has the weight's dense size
    held = [t.numel() for t in [*sparse.parameters(), *sparse.buffers()] if t is not sparse.bias]
    assert max(held) < dense.weight.numel()
    torch.testing.assert_close(sparse.dense_weight(), dense.weight.detach())


def test_sparse_layer_state_dict_round_trip_with_another_nnz():
    gen = torch.Generator().manual_seed(2)
    dense, sparse, mask, x = _layer_pair("linear", gen)
    other = SparseLinear(40, 24, nn.Parameter(torch.zeros(24)))
    assert other.nnz == 0
    other.load_state_dict(sparse.state_dict())
    assert other.nnz == sparse.nnz
    torch.testing.assert_close(other(x), sparse(x))
    assert set(sparse.state_dict()) == {"values", "bias", "indptr", "indices"}



# --- condensed constant fan-in layers (structure=fan_in) -------------------------------------------
def _fan_in_pair(rows, cols, k, gen, ablated=()):
    """A Linear with k active inputs in every row but the `ablated` ones (none), and its sparse twin."""
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        if i not in ablated:
            mask[i, torch.randperm(cols, generator=gen)[:k]] = True
    torch.manual_seed(0)
    dense = nn.Linear(cols, rows)
    with torch.no_grad():
        dense.weight.mul_(mask)
    sparse = SparseLinear.from_dense(dense, mask)
    sparse.bias = nn.Parameter(dense.bias.detach().clone())
    return dense, sparse, mask


def _check_linear_kernels(batch):
    """linear_forward / linear_backward against dense products: CSR rows of uneven lengths (one
    empty), and a constant fan-in condensed, with and without rows that have none; inputs and
    output gradients in either memory order; each gradient alone too."""
    gen = torch.Generator().manual_seed(batch)
    rows, cols, k = 70, 53, 6
    cases = []
    s, values, w, mask = _random_csr(rows, cols, 0.2, gen)
    cases.append((s["indices"], values, None, s["indptr"], w, mask))
    for ablated in ((), (0, 3, 69)):
        _, sparse, mask = _fan_in_pair(rows, cols, k, gen, ablated)
        kk, live = sparse.condensed()
        assert kk == k and (live is None) == (not ablated)
        cases.append((sparse.indices.view(-1, k), sparse.values.detach().view(-1, k), live, None,
                      sparse.dense_weight(), mask))
    for idx, vals, live, indptr, w, mask in cases:
        bias = torch.randn(rows, generator=gen)
        x, dy = torch.randn(batch, cols, generator=gen), torch.randn(batch, rows, generator=gen)
        for xin, dyin in ((x, dy), (x.t().contiguous().t(), dy.t().contiguous().t())):  # row-, feature-major
            y = kernels.linear_forward(idx, vals, xin, bias, rows, live, indptr)
            torch.testing.assert_close(y, w @ x.t() + bias[:, None], rtol=1e-5, atol=1e-5)
            dv, dxt = kernels.linear_backward(idx, vals, xin, dyin, live, True, True, indptr)
            torch.testing.assert_close(dxt, w.t() @ dy.t(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dv.view(-1), (dy.t() @ x)[mask], rtol=1e-4, atol=1e-4)
            only_v, none = kernels.linear_backward(idx, vals, xin, dyin, live, True, False, indptr)
            assert none is None and torch.equal(only_v, dv)
            none, only_x = kernels.linear_backward(idx, vals, xin, dyin, live, False, True, indptr)
            assert none is None and torch.equal(only_x, dxt)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 7, 64, 100, 130, 300])
def test_linear_kernels_match_dense_products(batch, threads, monkeypatch):
    """A Linear's kernels (CSR rows, condensed fan-in) across tiles (64 or 128 wide) and a short
    last one, on one or two threads (whole tiles each, or rows split within a tile)."""
    if kernels.backend() != "c":
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    _check_linear_kernels(batch)


def test_kernels_built_without_openmp_run_on_one_thread(monkeypatch, tmp_path):
    """A compiler without OpenMP builds the kernels without it (the second try): asked for two
    threads, they run on one and compute the same products."""
    if kernels._compiler() is None:
        pytest.skip("no C compiler on this machine")
    real = subprocess.run

    def no_openmp(args, **kw):
        if "-fopenmp" in args:
            return subprocess.CompletedProcess(args, 1, "", "cc: error: unsupported option '-fopenmp'")
        return real(args, **kw)

    monkeypatch.setattr(subprocess, "run", no_openmp)
    monkeypatch.setenv("SPARSE_BENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("SPARSE_BENCH_KERNELS", "c")
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    assert kernels._load() is not None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for batch in (7, 300):
        _check_linear_kernels(batch)


@pytest.mark.parametrize("ablated", [(), (1, 5)])
def test_fan_in_layers_run_the_condensed_kernels_as_the_masked_layers(backend, ablated, monkeypatch):
    """A chain of two constant fan-in layers (the second reads the first's feature-major output,
    and its input gradient is the first's output gradient) equals the masked chain: outputs, all
    gradients, the dense weight gradient; the Linear kernels read the structure condensed on the
    compiled backend (and only for constant fan-in: an uneven layer by its row pointers), torch's
    CSR ops run on the other."""
    calls = []
    forward = kernels.linear_forward
    monkeypatch.setattr(kernels, "linear_forward", lambda *a: calls.append(a[6] is None) or forward(*a))
    gen = torch.Generator().manual_seed(3)
    d1, s1, m1 = _fan_in_pair(24, 40, 5, gen, ablated)
    d2, s2, m2 = _fan_in_pair(10, 24, 4, gen)
    s1.want_dense_grad = True
    x = torch.randn(100, 40, generator=gen)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = d2(torch.relu(d1(x1))), s2(torch.relu(s1(x2)))
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    assert calls == ([True, True] if backend == "c" else [])  # condensed: no row pointers
    g = torch.randn(y1.shape, generator=gen)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    for dense, sparse, mask in ((d1, s1, m1), (d2, s2, m2)):
        torch.testing.assert_close(sparse.values.grad, dense.weight.grad[mask], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1.dense_grad, d1.weight.grad, rtol=1e-4, atol=1e-5)
    # a new structure with uneven rows: its row pointers from then on
    lin = s1.active_linear()
    s1.set_active(lin[1:], s1.values.detach()[1:])
    assert s1.condensed() is None
    calls.clear()
    s1(x)
    assert calls == ([False] if backend == "c" else [])


# --- whole runs: sparse trains the same model as masked -------------------------------------------
BASE = ["dataset=digits", "model=mlp", "schedule=constant", "schedule.epochs=3", "density=0.2",
        "limit_train_batches=8", "eval.train_samples=100", "logger=none", "progress=false", "device=cpu"]
METHODS = {
    "static": [],
    "set": ["method.update_every=4"],
    "rigl": ["method.update_every=4"],
    "sparse_momentum": ["method.update_every=5"],
    "dsr": ["method.update_every=4"],
    "gse": ["method.update_every=4", "method.sampling=graest", "method.end={unit:fraction,value:1.0}"],
    "snip": [],
}
METRICS = ("train/loss", "train/acc", "val/loss", "test/loss", "train_eval/loss")


def _masks_equal(masked_dir, sparse_dir, near_ties: int = 0, atol: float = 1e-5):
    """The final masks (and active weights, to `atol`) of a masked and a sparse run agree;
    `near_ties` positions may differ in all, where float rounding flips a boundary decision."""
    a = load_checkpoint(masked_dir / "checkpoint.pt")
    b = load_checkpoint(sparse_dir / "checkpoint.pt")
    names = a["method"]["masks"]["names"]
    differ = 0
    for name, m in zip(names, a["method"]["masks"]["masks"]):
        pre = name[: -len("weight")]
        m = m.bool().reshape(m.shape[0], -1)
        ptr = b["model"][pre + "indptr"]
        ind = b["model"][pre + "indices"].long()
        rows = torch.repeat_interleave(torch.arange(m.shape[0]), ptr[1:] - ptr[:-1])
        got = torch.zeros_like(m)
        got[rows, ind] = True
        differ += int((got != m).sum())
        if differ == 0:  # after a flipped position the runs train (slightly) different models
            w = a["model"][name].reshape(m.shape)
            torch.testing.assert_close(b["model"][pre + "values"], w[rows, ind], rtol=1e-4, atol=atol)
    assert differ <= near_ties, f"masks differ in {differ} positions"


def _run(tmp_path, method, execution, extra=()):
    cfg = compose([*BASE, f"method={method}", *METHODS.get(method, []), f"execution={execution}",
                   f"paths.runs={tmp_path / execution}", *extra])
    run(cfg)
    return tmp_path / execution / cfg.run_name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sparse_and_masked_train_the_same_model(method, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_BENCH_KERNELS", "auto")
    a = _run(tmp_path, method, "masked")
    b = _run(tmp_path, method, "sparse")
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        for k in METRICS:
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (k, x.get("epoch"))
        for k in x:
            if k.startswith(("density/", "mask/")):
                assert y[k] == x[k], k
    if method not in ("static", "snip"):
        assert any(r.get("mask/grown", 0) > 0 for r in ra), "the masks must change for this test to mean anything"
        assert any("sparse/rebuild_s" in r for r in rb)
    _masks_equal(a, b)


def test_rigl_growth_from_statistics_batches_is_the_same_sparse_as_masked(tmp_path, monkeypatch):
    """GSE's RigL protocol scores growth by the dense gradient of separate batches: sparse layers
    must form it in their own backward (their dense views are not in the forward pass)."""
    monkeypatch.setenv("SPARSE_BENCH_KERNELS", "auto")
    a = _run(tmp_path, "rigl", "masked", ["method.stat_batches=2"])
    b = _run(tmp_path, "rigl", "sparse", ["method.stat_batches=2"])
    grown = [[r["mask/grown"] for r in read_jsonl(d / "metrics.jsonl") if r.get("update")] for d in (a, b)]
    assert grown[0] == grown[1] and sum(grown[0]) > 0
    _masks_equal(a, b)



def test_srigl_trains_the_same_on_condensed_fan_in_layers_as_masked(tmp_path, monkeypatch, caplog):
    """SRigL (structure=fan_in, units ablated and restored) on sparse layers, which run the
    condensed kernels between its updates (and the log says so), trains the same model as on
    masked layers."""
    monkeypatch.setenv("SPARSE_BENCH_KERNELS", "auto")
    if kernels.backend() != "c":
        pytest.skip("no C compiler on this machine")
    calls = []
    forward = kernels.linear_forward
    # (ablated units, condensed) of every call
    monkeypatch.setattr(kernels, "linear_forward", lambda *a: calls.append((a[5] is not None, a[6] is None))
                        or forward(*a))
    extra = ["structure=fan_in", "method.update_every=4", "method.min_salient_weights_per_neuron=0.9"]
    a = _run(tmp_path, "srigl", "masked", extra)
    with caplog.at_level(logging.INFO, logger="sparse_bench"):
        b = _run(tmp_path, "srigl", "sparse", extra)
    assert "3 of 3 prunable layers sparse (kernels: c); 3 Linear on the condensed fan-in kernels" in caplog.text
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert any(r.get("srigl/ablated", 0) > 0 for r in ra), "units must be ablated for this test to mean anything"
    # all condensed, with ablated units and without
    assert all(c for _, c in calls) and {a for a, _ in calls} == {True, False}
    for x, y in zip(ra, rb, strict=True):
        for k in METRICS:
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (k, x.get("epoch"))
    _masks_equal(a, b)

@pytest.mark.parametrize("method", ["set", "sparse_momentum"])
def test_torch_csr_backend_trains_the_same_model(method, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_BENCH_KERNELS", "torch")
    a = _run(tmp_path, method, "masked")
    b = _run(tmp_path, method, "sparse")
    for x, y in zip(read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")):
        if x.get("update"):
            continue  # a mask update's record: its counts are compared by _masks_equal
        assert y["test/loss" if "test/loss" in x else "train/loss"] == pytest.approx(
            x["test/loss" if "test/loss" in x else "train/loss"], rel=1e-4)
    _masks_equal(a, b)


@pytest.mark.parametrize("method", ["rigl", "gse"])
def test_conv_model_runs_sparse_like_masked(method, tmp_path):
    # lr 0.01: at 0.1 GSE's fan-in re-initialised LeNet-5 (biases drawn from the sparse fan-in's bound, as
    # the reference draws them) diverges in its first steps, where rounding differences grow without bound
    extra = ["dataset=synthetic", "model=lenet5_caffe", "dataset.n_train=300", "dataset.n_test=100",
             "limit_train_batches=3", "schedule.epochs=2", "method.update_every=2",
             "method.end={unit:fraction,value:1.0}",
             "optimizer.lr=0.01"]
    a = _run(tmp_path, method, "masked", extra)
    b = _run(tmp_path, method, "sparse", extra)
    for x, y in zip(read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")):
        if "train/loss" in x:
            assert y["train/loss"] == pytest.approx(x["train/loss"], rel=1e-4)
    # dense convolutions (mkldnn) and unfolded sparse ones round differently; GSE ranks |w| over
    # all layers at once, where a rounding-level near tie can move one position between layers
    _masks_equal(a, b, near_ties=4 if method == "gse" else 0)


def test_unsupported_method_says_so_and_runs_masked(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sparse_bench"):
        d = _run(tmp_path, "deepr", "sparse", ["schedule.epochs=1"])
    lines = [r.message for r in caplog.records if "runs masked" in r.message]
    assert len(lines) == 1 and "method=deepr" in lines[0]
    assert not (d / "execution.json").exists() or "sparse" not in (d / "execution.json").read_text().split('"plan"')[1]


def test_auto_picks_per_layer_and_logs_the_choice(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sparse_bench"):
        d = _run(tmp_path, "static", "auto", ["schedule.epochs=1"])
    import json

    plan = json.loads((d / "execution.json").read_text())
    assert set(plan["plan"]) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    assert set(plan["timings_ms"]) == set(plan["plan"])
    for name, choice in plan["plan"].items():
        t = plan["timings_ms"][name]
        assert (choice == "sparse") == (t["sparse"] < t["masked"])
    assert sum("execution=auto:" in r.message for r in caplog.records) >= 3


def test_auto_measures_once_per_configuration_and_repeats_take_that_plan(tmp_path, monkeypatch, caplog):
    import json

    from sparse_bench.sparsity.execution import engine

    calls = []

    def timing(mod, cls, mask, shape, input_grad=True, repeats=5):  # a machine whose load changes every call
        calls.append(mod)
        return (1.0, 0.5) if len(calls) % 2 else (0.5, 1.0)

    monkeypatch.setattr(engine, "time_layer", timing)
    monkeypatch.setattr(engine.Execution, "_whole_model", lambda self, cands, decisions: decisions)  # layers alone
    first = _run(tmp_path, "static", "auto", ["schedule.epochs=1", "seed=0"])
    assert len(calls) == 3
    plan = json.loads((first / "execution.json").read_text())["plan"]
    assert plan == {"net.0.weight": "sparse", "net.2.weight": "masked: slower sparse at this density (measured)",
                    "net.4.weight": "sparse"}
    with caplog.at_level(logging.INFO, logger="sparse_bench"):
        again = _run(tmp_path, "static", "auto", ["schedule.epochs=1", "seed=1"])  # another seed, same configuration
    assert len(calls) == 3, "the plan measured first is taken, not measured again"
    assert json.loads((again / "execution.json").read_text())["plan"] == plan
    assert any("the plan measured first for this configuration" in r.message for r in caplog.records)
    _run(tmp_path, "static", "auto", ["schedule.epochs=1", "density=0.3"])  # another configuration: measured
    assert len(calls) == 6
    shared = sorted((tmp_path / "auto" / ".execution-plans").glob("*.json"))
    assert len(shared) == 2


@pytest.mark.parametrize("fastest", ["masked", "all sparse", "per layer"])
def test_auto_takes_the_fastest_whole_model_plan(fastest, tmp_path, monkeypatch):
    """execution=auto times whole training steps of the per-layer plan, all sparse and all masked
    (layers timed alone miss the cost of layout switches between neighbours) and takes the fastest."""
    import json

    from sparse_bench.sparsity.execution import engine
    from sparse_bench.sparsity.execution.layers import SparseLayer

    monkeypatch.setattr(engine, "time_layer", lambda mod, *a, **k: (1.0, 0.5) if mod.in_features == 64 else (0.5, 1.0))
    # per layer: the two layers with 64 inputs (digits 8x8 -> 128, and 64 -> 10) sparse
    cost = {"masked": lambda n: n, "all sparse": lambda n: -n, "per layer": lambda n: abs(n - 2)}[fastest]
    monkeypatch.setattr(engine, "_time_step", lambda model, batch: 1.0 + cost(
        sum(isinstance(m, SparseLayer) for m in model.modules())))
    out = _run(tmp_path, "static", "auto", ["schedule.epochs=1"])
    rec = json.loads((out / "execution.json").read_text())
    sparse = sorted(n for n, v in rec["plan"].items() if v == "sparse")
    assert len(sparse) == {"masked": 0, "all sparse": 3, "per layer": 2}[fastest], rec
    assert min(rec["whole_model_ms"], key=rec["whole_model_ms"].get) == fastest


def test_bad_execution_is_one_config_error():
    with pytest.raises(ConfigError, match="execution=fast is not one of: masked, sparse, auto"):
        run(compose([*BASE, "execution=fast"]))


# --- resume and DDP ----------------------------------------------------------------------------

def _strip(recs):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/", "sparse/rebuild_s"))}
            for r in recs]


@pytest.mark.parametrize("method,execution", [("set", "sparse"), ("rigl", "sparse"), ("sparse_momentum", "sparse"),
                                              ("gse", "sparse"), ("set", "auto")])
def test_sparse_resume_is_bit_identical(method, execution, tmp_path, monkeypatch):
    from sparse_bench.sparsity.execution import engine

    calls = []

    def fake_timing(mod, cls, mask, shape, input_grad=True, repeats=5):  # auto: first layer sparse, the rest masked
        calls.append(shape)
        return (1.0, 0.5) if mod.in_features == 64 and mod.out_features == 128 else (0.5, 1.0)

    monkeypatch.setattr(engine, "time_layer", fake_timing)
    monkeypatch.setattr(engine.Execution, "_whole_model", lambda self, cands, decisions: decisions)  # layers alone
    over = [*BASE, "schedule.epochs=4", f"method={method}", *METHODS[method], f"execution={execution}"]
    a = compose([*over, f"paths.runs={tmp_path / 'a'}"])
    run(a)
    b = compose([*over, f"paths.runs={tmp_path / 'b'}"])
    with killed_after(monkeypatch, 2), pytest.raises(Crash):
        run(b)
    n_timed = len(calls)
    run(b)
    assert len(calls) == n_timed, "a resumed run rebuilds the layers its plan file names, without timing"
    fa, fb = tmp_path / "a" / a.run_name, tmp_path / "b" / b.run_name
    ra, rb = read_jsonl(fa / "metrics.jsonl"), read_jsonl(fb / "metrics.jsonl")
    assert _strip(ra) == _strip(rb)
    assert any(r.get("mask/grown", 0) > 0 for r in ra[2:])
    ca = load_checkpoint(fa / "checkpoint.pt")
    cb = load_checkpoint(fb / "checkpoint.pt")
    assert set(ca["model"]) == set(cb["model"])
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    if execution == "auto":
        assert "net.0.values" in cb["model"] and "net.2.weight" in cb["model"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["set", "sparse_momentum"])
def test_sparse_two_processes_match_one(method, tmp_path):
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    if shutil.which(str(torchrun)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    args = ["dataset=digits", "model=mlp", "schedule=constant", "schedule.epochs=2", "density=0.3",
            "logger=none", "progress=false", "device=cpu", f"method={method}", "method.update_every=5",
            "execution=sparse"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    port = "29571" if method == "set" else "29572"
    ddp = subprocess.Popen([str(torchrun), "--nproc_per_node=2", f"--master_port={port}", "-m", "sparse_bench", *args,
                            f"paths.runs={tmp_path / 'ddp'}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    run_in_process([*args, f"paths.runs={tmp_path / 'one'}"])  # the reference, while torchrun runs
    out, _ = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, out[-3000:]
    name = f"digits-mlp-{method}-d0.3-s0"
    a = json.loads((tmp_path / "ddp" / name / "results.json").read_text())
    b = json.loads((tmp_path / "one" / name / "results.json").read_text())
    assert a["density"]["achieved"] == b["density"]["achieved"]
    assert a["final"]["train/loss"] == pytest.approx(b["final"]["train/loss"], rel=1e-3)
    assert a["final"]["test/acc"] == pytest.approx(b["final"]["test/acc"], abs=0.02)
    assert any(r.get("mask/grown", 0) > 0 for r in read_jsonl(tmp_path / "ddp" / name / "metrics.jsonl"))


def test_a_layer_too_big_to_hold_densely_is_built_and_trained_sparse(tmp_path, monkeypatch, caplog):
    """With the limit lowered, the 128x64 layer of the digits MLP stands in for a 65,536^2 one:
    it never gets a dense weight, mask, gradient or momentum, and GSE trains it."""
    from sparse_bench.sparsity.execution import engine
    from sparse_bench.sparsity.masks import MaskSet

    monkeypatch.setattr(engine, "DENSE_BUILD_LIMIT", 8000)
    numel = 128 * 64
    real_open = MaskSet._open_view
    monkeypatch.setattr(MaskSet, "_open_view", lambda self: pytest.fail("a dense view was opened"))
    with caplog.at_level(logging.INFO, logger="sparse_bench"):
        d = _run(tmp_path, "gse", "sparse", ["schedule.epochs=2"])
    assert any("too big to hold densely" in r.message and "net.0.weight" in r.message for r in caplog.records)
    recs = read_jsonl(d / "metrics.jsonl")
    assert any(r.get("mask/grown", 0) > 0 for r in recs)
    assert recs[-1]["density/achieved"] == pytest.approx(0.2, abs=1e-4)
    ck = load_checkpoint(d / "checkpoint.pt")
    assert "net.0.values" in ck["model"] and "net.0.weight" not in ck["model"]
    sizes = [t.numel() for t in ck["model"].values()]
    sizes += [v.numel() for st in ck["optimizer"]["state"].values() for v in st.values() if torch.is_tensor(v)]
    assert numel not in sizes
    monkeypatch.setattr(MaskSet, "_open_view", real_open)
    # a method that runs masked, or whose updates read dense views, cannot train it: one clear line
    for other in ("deepr", "set"):
        with pytest.raises(ConfigError, match="too big to hold densely"):
            _run(tmp_path / other, other, "sparse")


@pytest.mark.parametrize("method", ["sparse_momentum", "rigl"])
def test_sparse_matches_masked_under_adam(method, tmp_path):
    """Adam's moments live on the values; sparse momentum's inactive moments follow Adam's rule."""
    a = _run(tmp_path, method, "masked", ["optimizer=adam", "optimizer.lr=0.001"])
    b = _run(tmp_path, method, "sparse", ["optimizer=adam", "optimizer.lr=0.001"])
    for x, y in zip(read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")):
        for k in METRICS:
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), k
    _masks_equal(a, b)


@pytest.mark.parametrize("method,every,expect", [("set", 4, "never"), ("rigl", 4, "before_updates"),
                                                 ("sparse_momentum", 4, "always"), ("gse", 4, "never")])
def test_dense_gradients_only_where_the_method_defines_them(method, every, expect):
    """RigL forms the dense weight gradient on the step before each update only, sparse momentum
    on every step (its growth signal), SET and GSE never."""
    from omegaconf import OmegaConf

    from sparse_bench.confdir import conf_dir
    from sparse_bench.models import build_model
    from sparse_bench.sparsity.execution import Execution
    from sparse_bench.sparsity.methods import MethodContext, build_method, call_hook

    torch.manual_seed(0)
    model = build_model(OmegaConf.create({"name": "mlp", "hidden": [32, 16]}), (1, 8, 8), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,))
    cfg = OmegaConf.load(conf_dir() / "method" / f"{method}.yaml")
    cfg.update_every = every
    cfg.end = {"unit": "fraction", "value": 1.0}
    ctx = MethodContext(model=model, optimizer=opt, density=0.3, epochs=1, steps_per_epoch=12,
                        device=torch.device("cpu"), generator=torch.Generator().manual_seed(1),
                        loss_fn=nn.CrossEntropyLoss(), batches=lambda n, key=0: [(x, y)])
    method = build_method(cfg, ctx)
    m = Execution(method, "sparse", opt, model, batches=lambda n, key=0: [(x, y)])
    call_hook(method, [m], "setup")
    dense_steps, updates = [], []
    for step in range(12):
        call_hook(method, [m], "before_forward", step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if m.control.grads:
            dense_steps.append(step)
            assert all(g.shape == (layer.rows, layer.cols) for layer, g in m.control.grads.items())
        call_hook(method, [m], "before_optimizer_step", step)
        opt.step()
        call_hook(method, [m], "after_optimizer_step", step)
        if call_hook(method, [m], "on_step_end", step + 1):
            updates.append(step + 1)
        assert not method.masks.view_open
    if expect == "never":
        assert dense_steps == []
    elif expect == "always":
        assert dense_steps == list(range(12))
    else:
        assert updates and dense_steps == [u - 1 for u in updates]


def test_dense_views_of_sparse_layers_are_opened_explicitly():
    """With sparse layers, `masks.params` / `masks.masks` never open a view behind the caller's
    back: outside `with masks.dense_view():` they are refused in one line; inside, they are the
    layers as dense tensors, and the block's end rebuilds the layers from them."""
    from omegaconf import OmegaConf

    from sparse_bench.confdir import conf_dir
    from sparse_bench.models import build_model
    from sparse_bench.sparsity.execution import Execution
    from sparse_bench.sparsity.methods import MethodContext, build_method, call_hook

    torch.manual_seed(0)
    model = build_model(OmegaConf.create({"name": "mlp", "hidden": [16]}), (1, 4, 4), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctx = MethodContext(model=model, optimizer=opt, density=0.3, epochs=1, steps_per_epoch=4,
                        device=torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    method = build_method(OmegaConf.load(conf_dir() / "method" / "static.yaml"), ctx)
    engine = Execution(method, "sparse", opt, model)
    call_hook(method, [engine], "setup")
    masks = method.masks
    assert all(masks.is_sparse(i) for i in range(len(masks)))
    with pytest.raises(RuntimeError, match="dense_view"):
        _ = masks.params
    nnz = masks.nnz()
    with masks.dense_view():
        assert masks.view_open
        w, m = masks.params[0], masks.masks[0]
        assert w.shape == (16, 16) and int(m.sum()) == nnz[0]
        assert torch.equal(w[~m], torch.zeros_like(w[~m]))  # inactive weights are zero in the view
        with torch.no_grad():
            w[m] = 2.0  # a change made through the view...
    assert not masks.view_open
    assert torch.equal(masks.active_values(0), torch.full((nnz[0],), 2.0))  # ...is in the sparse layer


# --- the papers' models: sparse convolutions keep their layout across batch norm, ReLU, pooling and
# residual additions (ChannelMajor* modules), and still train the model masked execution trains
PAPER_MODELS = {
    "resnet": ["model=resnet_cifar", "model.depth=8", "model.width=0.5"],
    "vgg": ["model=vgg16_small", "model.width=0.25", "model.dropout=0.0"],
    "vit": ["model=vit_cifar", "model.dim=32", "model.depth=1", "model.heads=2", "model.dim_head=8",
            "model.mlp_dim=32"],
}


@pytest.mark.parametrize("model", sorted(PAPER_MODELS))
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_paper_models_run_sparse_like_masked(model, method, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_BENCH_KERNELS", "auto")
    extra = ["dataset=synthetic", "dataset.input_shape=[3,32,32]", "dataset.n_train=64", "dataset.n_test=32",
             "dataset.batch_size=16", "dataset.test_batch_size=16", "limit_train_batches=3", "schedule.epochs=2",
             "method.update_every=2", "optimizer.lr=0.01", "eval.train_samples=0", *PAPER_MODELS[model]]
    a = _run(tmp_path, method, "masked", extra)
    b = _run(tmp_path, method, "sparse", extra)
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert len(ra) == len(rb) and any(r.get("mask/grown", 0) > 0 for r in ra)
    for x, y in zip(ra, rb):
        for k in ("train/loss", "val/loss", "test/loss"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (k, x.get("epoch"))
    # batch-normalised deep models carry the two executions' rounding differences into the weights
    # (1e-4 here, with losses equal to 1e-4 and the same masks)
    _masks_equal(a, b, atol=1e-3)


def test_channel_major_modules_compute_what_torch_modules_do():
    """Batch norm, pooling and ReLU on a channel-major input (memory (C, H, W, N), what sparse
    convolutions return) give torch's results, gradients and running statistics, and keep the layout."""
    from sparse_bench.sparsity.execution.layers import channel_major, keep_channel_major

    torch.manual_seed(0)
    mods = [nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1)]
    for mod in mods:
        ref, ours = mod, copy.deepcopy(mod)
        assert keep_channel_major(ours) == 1 and type(ours) is not type(ref)
        base = torch.randn(6, 8, 8, 5)
        x_ref = base.permute(3, 0, 1, 2).contiguous().requires_grad_(True)
        x_cm = base.clone().requires_grad_(True)
        y_ref = ref(x_ref * 1.0)
        y_cm = ours(x_cm.permute(3, 0, 1, 2) * 1.0)
        assert channel_major(y_cm) or y_cm.shape[-1] == 1
        torch.testing.assert_close(y_cm, y_ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(y_ref)
        y_ref.backward(g)
        y_cm.backward(g)
        torch.testing.assert_close(x_cm.grad.permute(3, 0, 1, 2), x_ref.grad, rtol=1e-5, atol=1e-6)
        if isinstance(ref, nn.BatchNorm2d):
            torch.testing.assert_close(ours.running_var, ref.running_var)
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
            assert ours.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("options", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}])
def test_channel_major_batch_norm_trains_as_torch_batch_norm(backend, options):
    """The channel-major batch norm (statistics by the compiled kernels where they run) gives
    torch's outputs, input and parameter gradients and running statistics over three training
    steps, then the same evaluation-mode output."""
    from sparse_bench.sparsity.execution.layers import keep_channel_major

    torch.manual_seed(0)
    ref = nn.BatchNorm2d(6, **options)
    ours = copy.deepcopy(ref)
    keep_channel_major(ours)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
        ours.load_state_dict(ref.state_dict())
    for step in range(3):
        base = torch.randn(6, 8, 8, 5) * (step + 1) + 3.0  # (C, H, W, N) memory, a mean far from 0
        x_ref = base.permute(3, 0, 1, 2).contiguous().requires_grad_(True)
        x_cm = base.clone().requires_grad_(True)
        y_ref, y_cm = ref(x_ref), ours(x_cm.permute(3, 0, 1, 2))
        torch.testing.assert_close(y_cm, y_ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y_ref)
        y_ref.backward(g)
        y_cm.backward(g)
        torch.testing.assert_close(x_cm.grad.permute(3, 0, 1, 2), x_ref.grad, rtol=1e-4, atol=1e-5)
        if ref.affine:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
    for a, b in zip(ours.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b)
    ours.eval(), ref.eval()
    base = torch.randn(6, 8, 8, 5)
    torch.testing.assert_close(ours(base.permute(3, 0, 1, 2)), ref(base.permute(3, 0, 1, 2).contiguous()),
                               rtol=1e-5, atol=1e-5)
