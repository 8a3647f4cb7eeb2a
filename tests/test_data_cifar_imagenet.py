"""CIFAR-10/100 pickle reader, device-side augmentation, and the ImageNet folder pipeline."""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sparse_bench.data import DeviceLoader, build_data
from sparse_bench.data.augment import CropFlip, Normalize
from sparse_bench.data.loader import mix_seed
from sparse_bench.errors import ConfigError

from conftest import compose

CPU = torch.device("cpu")
C10_MEAN, C10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
C100_MEAN, C100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IN_MEAN, IN_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PER_BATCH, N_TEST = 12, 10  # CIFAR-10: 5 x 12 training images


# tiny models and tensors: one intra-op thread (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- writers (torchvision's format)


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def write_cifar10(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """The five data batches, the test batch and batches.meta, as in cifar-10-python.tar.gz."""
    rng = np.random.default_rng(seed)
    out = {"x_train": [], "y_train": []}
    for i in range(1, 6):
        data = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, PER_BATCH)]
        _dump(folder / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels,
                                           b"data": data, b"filenames": [b"img.png"] * PER_BATCH})
        out["x_train"].append(data)
        out["y_train"].append(labels)
    data = rng.integers(0, 256, (N_TEST, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, N_TEST)]
    _dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data,
                                  b"filenames": [b"img.png"] * N_TEST})
    _dump(folder / "batches.meta", {b"num_cases_per_batch": PER_BATCH, b"num_vis": 3072,
                                    b"label_names": [f"class{i}".encode() for i in range(10)]})
    return {"x_train": np.concatenate(out["x_train"]), "y_train": np.concatenate(out["y_train"]),
            "x_test": data, "y_test": np.asarray(labels)}


