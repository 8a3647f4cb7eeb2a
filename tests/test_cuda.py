"""The CUDA branches of the code, run where a GPU is (skipped without one; scripts/device_check.sh
runs them): sync-free top-k, DeepR's sort draw, torch's CSR kernels for sparse layers, a few
training steps of each method with no host sync outside the mask updates, mixed precision and
compile on the GPU, DDP over NCCL where two GPUs exist."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sparse_bench.confdir import conf_dir
from sparse_bench.sparsity.methods import MethodContext, build_method
from sparse_bench.sparsity.ops import largest_inactive, smallest_active
from sparse_bench.sparsity.structure import Structure
from sparse_bench.train.precision import Amp
from sparse_bench.train.trainer import hooked_step

from conftest import compose, read_jsonl

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
CUDA = torch.device("cuda")


def _method(name: str, model: nn.Module, opt, **over):
    cfg = OmegaConf.load(conf_dir() / "method" / f"{name}.yaml")
    for k, v in over.items():
        if k in cfg:
            cfg[k] = v
    x = torch.randn(32, 64, device=CUDA)
    y = torch.randint(0, 10, (32,), device=CUDA)
    ctx = MethodContext(model=model, optimizer=opt, density=0.2, epochs=1, steps_per_epoch=40, device=CUDA,
                        generator=torch.Generator().manual_seed(1), loss_fn=nn.CrossEntropyLoss(),
                        batches=lambda n, key=0: [(x, y)] * n)
    return build_method(cfg, ctx), x, y


def test_topk_selections_do_not_sync():
    scores = torch.rand(1 << 20, device=CUDA)
    mask = torch.rand(1 << 20, device=CUDA) < 0.1
    torch.cuda.set_sync_debug_mode("error")
    try:
        drop = smallest_active(scores, mask, 1000)
        grow = largest_inactive(scores, mask, 1000)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(drop.sum()) == 1000 and int(grow.sum()) == 1000
    assert not bool((drop & ~mask).any()) and not bool((grow & mask).any())
    assert scores[drop].max() <= scores[mask & ~drop].min()


@pytest.mark.parametrize("name", ["dense", "static", "set", "rigl", "sparse_momentum", "dsr", "gse", "gmp", "acdc",
                                  "snip", "deepr", "topkast"])
def test_training_steps_do_not_sync_outside_mask_updates(name):
    """A host sync added to the per-step path (the hooks, the masked apply, the optimizer step)
    fails here; the mask updates themselves (on_step_end) may read counts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(CUDA)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    method, x, y = _method(name, model, opt, update_every=3, end={"unit": "fraction", "value": 1.0})
    method.setup()
    for step in range(8):
        torch.cuda.set_sync_debug_mode("error")
        try:
            hooked_step(method, opt, step, lambda: nn.functional.cross_entropy(model(x), y))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        method.on_step_end(step + 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_deepr_draws_by_sort_on_cuda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(CUDA)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    method, x, y = _method("deepr", model, opt)
    assert method.sort_draw
    method.setup()
    before = method.masks.nnz()
    for step in range(5):
        hooked_step(method, opt, step, lambda: nn.functional.cross_entropy(model(x), y))
        method.on_step_end(step + 1)
    assert method.masks.nnz() == before  # the count per layer is kept exactly


def test_sparse_layers_run_torch_csr_on_cuda_like_masked():
    from sparse_bench.sparsity.execution.layers import SparseLinear

    torch.manual_seed(0)
    lin = nn.Linear(256, 128).to(CUDA)
    mask = torch.rand(128, 256, device=CUDA) < 0.05
    with torch.no_grad():
        lin.weight.mul_(mask)
    sparse = SparseLinear.from_dense(lin, mask)
    x = torch.randn(64, 256, device=CUDA, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ref, out = lin(x), sparse(x2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    ref.square().sum().backward()
    out.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-4)
    lin_idx = mask.reshape(-1).nonzero().squeeze(1)
    torch.testing.assert_close(sparse.values.grad, lin.weight.grad.reshape(-1)[lin_idx], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_two_four_linear_matches_the_masked_product(dtype):
    from sparse_bench.sparsity.execution import semistructured

    if not semistructured.available(CUDA):
        pytest.skip("no semi-structured sparse support on this GPU")
    torch.manual_seed(0)
    two_four = Structure("nm", 2, 4)
    mask = two_four.random_masks([(256, 512)], [0], torch.Generator().manual_seed(0))[0].to(CUDA)
    assert two_four.violations(mask) == 0 and semistructured.fits(mask.shape, dtype)
    w = (torch.randn(256, 512, device=CUDA) * mask).requires_grad_(True)
    b = torch.randn(256, device=CUDA, requires_grad=True)
    x = torch.randn(4, 32, 512, device=CUDA, dtype=dtype, requires_grad=True)
    w2, b2 = w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    out = semistructured.two_four_linear(x, w, mask.float(), b)
    ref = nn.functional.linear(x2, (w2 * mask).to(dtype), b2.to(dtype))
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x2.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad, w2.grad, rtol=2e-2, atol=5e-2)
    assert not bool(w.grad[~mask].any())  # inactive weights get no gradient
    torch.testing.assert_close(b.grad, b2.grad, rtol=2e-2, atol=5e-2)



def test_two_four_layers_train_under_execution_sparse(tmp_path):
    """execution=sparse under structure=nm (2:4) in bf16: the Linear layers the 2:4 tensors take
    run masked with the semi-structured forward product (plan entry "2:4") and the model trains."""
    from sparse_bench.run import run
    from sparse_bench.sparsity.execution import engine, semistructured

    if not semistructured.available(CUDA):
        pytest.skip("no semi-structured sparse support on this GPU")
    cfg = compose(["dataset=digits", "model=mlp", "model.hidden=[128]", "schedule=constant", "schedule.epochs=2",
                   "method=rigl", "method.update_every=4", "structure=nm", "density=0.5", "precision=bf16",
                   "execution=sparse", "device=cuda", "logger=none", "progress=false", f"paths.runs={tmp_path}"])
    run(cfg)
    plan = json.loads((tmp_path / cfg.run_name / "execution.json").read_text())["plan"]
    assert plan["net.0.weight"] == engine.TWO_FOUR
    records = [r for r in read_jsonl(tmp_path / cfg.run_name / "metrics.jsonl") if "train/loss" in r]
    assert records[-1]["train/loss"] < records[0]["train/loss"]

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_compile_on_cuda(precision):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 10))
    model = model.to(CUDA).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    cfg = OmegaConf.load(conf_dir() / "method" / "rigl.yaml")
    cfg.update_every, cfg.end = 2, {"unit": "fraction", "value": 1.0}
    ctx = MethodContext(model=model, optimizer=opt, density=0.2, epochs=1, steps_per_epoch=10, device=CUDA,
                        generator=torch.Generator().manual_seed(1))
    method = build_method(cfg, ctx)
    method.setup()
    compiled = torch.compile(model)
    amp = Amp(precision, CUDA)
    x = torch.randn(8, 3, 16, 16, device=CUDA).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), device=CUDA)
    for step in range(6):
        hooked_step(method, opt, step, lambda: nn.functional.cross_entropy(compiled(x), y), amp=amp)
        method.on_step_end(step + 1)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert method.last_update


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ddp_over_nccl_matches_one_process(tmp_path):
    import subprocess
    import sys

    args = ["dataset=synthetic", "dataset.input_shape=[1,8,8]", "model=mlp", "method=rigl", "method.update_every=2",
            "schedule=constant", "schedule.epochs=1", "limit_train_batches=4", "density=0.3", "logger=none",
            "progress=false", "device=cuda", f"paths.runs={tmp_path}"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "sparse_bench",
                           *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(tmp_path.glob("*/results.json"))
