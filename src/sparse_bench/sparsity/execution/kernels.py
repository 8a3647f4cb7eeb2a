"""The sparse x dense kernels behind sparse layers: a small C file or torch's CSR ops.

``spkernels.c`` (beside this file) holds two kernels on feature-major activations (see its
header): ``spmm`` (forward pass, and the input gradient on the transposed structure) and
``sddmm`` (the gradient of the active weights only), for convolutions' patches; their row-major
variants, for (batch, tokens, features) inputs; a Linear's kernels on 2-d inputs
(``linear_forward`` / ``linear_backward``: W's CSR rows, or a constant fan-in condensed into
(rows, k) column ids and values; the input in either memory order, both gradients in one pass);
direct convolutions; and the channel-major batch norm's statistics. On first use it is compiled with the
system's C compiler (``$CC``, else ``gcc``, else ``cc``; ``-O3 -march=native``, OpenMP when the
compiler has it) into a per-user cache (``$SPARSE_BENCH_CACHE`` or ``~/.cache/sparse_bench``),
keyed by a hash of the source, the flags, the compiler and the CPU, and loaded with ctypes: about a
second once, nothing at install time, no torch build machinery. The key is built into the library
(``sb_key()``) and checked on loading: a foreign, stale or broken file under the cache's name is
rebuilt, and if that fails the torch path runs, with one line saying why.

Without a compiler, on CUDA tensors, for dtypes other than float32, or with
``SPARSE_BENCH_KERNELS=torch``, the same operations run on torch's CSR ops
(``torch.sparse.mm`` and ``torch.sparse.sampled_addmm``); the first fallback for a missing
compiler is logged in one line.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

log = logging.getLogger("sparse_bench")

SOURCE = Path(__file__).with_name("spkernels.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
         "-fno-signed-zeros", "-shared", "-fPIC"]
BACKENDS = ("auto", "c", "torch")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_reason = ""


def cache_dir() -> Path:
    root = os.environ.get("SPARSE_BENCH_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "sparse_bench"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags (so a cache shared by
    machines with different CPUs never loads a binary built for another)."""
    info = platform.machine() + platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                info += line
            if line.strip() == "":
                break
    except OSError:
        pass
    return info


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compile(cc: str, out: Path, key: str) -> None:
    """Compile SOURCE into `out` (with OpenMP if the compiler takes -fopenmp), atomically, with
    `key` built in (``sb_key()``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    last = None
    for extra in (["-fopenmp"], []):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *FLAGS, *extra, f'-DSB_KEY="{key}"', "-o", tmp, str(SOURCE)],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp, out)
                return
            last = proc.stderr.strip().splitlines()[-1:] or ["failed"]
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{cc} could not compile {SOURCE.name}: {last[0]}")


def _keyed(path: Path, key: str) -> ctypes.CDLL | None:
    """The library at `path` if it is the build keyed `key` (its ``sb_key()``), else None. It is
    opened through a private copy (the dynamic loader knows a library by its name, so a file rebuilt
    under the same name would otherwise come back as the one this process opened first)."""
    fd, tmp = tempfile.mkstemp(prefix="sparse_bench-", suffix=".so")
    os.close(fd)
    try:
        shutil.copyfile(path, tmp)
        lib = ctypes.CDLL(tmp)
        lib.sb_key.restype = ctypes.c_char_p
        return lib if lib.sb_key() == key.encode() else None
    except (OSError, AttributeError):
        return None
    finally:
        os.unlink(tmp)  # the mapping stays valid after the name is gone


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _reason
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        cc = _compiler()
        if cc is None:
            _reason = "no C compiler found ($CC, gcc, cc)"
        else:
            version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
            key = hashlib.sha256(
                SOURCE.read_bytes() + " ".join([cc, *FLAGS, *version, _cpu_id()]).encode()).hexdigest()[:16]
            path = cache_dir() / f"spkernels-{key}.so"
            try:
                lib = _keyed(path, key) if path.exists() else None
                if lib is None:  # none yet, or a foreign / stale / broken file under its name: build it
                    _compile(cc, path, key)
                    lib = _keyed(path, key)
                if lib is None:
                    raise RuntimeError(f"{path} does not load as the kernels it was built as")
                P, I64 = ctypes.c_void_p, ctypes.c_int64
                lib.sb_spmm.argtypes = [I64, I64, I64, P, P, P, P, I64, P, P, I64, ctypes.c_int]
                lib.sb_spmm.restype = None
                lib.sb_sddmm.argtypes = [I64, I64, I64, P, P, P, I64, P, I64, P, ctypes.c_int]
                lib.sb_sddmm.restype = None
                lib.sb_spmm_rows.argtypes = [I64, I64, I64, P, P, P, P, P, P, P, ctypes.c_int]
                lib.sb_spmm_rows.restype = None
                lib.sb_sddmm_rows.argtypes = [I64, I64, I64, P, P, P, P, P, P, ctypes.c_int]
                lib.sb_sddmm_rows.restype = None
                lib.sb_row_tile.argtypes = []
                lib.sb_row_tile.restype = I64
                lib.sb_conv_fwd.argtypes = [I64, I64, I64, I64, I64, P, P, P, P, P, P, ctypes.c_int]
                lib.sb_conv_fwd.restype = None
                lib.sb_conv_dgrad.argtypes = [I64, I64, I64, I64, I64, I64, P, P, P, P, P, P, ctypes.c_int]
                lib.sb_conv_dgrad.restype = None
                lib.sb_conv_wgrad.argtypes = [I64, I64, I64, I64, I64, P, P, P, P, P, ctypes.c_int]
                lib.sb_conv_wgrad.restype = None
                lib.sb_conv_fwd_strided.argtypes = [I64] * 8 + [P] * 6 + [ctypes.c_int]
                lib.sb_conv_fwd_strided.restype = None
                lib.sb_conv_dgrad_strided.argtypes = [I64] * 9 + [P] * 6 + [ctypes.c_int]
                lib.sb_conv_dgrad_strided.restype = None
                lib.sb_conv_wgrad_strided.argtypes = [I64] * 8 + [P] * 5 + [ctypes.c_int]
                lib.sb_conv_wgrad_strided.restype = None
                lib.sb_linear_work.argtypes = [I64] * 2 + [ctypes.c_int]
                lib.sb_linear_work.restype = I64
                lib.sb_linear_fwd.argtypes = [I64] * 4 + [P, P, I64, P, P, P, ctypes.c_int, P, P, P, ctypes.c_int]
                lib.sb_linear_fwd.restype = None
                lib.sb_linear_bwd.argtypes = [I64] * 4 + [P, P, I64, P, P, P, ctypes.c_int, P, ctypes.c_int, P, P,
                                                         P, ctypes.c_int]
                lib.sb_linear_bwd.restype = None
                lib.sb_bn_stats.argtypes = [I64, I64, P, P, P, ctypes.c_int]
                lib.sb_bn_stats.restype = None
                lib.sb_bn_apply.argtypes = [I64, I64, P, P, P, P, ctypes.c_int]
                lib.sb_bn_apply.restype = None
                _lib = lib
            except (OSError, RuntimeError, AttributeError) as e:
                _reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if _lib is None:
            log.warning(f"sparse kernels: {_reason}; sparse layers use torch's CSR ops instead")
        return _lib


def backend() -> str:
    """``c`` when the compiled kernels are available and allowed, else ``torch``."""
    want = os.environ.get("SPARSE_BENCH_KERNELS", "auto")
    if want not in BACKENDS:
        from ...errors import ConfigError

        raise ConfigError(f"SPARSE_BENCH_KERNELS={want} is unknown; use one of {', '.join(BACKENDS)}")
    if want == "torch":
        return "torch"
    return "c" if _load() is not None else "torch"


def _use_c(*tensors: torch.Tensor) -> bool:
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return backend() == "c"


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def spmm(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, xt: torch.Tensor,
         bias: torch.Tensor | None = None, indices64: torch.Tensor | None = None) -> torch.Tensor:
    """``W @ xt[n] (+ bias[:, None])`` for every n, for the CSR matrix W = (indptr, indices,
    values) of shape (len(indptr) - 1, cols); xt is (nb, cols, B). Returns (nb, rows, B)."""
    rows = indptr.numel() - 1
    nb, cols, b = xt.shape
    xt = xt.contiguous()
    if _use_c(values, xt):
        out = torch.empty(nb, rows, b, dtype=xt.dtype)
        values = values.contiguous()
        bias = None if bias is None else bias.detach().contiguous()
        _lib.sb_spmm(nb, rows, b, indptr.data_ptr(), indices.data_ptr(), values.data_ptr(), xt.data_ptr(),
                     cols * b, _ptr(bias), out.data_ptr(), rows * b, torch.get_num_threads())
        return out
    idx = indices64 if indices64 is not None else indices.long()
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore")
        w = torch.sparse_csr_tensor(indptr, idx, values, (rows, cols), check_invariants=False)
    x2 = xt[0] if nb == 1 else xt.transpose(0, 1).reshape(cols, nb * b)
    out = torch.sparse.mm(w, x2)
    if bias is not None:
        out = out + bias[:, None]
    return out.unsqueeze(0) if nb == 1 else out.view(rows, nb, b).transpose(0, 1).contiguous()


def sddmm(indptr: torch.Tensor, indices: torch.Tensor, dyt: torch.Tensor, xt: torch.Tensor,
          indices64: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_n (dyt[n] @ xt[n].T)`` at the structure's positions only, in its order: one value
    per nonzero. dyt is (nb, rows, B), xt (nb, cols, B)."""
    rows = indptr.numel() - 1
    nnz = indices.numel()
    nb, cols, b = xt.shape
    dyt, xt = dyt.contiguous(), xt.contiguous()
    if _use_c(dyt, xt):
        out = torch.empty(nnz, dtype=dyt.dtype)
        _lib.sb_sddmm(nb, rows, b, indptr.data_ptr(), indices.data_ptr(), dyt.data_ptr(), rows * b,
                      xt.data_ptr(), cols * b, out.data_ptr(), torch.get_num_threads())
        return out
    idx = indices64 if indices64 is not None else indices.long()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(indptr, idx, torch.zeros(nnz, dtype=dyt.dtype, device=dyt.device),
                                          (rows, cols), check_invariants=False)
    d2 = dyt[0] if nb == 1 else dyt.transpose(0, 1).reshape(rows, nb * b)
    x2 = xt[0] if nb == 1 else xt.transpose(0, 1).reshape(cols, nb * b)
    return torch.sparse.sampled_addmm(pattern, d2, x2.t(), beta=0.0, alpha=1.0).values()


