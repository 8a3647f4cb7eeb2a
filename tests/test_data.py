"""Tests for sparse_bench.data: IDX parsing, splits, normalisation, synthetic data, DeviceLoader."""

from __future__ import annotations

import gzip
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sparse_bench.data import DataBundle, DeviceLoader, build_data
from sparse_bench.data.mnist import read_idx
from sparse_bench.errors import ConfigError

CPU = torch.device("cpu")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
N_TRAIN, N_TEST = 50, 20
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


# --------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, gz: bool = False, magic: int | None = None) -> Path:
    """Write a uint8 IDX file (our own writer, independent of the reader under test)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x00000800 | array.ndim
    payload = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_arrays(seed: int = 7) -> dict[str, np.ndarray]:
    """Small MNIST-shaped data with known pixels and labels."""
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(N_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(N_TRAIN) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": ((np.arange(N_TEST) * 3) % 10).astype(np.uint8),
    }


def write_dataset(folder: Path, arrays: dict[str, np.ndarray], gz: bool) -> dict[str, Path]:
    return {name: write_idx(folder / name, arr, gz=gz) for name, arr in arrays.items()}


def normalised(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255.0)).unsqueeze(1)
    return (x - mean) / std


def cfg(**kw):
    base = {"batch_size": 16, "test_batch_size": 8, "val_fraction": 0.1}
    base.update(kw)
    return OmegaConf.create(base)


def single_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def names_key(msg: str, key: str) -> bool:
    """The message starts with the key: ``key: ...`` (a reader) or ``key=value ...`` (the schema)."""
    return re.match(re.escape(key) + r"[:= ]", msg) is not None


# --------------------------------------------------------------------------- IDX data sets


def test_flat_gz_layout_values_split_and_batches(tmp_path):
    arrays = make_arrays()
    write_dataset(tmp_path, arrays, gz=True)
    data = build_data(cfg(name="mnist", root=str(tmp_path)), CPU, seed=0)

    assert isinstance(data, DataBundle)
    assert data.name == "mnist" and data.num_classes == 10 and data.input_shape == (1, 28, 28)
    assert (data.train.num_samples, data.val.num_samples, data.test.num_samples) == (45, 5, 20)

    want_train = normalised(arrays["train-images-idx3-ubyte"], MNIST_MEAN, MNIST_STD)
    labels = torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64))
    assert data.train.x.dtype == torch.float32 and data.train.y.dtype == torch.int64
    torch.testing.assert_close(data.train.x, want_train[:45], rtol=0, atol=1e-6)
    torch.testing.assert_close(data.train.y, labels[:45])
    # Validation is the last 10% of the training file, in file order.
    torch.testing.assert_close(data.val.x, want_train[45:], rtol=0, atol=1e-6)
    torch.testing.assert_close(data.val.y, labels[45:])
    want_test = normalised(arrays["t10k-images-idx3-ubyte"], MNIST_MEAN, MNIST_STD)
    torch.testing.assert_close(data.test.x, want_test, rtol=0, atol=1e-6)
    assert data.test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # A pixel computed by hand: value 255 -> (1 - mean) / std.
    px = int(arrays["train-images-idx3-ubyte"][3, 10, 11])
    assert math.isclose(float(data.train.x[3, 0, 10, 11]), (px / 255 - MNIST_MEAN) / MNIST_STD, abs_tol=1e-6)

    assert (len(data.train), len(data.val), len(data.test)) == (3, 1, 3)
    assert [xb.shape[0] for xb, _ in data.train] == [16, 16, 13]
    assert [xb.shape[0] for xb, _ in data.test] == [8, 8, 4]
    # The test loader is not shuffled.
    assert torch.cat([yb for _, yb in data.test]).tolist() == data.test.y.tolist()


@pytest.mark.parametrize("name,subdir", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_raw_layout_uncompressed_custom_normalize(tmp_path, monkeypatch, name, subdir):
    arrays = make_arrays(seed=3)
    write_dataset(tmp_path / "store" / subdir / "raw", arrays, gz=False)
    monkeypatch.chdir(tmp_path)  # relative root resolves against the cwd
    conf = cfg(name=name, root="store", val_fraction=0.2, normalize={"mean": [0.5], "std": [0.25]})
    data = build_data(conf, CPU, seed=1)
    want = normalised(arrays["train-images-idx3-ubyte"], 0.5, 0.25)
    assert (data.train.num_samples, data.val.num_samples) == (40, 10)
    torch.testing.assert_close(data.train.x, want[:40], rtol=0, atol=1e-6)
    torch.testing.assert_close(data.val.x, want[40:], rtol=0, atol=1e-6)


def test_fashion_default_normalisation_and_root_raw_dotted_names(tmp_path):
    arrays = make_arrays(seed=5)
    for name, arr in arrays.items():  # torchvision-less "root/raw" with dotted file names
        dotted = name.replace("-idx", ".idx")
        write_idx(tmp_path / "raw" / dotted, arr, gz=name.startswith("t10k"))
    data = build_data(cfg(name="fashion_mnist", root=str(tmp_path), val_fraction=0), CPU, seed=0)
    assert data.val is None and data.train.num_samples == N_TRAIN
    want = normalised(arrays["train-images-idx3-ubyte"], 0.2860, 0.3530)
    torch.testing.assert_close(data.train.x, want, rtol=0, atol=1e-6)


def test_missing_files_message_names_key_and_folder(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(ConfigError) as exc:
        build_data(cfg(name="mnist", root=str(empty)), CPU, seed=0)
    msg = single_line_error(exc)
    assert msg.startswith("dataset.root:") and str(empty) in msg
    assert "train-images-idx3-ubyte" in msg and "dataset.download=true" in msg

    with pytest.raises(ConfigError) as exc:
        build_data(cfg(name="mnist", root=str(tmp_path / "absent")), CPU, seed=0)
    assert str(tmp_path / "absent") in single_line_error(exc)


def test_incomplete_folder_names_missing_file(tmp_path):
    arrays = make_arrays()
    del arrays["t10k-labels-idx1-ubyte"]
    write_dataset(tmp_path, arrays, gz=True)
    with pytest.raises(ConfigError) as exc:
        build_data(cfg(name="mnist", root=str(tmp_path)), CPU, seed=0)
    msg = single_line_error(exc)
    assert msg.startswith("dataset.root:") and "t10k-labels-idx1-ubyte" in msg and str(tmp_path) in msg


def test_corrupt_magic_names_file(tmp_path):
    paths = write_dataset(tmp_path, make_arrays(), gz=True)
    bad = write_idx(tmp_path / "train-labels-idx1-ubyte", make_arrays()["train-labels-idx1-ubyte"], gz=True,
                    magic=0x00000803)
    assert bad == paths["train-labels-idx1-ubyte"]
    with pytest.raises(ConfigError) as exc:
        build_data(cfg(name="mnist", root=str(tmp_path)), CPU, seed=0)
    msg = single_line_error(exc)
    assert msg.startswith("dataset.root:") and str(bad) in msg and "magic" in msg


def test_truncated_and_mismatched_files(tmp_path):
    arrays = make_arrays()
    paths = write_dataset(tmp_path, arrays, gz=False)
    img = paths["train-images-idx3-ubyte"]
    img.write_bytes(img.read_bytes()[:-5])
    with pytest.raises(ConfigError, match="corrupt IDX file") as exc:
        read_idx(img, 0x00000803)
    assert str(img) in single_line_error(exc)

    write_idx(img, arrays["train-images-idx3-ubyte"][:49])  # 49 images, 50 labels
    with pytest.raises(ConfigError) as exc:
        build_data(cfg(name="mnist", root=str(tmp_path)), CPU, seed=0)
    assert "49 images" in single_line_error(exc)

    gz = tmp_path / "broken.gz"
    gz.write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(ConfigError, match="dataset.root"):
        read_idx(gz, 0x00000801)


def test_download_uses_torchvision_class(tmp_path, monkeypatch):
    """download=true calls torchvision (faked here: no network) and reads what it wrote."""
    import torchvision.datasets

    arrays = make_arrays(seed=11)
    calls = []

    class FakeMNIST:
        def __init__(self, root, train=True, download=False, **kw):
            calls.append((root, download))
            write_dataset(Path(root) / "MNIST" / "raw", arrays, gz=False)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    data = build_data(cfg(name="mnist", root=str(tmp_path / "dl"), download=True), CPU, seed=0)
    assert calls == [(str(tmp_path / "dl"), True)]
    assert data.train.num_samples + data.val.num_samples == N_TRAIN

    # Files present: no second download.
    build_data(cfg(name="mnist", root=str(tmp_path / "dl"), download=True), CPU, seed=0)
    assert len(calls) == 1

    class FailingMNIST:
        def __init__(self, *a, **kw):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nno network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", FailingMNIST)
    with pytest.raises(ConfigError) as exc:
        build_data(cfg(name="mnist", root=str(tmp_path / "other"), download=True), CPU, seed=0)
    assert single_line_error(exc).startswith("dataset.download:")


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"name": "cifar1000"}, "dataset.name"),
        ({"name": "digits", "val_fraction": 1.5}, "dataset.val_fraction"),
        ({"name": "digits", "batch_size": 0}, "dataset.batch_size"),
        ({"name": "digits", "batch_size": "big"}, "dataset.batch_size"),
        ({"name": "digits", "normalize": {"mean": [0.1, 0.2], "std": [0.3]}}, "dataset.normalize.mean"),
        ({"name": "digits", "normalize": {"mean": [0.1], "std": [0.0]}}, "dataset.normalize.std"),
        ({"name": "synthetic", "input_shape": [0, 3], "num_classes": 2, "n_train": 4, "n_test": 4},
         "dataset.input_shape"),
        ({"name": "synthetic", "input_shape": [4], "num_classes": 1, "n_train": 4, "n_test": 4},
         "dataset.num_classes"),
        ({"name": "synthetic", "noise": -1.0}, "dataset.noise"),
        ({"name": "digits", "test_fraction": 1.0}, "dataset.test_fraction"),
        ({"name": "mnist", "root": " "}, "dataset.root"),
        ({"name": "mnist", "download": "maybe"}, "dataset.download"),
    ],
)
def test_config_mistakes_are_config_errors(overrides, key):
    with pytest.raises(ConfigError) as exc:
        build_data(cfg(**overrides), CPU, seed=0)
    assert names_key(single_line_error(exc), key)


def test_unknown_name_lists_choices():
    with pytest.raises(ConfigError) as exc:
        build_data(cfg(name="svhn"), CPU, seed=0)
    msg = single_line_error(exc)
    for choice in ("mnist", "fashion_mnist", "digits", "synthetic", "cifar10", "cifar100", "imagenet"):
        assert choice in msg


def test_one_builder_per_schema_option():
    from sparse_bench import schema
    from sparse_bench.data import BUILDERS

    assert set(BUILDERS) == set(schema.DATASETS)


def test_user_data_set_by_target(tmp_path, monkeypatch):
    (tmp_path / "mylab_data.py").write_text(
        "import torch\n"
        "from sparse_bench.data import DataBundle, DeviceLoader\n"
        "def build(cfg, device, seed):\n"
        "    x, y = torch.zeros(8, 2, device=device), torch.arange(8, device=device) % 2\n"
        "    return DataBundle(DeviceLoader(x, y, 4, shuffle=True, seed=seed), None, DeviceLoader(x, y, 4, False),\n"
        "                      (2,), 2, cfg.name)\n"
        "def wrong(cfg, device, seed):\n"
        "    return 'not a bundle'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = build_data(OmegaConf.create({"name": "mine", "_target_": "mylab_data.build"}), CPU, seed=3)
    assert isinstance(data, DataBundle) and data.name == "mine" and data.train.seed == 3 and len(data.train) == 2
    with pytest.raises(ConfigError) as exc:
        build_data(OmegaConf.create({"name": "mine", "_target_": "mylab_data.wrong"}), CPU, seed=0)
    assert single_line_error(exc) == "dataset._target_=mylab_data.wrong must return a sparse_bench.data.DataBundle"


def test_data_modules_import_no_private_name_and_form_no_cycle():
    """Shared helpers are public in one module; no import between data modules hides in a function."""
    import ast

    import sparse_bench.data

    folder = Path(sparse_bench.data.__file__).parent
    deps: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        deps[path.stem] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparse_bench"):
                assert not [a.name for a in node.names if a.name.startswith("_")], (path.name, node.module)
                if node.module.startswith("sparse_bench.data."):
                    assert id(node) in top, f"{path.name} imports {node.module} inside a function"
                    deps[path.stem].add(node.module.rsplit(".", 1)[1])

    def reach(name: str, seen: set[str]) -> set[str]:
        for dep in deps.get(name, ()):
            if dep not in seen:
                seen.add(dep)
                reach(dep, seen)
        return seen

    assert [name for name in deps if name in reach(name, set())] == []


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"Fashion-MNIST not installed at {FASHION_DIR}")
def test_real_fashion_mnist():
    data = build_data(cfg(name="fashion_mnist", root=str(FASHION_DIR), batch_size=128, test_batch_size=1000),
                      CPU, seed=0)
    assert (data.train.num_samples, data.val.num_samples, data.test.num_samples) == (54000, 6000, 10000)
    assert data.num_classes == 10 and data.input_shape == (1, 28, 28)
    assert (len(data.train), len(data.val), len(data.test)) == (422, 6, 10)
    # Default statistics normalise the training images to roughly zero mean, unit std.
    assert abs(float(data.train.x.mean())) < 0.02 and abs(float(data.train.x.std()) - 1) < 0.02
    all_y = torch.cat([data.train.y, data.val.y])
    assert torch.bincount(all_y, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(data.test.y, minlength=10).tolist() == [1000] * 10


# --------------------------------------------------------------------------- digits


def test_digits_read_directly_equal_scikit_learns_loader(monkeypatch):
    from sklearn.datasets import load_digits

    from sparse_bench.data import digits

    ref = load_digits()
    images, target = digits.digits_arrays()
    assert np.array_equal(images, ref.images) and np.array_equal(target, ref.target)
    # no file where it is expected: scikit-learn's loader, the same arrays
    monkeypatch.setattr(digits.Path, "is_file", lambda self: False)
    images, target = digits.digits_arrays()
    assert np.array_equal(images, ref.images) and np.array_equal(target, ref.target)


def test_digits_shapes_and_fixed_split():
    from sklearn.datasets import load_digits

    a = build_data(cfg(name="digits", batch_size=64, test_batch_size=500), CPU, seed=0)
    b = build_data(cfg(name="digits", batch_size=64, test_batch_size=500), CPU, seed=12345)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    sizes = (a.train.num_samples, a.val.num_samples, a.test.num_samples)
    assert sizes == (1294, 144, 359) and sum(sizes) == 1797
    # The split does not depend on the run seed ...
    for part in ("train", "val", "test"):
        torch.testing.assert_close(getattr(a, part).x, getattr(b, part).x, rtol=0, atol=0)
        torch.testing.assert_close(getattr(a, part).y, getattr(b, part).y, rtol=0, atol=0)
    # ... only the training shuffle does.
    assert not torch.equal(next(iter(a.train))[1], next(iter(b.train))[1])
    # ... but it does depend on split_seed.
    c = build_data(cfg(name="digits", split_seed=1), CPU, seed=0)
    assert not torch.equal(a.test.y, c.test.y)

    # Values: images / 16, normalised with (0.3, 0.4); all samples present exactly once.
    ref = torch.from_numpy(load_digits().images.astype(np.float32) / 16).unsqueeze(1)
    got = torch.cat([a.train.x, a.val.x, a.test.x]) * 0.4 + 0.3
    key = lambda t: sorted(map(tuple, t.flatten(1).mul(16).round().to(torch.int64).tolist()))  # noqa: E731
    assert key(got) == key(ref)
    assert float(a.test.x.min()) == pytest.approx(-0.3 / 0.4)


# --------------------------------------------------------------------------- synthetic


def synth(shape, **kw):
    base = {"name": "synthetic", "input_shape": shape, "num_classes": 10, "n_train": 1000, "n_test": 500}
    base.update(kw)
    return cfg(**base)


@pytest.mark.parametrize("shape", [[1, 28, 28], [20], [3, 32, 32]])
def test_synthetic_shapes(shape):
    data = build_data(synth(shape, n_train=200, n_test=50), CPU, seed=0)
    assert data.input_shape == tuple(shape) and data.num_classes == 10
    assert data.train.x.shape == (180, *shape) and data.val.x.shape == (20, *shape)
    assert data.test.x.shape == (50, *shape)
    assert data.train.x.dtype == torch.float32 and data.test.y.dtype == torch.int64
    assert torch.bincount(data.test.y, minlength=10).tolist() == [5] * 10  # balanced


def test_synthetic_deterministic_in_data_seed_only():
    a = build_data(synth([20], data_seed=3), CPU, seed=0)
    b = build_data(synth([20], data_seed=3), CPU, seed=99)
    c = build_data(synth([20], data_seed=4), CPU, seed=0)
    torch.manual_seed(1234)  # the global RNG plays no part
    d = build_data(synth([20], data_seed=3), CPU, seed=0)
    for other in (b, d):
        assert torch.equal(a.train.x, other.train.x) and torch.equal(a.test.y, other.test.y)
    assert not torch.equal(a.train.x, c.train.x)


@pytest.mark.parametrize("shape", [[20], [1, 28, 28]])
def test_synthetic_is_learnable(shape):
    data = build_data(synth(shape, noise=1.0), CPU, seed=0)
    xtr, ytr = data.train.x.flatten(1), data.train.y
    centroids = torch.stack([xtr[ytr == k].mean(0) for k in range(10)])
    pred = torch.cdist(data.test.x.flatten(1), centroids).argmin(1)
    acc = (pred == data.test.y).float().mean().item()
    assert acc > 0.9, acc  # chance is 0.1


# --------------------------------------------------------------------------- DeviceLoader


def make_loader(n=103, bs=10, seed=5, drop_last=False, shuffle=True):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    y = torch.arange(n)
    return DeviceLoader(x, y, bs, shuffle=shuffle, seed=seed, drop_last=drop_last)


def epoch_order(loader, epoch):
    loader.set_epoch(epoch)
    ys, sizes = [], []
    for xb, yb in loader:
        assert torch.equal(xb[:, 0].long(), yb)  # inputs and targets stay paired
        ys.append(yb)
        sizes.append(len(yb))
    return torch.cat(ys), sizes


def test_loader_lengths_and_partial_batch():
    loader = make_loader()
    assert loader.num_samples == 103 and len(loader) == 11
    order, sizes = epoch_order(loader, 0)
    assert sizes == [10] * 10 + [3]
    assert sorted(order.tolist()) == list(range(103))  # each sample exactly once
    dropped = make_loader(drop_last=True)
    assert len(dropped) == 10
    order, sizes = epoch_order(dropped, 0)
    assert sizes == [10] * 10 and len(set(order.tolist())) == 100
    assert len(make_loader(n=100)) == 10 and len(make_loader(n=5, bs=10, drop_last=True)) == 0


def test_loader_order_is_a_function_of_seed_and_epoch():
    a, b = make_loader(seed=5), make_loader(seed=5)
    torch.manual_seed(0)
    o_a0, _ = epoch_order(a, 0)
    torch.manual_seed(1)  # global RNG state must not matter
    o_b0, _ = epoch_order(b, 0)
    assert torch.equal(o_a0, o_b0)
    o_a1, _ = epoch_order(a, 1)
    assert not torch.equal(o_a0, o_a1) and sorted(o_a1.tolist()) == list(range(103))
    # Resuming at epoch 1 with a fresh loader reproduces the same batches; iterating twice too.
    o_b1, _ = epoch_order(b, 1)
    assert torch.equal(o_a1, o_b1) and torch.equal(epoch_order(b, 1)[0], o_b1)
    assert torch.equal(epoch_order(a, 0)[0], o_a0)
    assert not torch.equal(epoch_order(make_loader(seed=6), 0)[0], o_a0)
    # The default epoch is 0.
    assert torch.equal(torch.cat([yb for _, yb in make_loader(seed=5)]), o_a0)


def test_unshuffled_loader_keeps_order():
    loader = make_loader(shuffle=False, bs=7)
    for epoch in (0, 3):
        order, _ = epoch_order(loader, epoch)
        assert order.tolist() == list(range(103))


def test_loader_rejects_mismatched_tensors():
    with pytest.raises(ValueError):
        DeviceLoader(torch.zeros(4, 2), torch.zeros(5), 2, shuffle=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_everything_on_cuda():
    dev = torch.device("cuda")
    data = build_data(synth([1, 28, 28]), dev, seed=0)
    for loader in (data.train, data.val, data.test):
        xb, yb = next(iter(loader))
        assert xb.is_cuda and yb.is_cuda and yb.dtype == torch.int64
    cpu = build_data(synth([1, 28, 28]), CPU, seed=0)
    torch.testing.assert_close(data.train.x.cpu(), cpu.train.x)
    assert torch.equal(torch.cat([y for _, y in data.train]).cpu(), torch.cat([y for _, y in cpu.train]))


def test_a_failed_download_is_one_line_saying_what_to_do_instead(tmp_path, monkeypatch):
    import torchvision.datasets

    from sparse_bench.data.common import torchvision_download

    class Offline:
        def __init__(self, *args, **kwargs):
            raise OSError("no route\nto host")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(ConfigError) as exc:
        torchvision_download("MNIST", tmp_path / "m", "MNIST", "put the four IDX files in dataset.root")
    assert str(exc.value) == (f"dataset.download: downloading MNIST into {tmp_path / 'm'} failed (OSError: no route "
                              "to host); check network access or put the four IDX files in dataset.root and set "
                              "dataset.download=false")