def write_cifar100(folder: Path, n_train: int = 40, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", N_TEST)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        _dump(folder / split, {b"filenames": [b"x.png"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
                               b"coarse_labels": [f // 5 for f in fine], b"data": data})
        out[f"x_{split}"], out[f"y_{split}"] = data, np.asarray(fine)
    _dump(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                            b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    return out


def normalised(rows: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(rows.reshape(-1, 3, 32, 32).astype(np.float32)) / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def cfg(**kw):
    base = {"batch_size": 16, "test_batch_size": 8}
    base.update(kw)
    return OmegaConf.create(base)


def names_key(msg: str, key: str) -> bool:
    """The message starts with the key: ``key: ...`` (a reader) or ``key=value ...`` (the schema)."""
    return re.match(re.escape(key) + r"[:= ]", msg) is not None


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def collect(loader, epoch: int | None = None):
    if epoch is not None:
        loader.set_epoch(epoch)
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------- CIFAR files


def test_cifar10_values_labels_and_split(tmp_path):
    arrays = write_cifar10(tmp_path / "cifar-10-batches-py")
    data = build_data(cfg(name="cifar10", root=str(tmp_path), val_fraction=0.25,
                          augment={"crop": False, "flip": False}), CPU, seed=3)
    assert data.name == "cifar10" and data.num_classes == 10 and data.input_shape == (3, 32, 32)
    assert (data.train.num_samples, data.val.num_samples, data.test.num_samples) == (45, 15, N_TEST)
    assert data.train_eval is None  # training batches are not augmented: nothing to tell apart

    want_train = normalised(arrays["x_train"], C10_MEAN, C10_STD)
    # stored compactly, exactly the file's pixels
    assert data.train.x.dtype == torch.uint8
    assert torch.equal(data.train.x, torch.from_numpy(arrays["x_train"][:45]).view(45, 3, 32, 32))
    # test split: file order, normalised with the CIFAR-10 statistics
    x_te, y_te = collect(data.test)
    assert x_te.dtype == torch.float32 and x_te.shape == (N_TEST, 3, 32, 32)
    torch.testing.assert_close(x_te, normalised(arrays["x_test"], C10_MEAN, C10_STD), rtol=0, atol=1e-6)
    assert y_te.dtype == torch.int64 and y_te.tolist() == arrays["y_test"].tolist()
    # one pixel by hand: row layout is R plane, G plane, B plane, each 32x32 row-major
    raw = int(arrays["x_test"][2, 1024 + 5 * 32 + 7])  # green, row 5, column 7
    assert math.isclose(float(x_te[2, 1, 5, 7]), (raw / 255 - C10_MEAN[1]) / C10_STD[1], abs_tol=1e-6)
    # validation: the last 25% of the training batches, in file order, never augmented
    x_va, y_va = collect(data.val)
    torch.testing.assert_close(x_va, want_train[45:], rtol=0, atol=1e-6)
    assert y_va.tolist() == arrays["y_train"][45:].tolist()
    # training batches without augmentation are the normalised images in the epoch's order
    x_tr, y_tr = collect(data.train, epoch=2)
    order = data.train.order(2)
    torch.testing.assert_close(x_tr, want_train[:45][order], rtol=0, atol=1e-6)
    assert y_tr.tolist() == arrays["y_train"][:45][order.numpy()].tolist()
    assert [len(y) for _, y in data.train] == [16, 16, 13]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("form", ["parent", "folder"])
def test_cifar_root_forms_and_default_split(tmp_path, name, form):
    folder = tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    arrays = (write_cifar10 if name == "cifar10" else write_cifar100)(folder)
    root = tmp_path if form == "parent" else folder
    data = build_data(cfg(name=name, root=str(root)), CPU, seed=0)
    n_train = len(arrays["y_train"])
    assert data.val is None and data.train.num_samples == n_train  # val_fraction defaults to 0 for CIFAR
    assert data.num_classes == (10 if name == "cifar10" else 100) and data.input_shape == (3, 32, 32)
    mean, std = (C10_MEAN, C10_STD) if name == "cifar10" else (C100_MEAN, C100_STD)
    x_te, y_te = collect(data.test)
    torch.testing.assert_close(x_te, normalised(arrays["x_test"], mean, std), rtol=0, atol=1e-6)
    assert y_te.tolist() == arrays["y_test"].tolist()  # CIFAR-100: the fine labels
    assert sorted(collect(data.train, epoch=1)[1].tolist()) == sorted(arrays["y_train"].tolist())
    # augmented by default, so a separate un-augmented view of the training set exists
    assert data.train_eval is not None and data.train_eval.num_samples == n_train


def test_cifar_custom_normalisation(tmp_path):
    arrays = write_cifar10(tmp_path)
    data = build_data(cfg(name="cifar10", root=str(tmp_path), normalize={"mean": [0.5], "std": [0.25]}), CPU, 0)
    x_te, _ = collect(data.test)
    torch.testing.assert_close(x_te, normalised(arrays["x_test"], (0.5,) * 3, (0.25,) * 3), rtol=0, atol=1e-6)


def test_cifar_missing_incomplete_and_corrupt_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for root in (empty, tmp_path / "absent"):
        with pytest.raises(ConfigError) as exc:
            build_data(cfg(name="cifar10", root=str(root)), CPU, seed=0)
        msg = one_line(exc)
        assert msg.startswith("dataset.root:") and str(root) in msg
        assert "cifar-10-batches-py" in msg and "dataset.download=true" in msg
    with pytest.raises(ConfigError) as exc:
        build_data(cfg(name="cifar100", root=""), CPU, seed=0)
    assert names_key(one_line(exc), "dataset.root")

    folder = tmp_path / "c10" / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(ConfigError) as exc:
        build_data(cfg(name="cifar10", root=str(tmp_path / "c10")), CPU, seed=0)
    msg = one_line(exc)
    assert msg.startswith("dataset.root:") and "data_batch_3" in msg and str(folder) in msg

    write_cifar10(folder)
    (folder / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(ConfigError) as exc:
        build_data(cfg(name="cifar10", root=str(folder)), CPU, seed=0)
    assert one_line(exc).startswith("dataset.root:") and str(folder / "test_batch") in str(exc.value)

    _dump(folder / "test_batch", {b"labels": [0, 1], b"data": np.zeros((2, 1024), np.uint8)})
    with pytest.raises(ConfigError, match=r"uint8 \(N, 3072\)"):
        build_data(cfg(name="cifar10", root=str(folder)), CPU, seed=0)
    _dump(folder / "test_batch", {b"labels": [0, 10], b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(ConfigError, match="outside 0..9"):
        build_data(cfg(name="cifar10", root=str(folder)), CPU, seed=0)
    _dump(folder / "test_batch", {b"labels": [0], b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(ConfigError, match="2 images but 1 labels"):
        build_data(cfg(name="cifar10", root=str(folder)), CPU, seed=0)


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/never_created_by_cifar_reader"),))


def test_cifar_reader_refuses_foreign_objects(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    marker = Path("/tmp/never_created_by_cifar_reader")
    marker.unlink(missing_ok=True)
    _dump(folder / "data_batch_1", {b"labels": [0], b"data": _Boom()})
    with pytest.raises(ConfigError) as exc:
        build_data(cfg(name="cifar10", root=str(tmp_path)), CPU, seed=0)
    assert "refusing to load" in one_line(exc) and not marker.exists()


def test_cifar_download_uses_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeCIFAR100:
        def __init__(self, root, train=True, download=False, **kw):
            calls.append((root, train, download))
            write_cifar100(Path(root) / "cifar-100-python")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    conf = cfg(name="cifar100", root=str(tmp_path / "dl"), download=True)
    assert build_data(conf, CPU, seed=0).train.num_samples == 40
    assert calls == [(str(tmp_path / "dl"), True, True)]
    build_data(conf, CPU, seed=0)  # files present: no second download
    assert len(calls) == 1

    class Failing:
        def __init__(self, *a, **kw):
            raise RuntimeError("no\nnetwork")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Failing)
    with pytest.raises(ConfigError) as exc:
        build_data(cfg(name="cifar100", root=str(tmp_path / "x"), download=True), CPU, seed=0)
    assert one_line(exc).startswith("dataset.download:")


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"augment": {"pad_mode": "edge"}}, "dataset.augment.pad_mode"),
        ({"augment": {"padding": -1}}, "dataset.augment.padding"),
        ({"augment": {"padding": 40}}, "dataset.augment.padding"),
        ({"augment": {"flip": "yes"}}, "dataset.augment.flip"),
        ({"augment": "sometimes"}, "dataset.augment"),
        ({"normalize": {"mean": [0.1, 0.2], "std": [0.3]}}, "dataset.normalize.mean"),
        ({"val_fraction": 1.0}, "dataset.val_fraction"),
    ],
)
def test_cifar_config_mistakes(tmp_path, overrides, key):
    write_cifar10(tmp_path)
    with pytest.raises(ConfigError) as exc:
        build_data(cfg(name="cifar10", root=str(tmp_path), **overrides), CPU, seed=0)
    assert names_key(one_line(exc), key)


def test_yaml_groups_compose_and_load(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    write_cifar100(tmp_path / "cifar-100-python")
    for name, mean in (("cifar10", C10_MEAN), ("cifar100", C100_MEAN)):
        conf = compose([f"dataset={name}", f"dataset.root={tmp_path}"])
        assert list(conf.dataset.normalize.mean) == list(mean)
        assert conf.dataset.augment.pad_mode in ("reflect", "zeros") and conf.dataset.val_fraction == 0
        data = build_data(conf.dataset, CPU, seed=0)
        assert data.input_shape == (3, 32, 32) and isinstance(data.train.transform, CropFlip)
    conf = compose(["dataset=imagenet"])
    assert conf.dataset.num_workers == 8 and conf.dataset.image_size == 224 and conf.dataset.val_fraction == 0


# --------------------------------------------------------------------------- augmentation


def _reference_crops(x: np.ndarray, pad: int, mode: str) -> np.ndarray:
    """All (oy, ox, flip) crops of every image, by numpy: (B, 2P+1, 2P+1, 2, C, H, W)."""
    b, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect" if mode == "reflect" else "constant")
    n = 2 * pad + 1
    out = np.empty((b, n, n, 2, c, h, w), dtype=x.dtype)
    for oy in range(n):
        for ox in range(n):
            crop = padded[:, :, oy : oy + h, ox : ox + w]
            out[:, oy, ox, 0] = crop
            out[:, oy, ox, 1] = crop[..., ::-1]
    return out


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_crop_flip_matches_padded_crops(mode):
    x = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tf = CropFlip(None, None, pad=4, pad_mode=mode, flip=True, scale=1.0)
    out = tf(x, torch.Generator().manual_seed(11))
    assert out.dtype == torch.float32 and out.shape == x.shape
    ref = _reference_crops(x.numpy(), 4, mode)
    got = out.to(torch.uint8).numpy()
    hits = (ref == got[:, None, None, None]).all(axis=(4, 5, 6))  # (B, 9, 9, 2)
    assert (hits.sum(axis=(1, 2, 3)) == 1).all()  # every sample is exactly one padded crop (offsets in [0, 8])
    b_idx, oy, ox, flipped = np.nonzero(hits)
    assert b_idx.tolist() == list(range(48))
    assert 0 < flipped.sum() < 48  # both flipped and plain samples
    assert len(set(zip(oy.tolist(), ox.tolist()))) > 10  # per-sample offsets, not one per batch
    assert oy.min() == 0 or ox.min() == 0 or oy.max() == 8 or ox.max() == 8  # the extremes are reachable


def test_flip_only_and_identity():
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = CropFlip(None, None, pad=0, flip=True, scale=1.0)(x, torch.Generator().manual_seed(2)).to(torch.uint8)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all()) and 0 < int(flipped.sum()) < 32
    # augmentation off: exactly the normalised input, whatever the generator
    off = CropFlip(C10_MEAN, C10_STD, pad=0, flip=False)
    assert off.identity
    want = Normalize(C10_MEAN, C10_STD)(x)
    torch.testing.assert_close(want, ((x.float() / 255) - torch.tensor(C10_MEAN).view(1, 3, 1, 1))
                               / torch.tensor(C10_STD).view(1, 3, 1, 1), rtol=0, atol=1e-6)
    assert torch.equal(off(x, torch.Generator().manual_seed(5)), want)


def _offsets(out: torch.Tensor, x: torch.Tensor, mode: str) -> list[tuple[int, int, int]]:
    """(oy, ox, flip) of every sample, by matching against the numpy reference crops."""
    got = out.to(torch.uint8).numpy()[:, None, None, None]
    hits = (_reference_crops(x.numpy(), 4, mode) == got).all(axis=(4, 5, 6))
    assert (hits.sum(axis=(1, 2, 3)) == 1).all()
    return [tuple(int(v) for v in np.argwhere(h)[0]) for h in hits]


def test_reflect_and_zeros_differ_only_at_the_border():
    x = torch.randint(1, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    raw = {m: CropFlip(None, None, pad=4, pad_mode=m, flip=True, scale=1.0)(x, torch.Generator().manual_seed(9))
           for m in ("reflect", "zeros")}
    # the same generator draws the same offsets and flips in both modes
    offsets = _offsets(raw["reflect"], x, "reflect")
    assert offsets == _offsets(raw["zeros"], x, "zeros")
    assert sum(o[:2] != (4, 4) for o in offsets) > 30  # most samples show some border
    # zeros: black (0) exactly outside the image, which never holds 0 here; reflect: image pixels there
    border = raw["zeros"] == 0
    assert bool(border.any()) and not bool((raw["reflect"] == 0).any())
    assert torch.equal(raw["reflect"][~border], raw["zeros"][~border])
    assert bool((raw["reflect"][border] != 0).all())
    # the central 24x24 never reaches the border
    assert not bool(border[:, :, 4:28, 4:28].any())
    # padding happens before normalisation: a zero-padded pixel becomes -mean/std
    norm = CropFlip(C10_MEAN, C10_STD, pad=4, pad_mode="zeros")(x, torch.Generator().manual_seed(9))
    black = (-torch.tensor(C10_MEAN) / torch.tensor(C10_STD)).view(1, 3, 1, 1).expand_as(norm)
    torch.testing.assert_close(norm[border], black[border], rtol=0, atol=1e-6)
    torch.testing.assert_close(norm[~border], Normalize(C10_MEAN, C10_STD)(raw["zeros"])[~border], rtol=0, atol=1e-6)


def _aug_loader(x, seed=5, shuffle=True, device=CPU):
    y = torch.arange(x.shape[0], device=device)
    return DeviceLoader(x.to(device), y, 10, shuffle=shuffle, seed=seed, transform=CropFlip(C10_MEAN, C10_STD))


def test_augmentation_is_a_function_of_seed_epoch_batch():
    x = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    a, b = _aug_loader(x), _aug_loader(x)
    torch.manual_seed(0)
    xa, ya = collect(a, epoch=3)
    torch.manual_seed(1)  # the global RNG plays no part
    xb, yb = collect(b, epoch=3)  # a fresh loader (a resumed run) sees the same batches
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(collect(a, epoch=3)[0], xa)  # and iterating again too
    # another epoch, another seed: different augmentation of the same images (fixed order to compare)
    fixed = [_aug_loader(x, seed=s, shuffle=False) for s in (5, 5, 6)]
    e0, e1, s6 = collect(fixed[0], 0)[0], collect(fixed[1], 1)[0], collect(fixed[2], 0)[0]
    assert not torch.equal(e0, e1) and not torch.equal(e0, s6)
    assert torch.equal(e0, collect(_aug_loader(x, shuffle=False), 0)[0])
    # seeds differ per batch and per component
    assert len({mix_seed(5, 0, i) for i in range(100)} | {mix_seed(5, 1, 0), mix_seed(6, 0, 0)}) == 102
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3) != mix_seed(3, 2, 1)


def test_train_eval_view_is_not_augmented(tmp_path):
    arrays = write_cifar10(tmp_path)
    data = build_data(cfg(name="cifar10", root=str(tmp_path), augment={"pad_mode": "reflect"}), CPU, seed=0)
    want = normalised(arrays["x_train"], C10_MEAN, C10_STD)
    x_ev, y_ev = collect(data.train_eval, epoch=0)
    order = data.train_eval.order(0)
    torch.testing.assert_close(x_ev, want[order], rtol=0, atol=1e-6)
    x_tr, _ = collect(data.train, epoch=0)
    assert not torch.allclose(x_tr, want[data.train.order(0)])  # the training batches are augmented


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cifar_on_cuda(tmp_path):
    arrays = write_cifar10(tmp_path)
    dev = torch.device("cuda")
    data = build_data(cfg(name="cifar10", root=str(tmp_path)), dev, seed=0)
    assert data.train.x.is_cuda and data.train.x.dtype == torch.uint8
    xb, yb = next(iter(data.train))
    assert xb.is_cuda and yb.is_cuda and xb.dtype == torch.float32
    x_te, _ = collect(data.test)
    torch.testing.assert_close(x_te.cpu(), normalised(arrays["x_test"], C10_MEAN, C10_STD), rtol=0, atol=1e-6)
    x = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(collect(_aug_loader(x, device=dev), 2)[0], collect(_aug_loader(x, device=dev), 2)[0])


# --------------------------------------------------------------------------- ImageNet folders

CLASSES = ["n01440764", "n01443537", "n02102040"]


def write_imagenet(root: Path, n_train: int = 4, n_val: int = 2) -> None:
    """Class k: channel k saturated, the other two random; mixed sizes, JPEG and PNG files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for k, wnid in reversed(list(enumerate(CLASSES))):  # creation order must not matter
            for i in range(n):
                h, w = 24 + 4 * i, 40 - 3 * i
                img = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
                img[..., k] = 255
                path = root / split / wnid / f"{wnid}_{i}.{'png' if i % 2 else 'JPEG'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(path)


def inet_cfg(root, **kw):
    base = {"name": "imagenet", "root": str(root), "batch_size": 5, "test_batch_size": 4, "image_size": 32,
            "num_workers": 0}
    base.update(kw)
    return OmegaConf.create(base)


def test_imagenet_shapes_labels_order_and_workers(tmp_path):
    write_imagenet(tmp_path)
    runs = {nw: build_data(inet_cfg(tmp_path, num_workers=nw), CPU, seed=7) for nw in (0, 2)}
    data = runs[0]
    assert data.name == "imagenet" and data.num_classes == 3 and data.input_shape == (3, 32, 32)
    assert data.val is None and (data.train.num_samples, data.test.num_samples) == (12, 6)
    assert (len(data.train), len(data.test)) == (3, 2)

    # test split = val/, in folder order; labels = sorted class folder index
    x_te, y_te = collect(data.test)
    assert x_te.shape == (6, 3, 32, 32) and x_te.dtype == torch.float32
    assert y_te.tolist() == [0, 0, 1, 1, 2, 2]
    # eval transform: resize shorter side to round(32 / 0.875) = 37, centre crop 32, normalise
    import torchvision.transforms as T
    from PIL import Image

    ref = T.Compose([T.Resize(37), T.CenterCrop(32), T.ToTensor(), T.Normalize(IN_MEAN, IN_STD)])
    first = ref(Image.open(tmp_path / "val" / CLASSES[0] / f"{CLASSES[0]}_0.JPEG").convert("RGB"))
    torch.testing.assert_close(x_te[0], first, rtol=0, atol=1e-5)
    saturated = (1 - torch.tensor(IN_MEAN)) / torch.tensor(IN_STD)  # channel k is 255 in class k
    png = [1, 3, 5]  # lossless files: the saturated channel is exact
    torch.testing.assert_close(x_te[png, y_te[png], 16, 16], saturated[y_te[png]], rtol=0, atol=1e-5)

    # training: every image once per epoch, labels travel with their images, order from (seed, epoch)
    per_epoch = {}
    for nw, d in runs.items():
        for epoch in (1, 2):
            d.train.set_epoch(epoch)
            batches = list(d.train)
            assert [x.shape for x, _ in batches] == [(5, 3, 32, 32)] * 2 + [(2, 3, 32, 32)]
            x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            assert sorted(y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
            assert torch.equal(x.mean((2, 3)).argmax(1), y)  # the saturated channel survives any crop
            per_epoch[nw, epoch] = (x, y)
    # 0 or 2 workers: identical batches (order and augmentation); epochs differ
    for epoch in (1, 2):
        assert torch.equal(per_epoch[0, epoch][0], per_epoch[2, epoch][0])
        assert torch.equal(per_epoch[0, epoch][1], per_epoch[2, epoch][1])
    assert not torch.equal(per_epoch[0, 1][1], per_epoch[0, 2][1])
    # a fresh pipeline (resumed run) reproduces an epoch; another seed does not
    again = build_data(inet_cfg(tmp_path), CPU, seed=7)
    assert torch.equal(collect(again.train, 2)[0], per_epoch[0, 2][0])
    other = build_data(inet_cfg(tmp_path), CPU, seed=8)
    assert not torch.equal(collect(other.train, 2)[0], per_epoch[0, 2][0])
    # train_eval: training images through the eval transform
    x_ev, y_ev = collect(data.train_eval, 0)
    assert x_ev.shape == (12, 3, 32, 32) and torch.equal(x_ev.mean((2, 3)).argmax(1), y_ev)


def test_imagenet_validation_holdout_and_device(tmp_path):
    write_imagenet(tmp_path, n_train=4)
    data = build_data(inet_cfg(tmp_path, val_fraction=0.5, image_size=16), CPU, seed=0)
    assert (data.train.num_samples, data.val.num_samples) == (6, 6) and data.input_shape == (3, 16, 16)
    # the last two files of every class
    assert [data.val.images.path(i).rsplit("/", 1)[1] for i in range(6)] == [
        f"{c}_{i}.{'png' if i % 2 else 'JPEG'}" for c in CLASSES for i in (2, 3)]
    x_va, y_va = collect(data.val)
    assert y_va.tolist() == [0, 0, 1, 1, 2, 2] and x_va.shape == (6, 3, 16, 16)
    assert x_va.device == CPU
    if torch.cuda.is_available():
        gpu = build_data(inet_cfg(tmp_path, image_size=16, num_workers=2), torch.device("cuda"), seed=0)
        xb, yb = next(iter(gpu.train))
        assert xb.is_cuda and yb.is_cuda and yb.dtype == torch.int64


def test_imagenet_layout_errors(tmp_path):
    with pytest.raises(ConfigError) as exc:
        build_data(inet_cfg(tmp_path / "absent"), CPU, seed=0)
    assert one_line(exc).startswith("dataset.root:") and str(tmp_path / "absent") in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        build_data(cfg(name="imagenet", root=""), CPU, seed=0)
    assert names_key(one_line(exc), "dataset.root")

    write_imagenet(tmp_path / "a")
    import shutil

    shutil.rmtree(tmp_path / "a" / "val")
    with pytest.raises(ConfigError) as exc:
        build_data(inet_cfg(tmp_path / "a"), CPU, seed=0)
    assert one_line(exc).startswith("dataset.root:") and str(tmp_path / "a" / "val") in str(exc.value)

    # the raw validation tarball is flat: say how to fix it
    (tmp_path / "a" / "val").mkdir()
    shutil.copy(next((tmp_path / "a" / "train" / CLASSES[0]).iterdir()), tmp_path / "a" / "val" / "x.JPEG")
    with pytest.raises(ConfigError) as exc:
        build_data(inet_cfg(tmp_path / "a"), CPU, seed=0)
    assert "1 loose images" in one_line(exc)

    (tmp_path / "a" / "val" / "n99999999").mkdir()
    shutil.move(tmp_path / "a" / "val" / "x.JPEG", tmp_path / "a" / "val" / "n99999999" / "x.JPEG")
    with pytest.raises(ConfigError) as exc:
        build_data(inet_cfg(tmp_path / "a"), CPU, seed=0)
    assert "n99999999" in one_line(exc)

    (tmp_path / "a" / "train" / "n00000000").mkdir()  # an empty class folder
    with pytest.raises(ConfigError) as exc:
        build_data(inet_cfg(tmp_path / "a"), CPU, seed=0)
    assert "n00000000" in one_line(exc)

    with pytest.raises(ConfigError) as exc:
        build_data(inet_cfg(tmp_path, num_workers=-1), CPU, seed=0)
    assert names_key(one_line(exc), "dataset.num_workers")
    with pytest.raises(ConfigError) as exc:  # the eval centre crop needs val_resize >= image_size
        build_data(inet_cfg(tmp_path, image_size=32, val_resize=24), CPU, seed=0)
    assert names_key(one_line(exc), "dataset.val_resize")


@pytest.mark.parametrize("decoder", ["gpu", "dali"])
def test_imagenet_batch_decoders_give_the_pil_paths_batches(tmp_path, decoder):
    """dataset.decoder=gpu (torchvision's batched decode and augmentation on the training device;
    here the CPU) and dali (an NVIDIA DALI pipeline, its CPU decoder here; skipped where DALI is
    not installed): the same labels in the same order, the same crops and flips (so pixels close
    to the PIL path's, which resizes with PIL), shapes and normalisation; statistics draws too."""
    from PIL import Image, ImageFilter

    if decoder == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is an optional extra (pip install '.[dali]')")

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in CLASSES:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(5):  # gradients and blocks: a crop, a flip or a shift shows in the pixels
                h, w = 40 + 7 * i, 56 - 3 * i
                yy, xx = np.mgrid[0:h, 0:w]
                img = np.stack([255 * xx / w, 255 * yy / h, 255 * (((xx // 8) + (yy // 8)) % 2)], -1)
                img = img * rng.uniform(0.6, 1.0)
                Image.fromarray(img.astype("uint8")).filter(ImageFilter.GaussianBlur(1)).save(
                    tmp_path / split / c / f"{i}.JPEG", quality=95)
    got = {}
    for name in ("pil", decoder):
        conf = cfg(name="imagenet", root=str(tmp_path), batch_size=6, test_batch_size=4, image_size=24,
                   num_workers=0, persistent_workers=False, decoder=name, normalize=None)
        data = build_data(conf, CPU, 3)
        data.train.set_epoch(2)
        got[name] = ([b for b in data.train], [b for b in data.test], list(data.train.draw(1, 7)))
    for (xp, yp), (xg, yg) in zip(*(sum(got[d][:2], []) for d in ("pil", decoder))):
        assert torch.equal(yp, yg) and xp.shape == xg.shape and xg.dtype == torch.float32
        assert (xp - xg).abs().mean() < 0.03, float((xp - xg).abs().mean())  # same crops; two resizers
        assert (xp - xg.flip(-1)).abs().mean() > 0.1  # where a flip (or another crop) would show
    (xs, ys), (xg, yg) = got["pil"][2][0], got[decoder][2][0]
    assert torch.equal(ys, yg) and (xs - xg).abs().mean() < 0.03
    assert float(xs.std()) > 0.2