def spmm_rows(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
              bias: torch.Tensor | None = None, indices64: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for row-major x (M, cols), W the CSR matrix (rows, cols): (M, rows),
    row-major. The C kernel transposes tiles of rows in cache instead of whole matrices."""
    rows = indptr.numel() - 1
    m, cols = x.shape
    x = x.contiguous()
    if _use_c(values, x):
        out = torch.empty(m, rows, dtype=x.dtype)
        work = torch.empty((cols + rows) * _lib.sb_row_tile(), dtype=x.dtype)
        bias = None if bias is None else bias.detach().contiguous()
        values = values.contiguous()  # held: a temporary's memory would be freed before the call
        _lib.sb_spmm_rows(m, rows, cols, indptr.data_ptr(), indices.data_ptr(), values.data_ptr(), x.data_ptr(),
                          _ptr(bias), out.data_ptr(), work.data_ptr(), torch.get_num_threads())
        return out
    return spmm(indptr, indices, values, x.t().unsqueeze(0), bias, indices64)[0].t()


def sddmm_rows(indptr: torch.Tensor, indices: torch.Tensor, dy: torch.Tensor, x: torch.Tensor,
               indices64: torch.Tensor | None = None) -> torch.Tensor:
    """``dy.T @ x`` at the structure's positions only, for row-major dy (M, rows) and x (M, cols)."""
    rows = indptr.numel() - 1
    m, cols = x.shape
    dy, x = dy.contiguous(), x.contiguous()
    if _use_c(dy, x):
        out = torch.empty(indices.numel(), dtype=dy.dtype)
        work = torch.empty((cols + rows) * _lib.sb_row_tile(), dtype=x.dtype)
        _lib.sb_sddmm_rows(m, rows, cols, indptr.data_ptr(), indices.data_ptr(), dy.data_ptr(), x.data_ptr(),
                           out.data_ptr(), work.data_ptr(), torch.get_num_threads())
        return out
    return sddmm(indptr, indices, dy.t().unsqueeze(0), x.t().unsqueeze(0), indices64)


def _either_major(a: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A (B, C) matrix as the Linear kernels read it: itself and 1 when row-major, its (C, B)
    memory and 0 when it is the transposed view of a feature-major matrix (a sparse layer's
    output); anything else is copied row-major."""
    if a.is_contiguous():
        return a, 1
    if a.t().is_contiguous():
        return a.t(), 0
    return a.contiguous(), 1


def _linear_work(idx: torch.Tensor, cols: int) -> torch.Tensor:
    """The Linear kernels' buffers: each thread's tiles (about 2 x cols x 128 floats), and its
    weight-gradient sums."""
    return torch.empty(_lib.sb_linear_work(idx.numel(), cols, torch.get_num_threads()), dtype=torch.float32)


def linear_forward(idx: torch.Tensor, vals: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, rows: int,
                   live: torch.Tensor | None = None, indptr: torch.Tensor | None = None) -> torch.Tensor:
    """``W x^T (+ bias)`` for W (rows, cols): condensed, idx (int32 column ids) and vals both
    (r, k) for the r rows that have k nonzeros, listed in `live` (int32, ascending; None when all
    rows do), the other rows none; or, with `indptr`, W's CSR rows (idx, vals 1-d). x (B, cols)
    row-major or feature-major (see _either_major). The output feature-major, (rows, B). The
    compiled kernels only (compiled_for)."""
    b, cols = x.shape
    r, k = (rows, 0) if indptr is not None else idx.shape
    xm, rm = _either_major(x)
    yt = torch.empty(rows, b, dtype=x.dtype)
    bias = None if bias is None else bias.detach().contiguous()
    vals, work = vals.detach().contiguous(), _linear_work(idx, cols)  # held until the call returns
    _lib.sb_linear_fwd(b, rows, cols, k, _ptr(indptr), _ptr(live), r, idx.data_ptr(), vals.data_ptr(), xm.data_ptr(),
                       rm, _ptr(bias), yt.data_ptr(), work.data_ptr(), torch.get_num_threads())
    return yt


def linear_backward(idx: torch.Tensor, vals: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, live: torch.Tensor | None,
                    want_values: bool, want_input: bool, indptr: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """linear_forward's gradients from dy (B, rows), in one pass: the values' (shaped as vals) and
    the input's, feature-major (cols, B); each only when wanted (else None)."""
    b, cols = x.shape
    rows = dy.shape[1]
    r, k = (rows, 0) if indptr is not None else idx.shape
    xm, x_rm = _either_major(x)
    dym, dy_rm = _either_major(dy)
    dv = torch.empty(vals.shape, dtype=dy.dtype) if want_values else None
    dxt = torch.empty(cols, b, dtype=dy.dtype) if want_input else None
    vals, work = vals.detach().contiguous(), _linear_work(idx, cols)  # held until the call returns
    _lib.sb_linear_bwd(b, rows, cols, k, _ptr(indptr), _ptr(live), r, idx.data_ptr(), vals.data_ptr(), xm.data_ptr(),
                       x_rm, dym.data_ptr(), dy_rm, _ptr(dv), _ptr(dxt), work.data_ptr(), torch.get_num_threads())
    return dv, dxt


def compiled_for(*tensors: torch.Tensor) -> bool:
    """Whether the compiled C kernels (direct convolutions, channel-major batch norm) take these
    tensors: the C file compiled and allowed, CPU, float32."""
    return _use_c(*tensors)


def conv_fwd(indptr, geo, values, x, bias, h_out: int, w_out: int, stride=(1, 1)) -> torch.Tensor:
    """Direct convolution of x (C, H, W, N), its padding skipped, not copied: y (rows, h_out,
    w_out, N). geo (4, nnz): each nonzero's offset, row shift and valid run (stride 1) or valid
    output columns (other strides), as spkernels.c describes."""
    rows = indptr.numel() - 1
    _, h, w, n = x.shape
    y = torch.empty(rows, h_out, w_out, n, dtype=x.dtype)
    b = None if bias is None else bias.detach().contiguous()
    values = values.detach().contiguous()  # held: a temporary's memory would be freed before the call
    ptrs = (indptr.data_ptr(), geo.data_ptr(), values.data_ptr(), x.data_ptr(), _ptr(b),
            y.data_ptr(), torch.get_num_threads())
    if tuple(stride) == (1, 1):
        _lib.sb_conv_fwd(rows, h_out, w_out * n, h, w * n, *ptrs)
    else:
        _lib.sb_conv_fwd_strided(rows, h_out, w_out, n, h, w * n, *stride, *ptrs)
    return y


def conv_dgrad(c_indptr, t_geo, t_src, t_vals, dy, shape, stride=(1, 1)) -> torch.Tensor:
    """The input gradient of conv_fwd: dx of `shape` (C, H, W, N) from dy (rows, h_out, w_out, N);
    t_geo as conv_fwd's geo in the transposed order, offsets within one input channel."""
    c, h, w, n = shape
    _, h_out, w_out, _ = dy.shape
    dx = torch.zeros(shape, dtype=dy.dtype)
    t_vals = t_vals.contiguous()  # held: a temporary's memory would be freed before the call
    ptrs = (c_indptr.data_ptr(), t_geo.data_ptr(), t_src.data_ptr(), t_vals.data_ptr(), dy.data_ptr(),
            dx.data_ptr(), torch.get_num_threads())
    if tuple(stride) == (1, 1):
        _lib.sb_conv_dgrad(c, h_out, w_out * n, h, w * n, h * w * n, *ptrs)
    else:
        _lib.sb_conv_dgrad_strided(c, h_out, w_out, n, h, w * n, h * w * n, *stride, *ptrs)
    return dx


def conv_wgrad(indptr, geo, dy, x, stride=(1, 1)) -> torch.Tensor:
    """The gradient of conv_fwd's active weights, one value per nonzero."""
    rows = indptr.numel() - 1
    _, h_out, w_out, n = dy.shape
    _, h, w, _ = x.shape
    out = torch.empty(int(indptr[-1]), dtype=dy.dtype)
    ptrs = (indptr.data_ptr(), geo.data_ptr(), dy.data_ptr(), x.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if tuple(stride) == (1, 1):
        _lib.sb_conv_wgrad(rows, h_out, w_out * n, h, w * n, *ptrs)
    else:
        _lib.sb_conv_wgrad_strided(rows, h_out, w_out, n, h, w * n, *stride, *ptrs)
    return out


def batch_norm_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x (C, L), contiguous float32: the sum and the sum of squares (float64)."""
    c, n = x.shape
    total = torch.empty(c, dtype=torch.float64)
    squares = torch.empty(c, dtype=torch.float64)
    _lib.sb_bn_stats(c, n, x.data_ptr(), total.data_ptr(), squares.data_ptr(), torch.get_num_threads())
    return total, squares


def batch_norm_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x (C, L) * scale[:, None] + shift[:, None] (float32, contiguous)."""
    c, n = x.shape
    y = torch.empty_like(x)
    scale, shift = scale.contiguous(), shift.contiguous()  # held: a temporary would be freed before the call
    _lib.sb_bn_apply(c, n, x.data_ptr(), scale.data_ptr(), shift.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y
