"""Tiny fake datasets in the real on-disk formats of CIFAR10 and Tiny ImageNet, for offline tests.

Plain functions (not pytest fixtures) so that any test module can import them: ``from dataset_fixtures import ...``.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from torch import nn

CIFAR10_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]

# 200 made-up wnids, written to wnids.txt in a shuffled order (the module must sort them)
TINY_WNIDS = [f"n{1000000 + 7919 * i:08d}" for i in range(200)]


# ---------------------------------------------------------------------- CIFAR10
def write_cifar10(data_dir: str | os.PathLike, rows_per_batch: int = 20, seed: int = 0) -> Path:
    """Write ``<data_dir>/cifar-10-batches-py/`` with 5 training batches, a test batch and ``batches.meta``.

    Each batch is a pickled dict with the real keys (``b"batch_label"``, ``b"labels"``, ``b"data"`` as uint8
    ``(rows, 3072)``, ``b"filenames"``); every class appears ``rows_per_batch / 10`` times in each batch.
    Returns the batches folder.
    """
    if rows_per_batch % 10:
        raise ValueError("rows_per_batch must be a multiple of 10 so that every class appears equally often.")
    folder = Path(data_dir) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, name in enumerate([*CIFAR10_TRAIN_FILES, "test_batch"]):
        labels = rng.permutation(np.arange(rows_per_batch) % 10).tolist()
        batch_label = b"testing batch 1 of 1" if name == "test_batch" else f"training batch {i + 1} of 5".encode()
        write_cifar10_batch(
            folder / name,
            data=rng.integers(0, 256, size=(rows_per_batch, 3072), dtype=np.uint8),
            labels=labels,
            batch_label=batch_label,
        )
    meta = {b"num_cases_per_batch": rows_per_batch, b"label_names": [n.encode() for n in CIFAR10_LABEL_NAMES],
            b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def write_cifar10_batch(path: str | os.PathLike, data: np.ndarray, labels: list[int], batch_label: bytes) -> None:
    """Pickle one CIFAR10 batch with the real keys."""
    entry = {
        b"batch_label": batch_label,
        b"labels": list(labels),
        b"data": data,
        b"filenames": [f"fake_{i:05d}.png".encode() for i in range(len(labels))],
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def read_cifar10_batch(path: str | os.PathLike) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def tar_cifar10(folder: str | os.PathLike, archive: str | os.PathLike) -> Path:
    """Pack ``folder`` (a ``cifar-10-batches-py/``) into the gzipped tar ``archive``, as the official release is."""
    folder, archive = Path(folder), Path(archive)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive


# ---------------------------------------------------------------------- the budget, computed apart from the library
def expected_kept(model: nn.Module, sparsity: float) -> tuple[int, int]:
    """``(kept, total)`` that pruning ``model`` to ``sparsity`` must give: ``round((1 - sparsity) * N)`` of the ``N``
    weights of its Conv and Linear layers (the default prunable layers), counted before it is reparametrized."""
    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, layers))
    try:
        from lightning_prune import budget_count
    except ImportError:  # the formula it implements
        return int(round((1.0 - sparsity) * total)), total
    return budget_count(total, sparsity), total


def count_nonzero_weights(model: nn.Module) -> int:
    """Non-zero weights of the Conv and Linear layers of a plain (not reparametrized) ``model``."""
    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return sum(int((m.weight != 0).sum()) for m in model.modules() if isinstance(m, layers))


# ---------------------------------------------------------------------- Tiny ImageNet
def write_tinyimagenet(
    data_dir: str | os.PathLike, train_per_class: int = 2, val_per_class: int = 1, test_images: int = 3, seed: int = 0
) -> Path:
    """Write ``<data_dir>/tiny-imagenet-200/`` as the official zip unpacks (val images not yet sorted by class).

    ``wnids.txt`` (200 wnids, shuffled), ``words.txt``, ``train/<wnid>/images/<wnid>_<k>.JPEG`` with
    ``train/<wnid>/<wnid>_boxes.txt``, ``val/images/val_<j>.JPEG`` with ``val/val_annotations.txt``, and
    ``test/images/test_<j>.JPEG``. Images are 64x64 JPEGs; one training image per class is greyscale, as some real
    ones are. Returns the dataset folder.
    """
    root = Path(data_dir) / "tiny-imagenet-200"
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    wnids = [TINY_WNIDS[i] for i in rng.permutation(len(TINY_WNIDS))]
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (root / "words.txt").write_text("".join(f"{w}\tthing number {i}\n" for i, w in enumerate(TINY_WNIDS)))
    for w in wnids:
        images = root / "train" / w / "images"
        images.mkdir(parents=True)
        boxes = []
        for k in range(train_per_class):
            name = f"{w}_{k}.JPEG"
            _jpeg(images / name, rng, grey=k == 0)
            boxes.append(f"{name}\t0\t0\t63\t63\n")
        (root / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    val_wnids = [w for w in wnids for _ in range(val_per_class)]
    for j, i in enumerate(rng.permutation(len(val_wnids))):
        name = f"val_{j}.JPEG"
        _jpeg(root / "val" / "images" / name, rng)
        lines.append(f"{name}\t{val_wnids[i]}\t1\t2\t60\t61\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    (root / "test" / "images").mkdir(parents=True)
    for j in range(test_images):
        _jpeg(root / "test" / "images" / f"test_{j}.JPEG", rng)
    return root


def val_annotations(root: str | os.PathLike) -> dict[str, str]:
    """``{file name: wnid}`` of ``val/val_annotations.txt``."""
    lines = (Path(root) / "val" / "val_annotations.txt").read_text().splitlines()
    return dict(line.split("\t")[:2] for line in lines if line)


def zip_tree(root: str | os.PathLike, archive: str | os.PathLike) -> Path:
    """Zip the folder ``root`` into ``archive`` with ``root``'s name as the top-level folder, like the official zip."""
    root, archive = Path(root), Path(archive)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(root.rglob("*")):
            zf.write(path, path.relative_to(root.parent).as_posix())
    return archive


def copy_tree(src: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """Copy the folder ``src`` into ``data_dir`` (under the same name); returns the copy."""
    dst = Path(data_dir) / Path(src).name
    shutil.copytree(src, dst)
    return dst


def relative_files(root: str | os.PathLike) -> set[str]:
    """Every file under ``root``, as paths relative to it."""
    root = Path(root)
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _jpeg(path: Path, rng: np.random.Generator, grey: bool = False) -> None:
    pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    (image.convert("L") if grey else image).save(path, format="JPEG", quality=50)
