"""TinyImageNetDataModule: Tiny ImageNet (64x64, 200 classes) from the official zip, with checked files and folders."""

from __future__ import annotations

import os
import shutil
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.utils import calculate_md5, download_url

from lightning_prune.data.image_datamodule import ImageDataModule

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINYIMAGENET_ARCHIVE = "tiny-imagenet-200.zip"
TINYIMAGENET_FOLDER = "tiny-imagenet-200"
TINYIMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINYIMAGENET_STD = (0.2302, 0.2265, 0.2262)
VAL_SORTED_MARKER = ".sorted_by_class"  # in val/, written once every validation image is in its class folder


class TinyImageNetDataModule(ImageDataModule):
    """Tiny ImageNet: 100,000 training and 10,000 labelled validation images of 64x64 pixels in 200 classes.

    ``prepare_data`` (which sets no state) downloads the official archive when it is missing and ``download=True``
    (checking its md5 when ``verify_checksums``), extracts it (into a temporary folder renamed into place, so an
    interrupted extraction leaves nothing half-done), and sorts the validation images into per-class folders
    ``val/<wnid>/images/`` from ``val/val_annotations.txt`` (see :func:`sort_val_images`). Data already in place is
    neither downloaded nor extracted again.

    ``setup`` checks the tree (200 wnids, a training folder with images for each, the same number of images in every
    class, every annotated validation image in place) and builds, with the classes indexed in sorted-wnid order:

    * train: the training images minus ``val_size`` held out with ``seed``, with the standard augmentation (random
      64x64 crop of the image padded by ``crop_padding``, horizontal flip) when ``augment``;
    * val: the held-out images, without augmentation; with ``val_size=0`` the test set validates;
    * test (and predict): the official validation split (the official test split has no labels).

    Expected layout (the official zip unpacked in ``data_dir``)::

        <data_dir>/tiny-imagenet-200/
            wnids.txt  words.txt
            train/<wnid>/images/*.JPEG  train/<wnid>/<wnid>_boxes.txt
            val/images/*.JPEG  val/val_annotations.txt     (prepare_data moves the images to val/<wnid>/images/)
            test/images/*.JPEG                             (unlabelled, not used)

    Args:
        data_dir: folder that holds (or will hold) ``tiny-imagenet-200/`` and possibly ``tiny-imagenet-200.zip``.
        batch_size: batch size of every loader.
        num_workers: worker processes of every loader (0 loads in the main process).
        val_size: number of training images held out for validation (0: validate on the test set).
        seed: seed of the train / validation split and of the shuffling (each epoch's order depends only on the
            seed and the epoch, so a resumed run sees the same batches).
        augment: random crop with padding and horizontal flip on the training images.
        crop_padding: padding (pixels) of the random crop.
        mean: per-channel mean subtracted from the [0, 1] images.
        std: per-channel standard deviation the images are divided by.
        pin_memory: pin host memory in the loaders; ``None``: only when the trainer runs on a CUDA GPU (without a
            trainer: when CUDA is available).
        persistent_workers: keep the worker processes between epochs (only used when ``num_workers > 0``).
        download: download the archive in ``prepare_data`` when the data is missing.
        verify_checksums: check the archive's md5 against the official release before extracting it.

    Example:
        >>> dm = TinyImageNetDataModule(data_dir="data", batch_size=128, val_size=10000)
        >>> dm.num_classes, dm.image_shape
        (200, (3, 64, 64))
    """

    num_classes = 200
    image_shape = (3, 64, 64)

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        val_size: int = 10000,
        seed: int = 0,
        augment: bool = True,
        crop_padding: int = 4,
        mean: Sequence[float] = TINYIMAGENET_MEAN,
        std: Sequence[float] = TINYIMAGENET_STD,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        download: bool = True,
        verify_checksums: bool = True,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            val_size=val_size,
            seed=seed,
            augment=augment,
            crop_padding=crop_padding,
            mean=mean,
            std=std,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            download=download,
            verify_checksums=verify_checksums,
        )

    @property
    def root(self) -> str:
        """The dataset folder, ``<data_dir>/tiny-imagenet-200``."""
        return os.path.join(self.data_dir, TINYIMAGENET_FOLDER)

    @property
    def archive(self) -> str:
        """Where the archive is looked for and downloaded to, ``<data_dir>/tiny-imagenet-200.zip``."""
        return os.path.join(self.data_dir, TINYIMAGENET_ARCHIVE)

    # ------------------------------------------------------------------ data on disk
    def prepare_data(self) -> None:
        """Download (if needed and allowed), extract and sort the validation images by class; sets no state."""
        if not os.path.isdir(self.root):
            if not os.path.isfile(self.archive):
                if not self.download:
                    return  # setup() says where it looked and how to get the data
                self._download()
            elif self.verify_checksums:
                self._check_archive_md5(self.archive)
            self._extract()
        if os.path.isdir(self.root):
            sort_val_images(self.root)

    def _download(self) -> None:
        part = TINYIMAGENET_ARCHIVE + ".part"  # renamed once complete: a present archive is a whole download
        part_path = os.path.join(self.data_dir, part)
        if os.path.exists(part_path):
            os.remove(part_path)  # left over by an interrupted download (download_url would take it as done)
        try:
            download_url(TINYIMAGENET_URL, self.data_dir, filename=part)
        except Exception as err:
            raise RuntimeError(
                f"Could not download Tiny ImageNet from {TINYIMAGENET_URL} to {part_path} ({err}). Check the "
                f"connection and re-run, or download it yourself and put it at {self.archive} (see the README)."
            ) from err
        if self.verify_checksums:
            actual = calculate_md5(part_path)
            if actual != TINYIMAGENET_MD5:
                os.remove(part_path)
                raise RuntimeError(
                    f"The Tiny ImageNet archive downloaded from {TINYIMAGENET_URL} has md5 {actual}, but the official "
                    f"{TINYIMAGENET_ARCHIVE} has {TINYIMAGENET_MD5}: the download is truncated or corrupt and was "
                    "deleted. Re-run to download it again."
                )
        os.replace(part_path, self.archive)

    def _check_archive_md5(self, path: str) -> None:
        actual = calculate_md5(path)
        if actual != TINYIMAGENET_MD5:
            raise RuntimeError(
                f"Tiny ImageNet archive {path} has md5 {actual}, but the official {TINYIMAGENET_ARCHIVE} has "
                f"{TINYIMAGENET_MD5}: it is truncated or corrupt. Delete it and re-run (download=True fetches it "
                f"again from {TINYIMAGENET_URL}); pass verify_checksums=False only for an archive you made yourself."
            )

    def _extract(self) -> None:
        staging = os.path.join(self.data_dir, f".{TINYIMAGENET_FOLDER}.extracting")
        shutil.rmtree(staging, ignore_errors=True)  # left over by an interrupted extraction
        try:
            with zipfile.ZipFile(self.archive) as zf:
                if not any(name.startswith(TINYIMAGENET_FOLDER + "/") for name in zf.namelist()):
                    raise zipfile.BadZipFile(f"it holds no {TINYIMAGENET_FOLDER}/ folder")
                zf.extractall(staging)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(
                f"Tiny ImageNet archive {self.archive} is truncated or corrupt and cannot be extracted "
                f"({type(err).__name__}: {err}). Delete it and re-run (download=True fetches it again from "
                f"{TINYIMAGENET_URL}, md5 {TINYIMAGENET_MD5})."
            ) from err
        os.replace(os.path.join(staging, TINYIMAGENET_FOLDER), self.root)
        shutil.rmtree(staging, ignore_errors=True)

    def _check_tree(self) -> list[str]:
        """Check the extracted tree and return the sorted wnids."""
        wnids_path = os.path.join(self.root, "wnids.txt")
        if not os.path.isfile(wnids_path):
            if os.path.isfile(self.archive):
                how = f"the archive {self.archive} is there but not extracted: call prepare_data() (the Trainer does)"
            elif self.download:
                how = "call prepare_data() before setup() (the Trainer does) to download it"
            else:
                how = "set download=True to download it"
            raise FileNotFoundError(
                f"Tiny ImageNet not found: looked for {wnids_path}. To get the data, {how}; or download "
                f"{TINYIMAGENET_URL} (md5 {TINYIMAGENET_MD5}) and either put the zip at {self.archive} or unzip it "
                f"into {self.data_dir} so that {self.root}/wnids.txt, train/ and val/ exist."
            )
        redo = f"The data is partial or corrupt: delete {self.root} and re-run prepare_data()."
        with open(wnids_path) as f:
            wnids = [line.strip() for line in f if line.strip()]
        if len(wnids) != self.num_classes or len(set(wnids)) != len(wnids):
            raise RuntimeError(
                f"{wnids_path} lists {len(wnids)} wnids ({len(set(wnids))} distinct); Tiny ImageNet has "
                f"{self.num_classes}. {redo}"
            )
        wnids = sorted(wnids)
        train = os.path.join(self.root, "train")
        missing = [w for w in wnids if not os.path.isdir(os.path.join(train, w))]
        if missing:
            raise RuntimeError(
                f"{len(missing)} of the {len(wnids)} classes in wnids.txt have no training folder in {train} "
                f"(e.g. {', '.join(missing[:5])}). {redo}"
            )
        val = os.path.join(self.root, "val")
        if not os.path.isfile(os.path.join(val, VAL_SORTED_MARKER)):
            raise RuntimeError(
                f"The validation images in {val} are not sorted into class folders yet: call prepare_data() before "
                "setup() (the Trainer does)."
            )
        return wnids

    # ------------------------------------------------------------------ datasets
    def read_splits(self) -> tuple[Dataset, Dataset, list[str]]:
        """Check the tree and return the training and test (official validation) images, and the sorted wnids."""
        wnids = self._check_tree()
        train = _class_folder(os.path.join(self.root, "train"), wnids, "training")
        test = _class_folder(os.path.join(self.root, "val"), wnids, "validation (test)")
        n_annotated = len(read_val_annotations(self.root))
        if len(test) != n_annotated:
            raise RuntimeError(
                f"{os.path.join(self.root, 'val')} holds {len(test)} images in class folders but val_annotations.txt "
                f"lists {n_annotated}. The data is partial or corrupt: delete {self.root} and re-run prepare_data()."
            )
        return train, test, wnids


# ---------------------------------------------------------------------- validation images
def read_val_annotations(root: str) -> list[tuple[str, str]]:
    """``(file name, wnid)`` of every line of ``<root>/val/val_annotations.txt`` (tab-separated, boxes ignored)."""
    path = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(path):
        raise RuntimeError(f"{path} is missing: the data is partial. Delete {root} and re-run prepare_data().")
    pairs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2 or not fields[0] or not fields[1]:
                raise RuntimeError(f"{path}, line {number}: expected '<file>\\t<wnid>\\t<box>', got {line!r}.")
            pairs.append((fields[0], fields[1]))
    return pairs


def sort_val_images(root: str) -> None:
    """Move ``<root>/val/images/<file>`` to ``<root>/val/<wnid>/images/<file>`` as ``val_annotations.txt`` says.

    Idempotent and safe to interrupt: every move is an atomic rename, images already moved are skipped, and the marker
    ``val/.sorted_by_class`` is written only once every listed image is in place (then ``val/images/`` is removed).
    An image listed but found nowhere, an unlisted image, or an unknown wnid raises an error and writes no marker.

    Example:
        >>> sort_val_images("data/tiny-imagenet-200")  # doctest: +SKIP
    """
    val = os.path.join(root, "val")
    marker = os.path.join(val, VAL_SORTED_MARKER)
    if os.path.isfile(marker):
        return
    pairs = read_val_annotations(root)
    if not os.path.isfile(os.path.join(root, "wnids.txt")):
        raise RuntimeError(f"{root}/wnids.txt is missing: the data is partial. Delete {root} and re-run prepare_data().")
    with open(os.path.join(root, "wnids.txt")) as f:
        wnids = {line.strip() for line in f if line.strip()}
    unknown = sorted({wnid for _, wnid in pairs} - wnids)
    if unknown:
        raise RuntimeError(f"val_annotations.txt in {val} names wnids absent from wnids.txt: {unknown[:5]}.")
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise RuntimeError(f"val_annotations.txt in {val} lists some images twice: the file is corrupt.")
    images = os.path.join(val, "images")
    missing = []
    for name, wnid in pairs:
        src, dst = os.path.join(images, name), os.path.join(val, wnid, "images", name)
        if os.path.isfile(dst):
            if os.path.isfile(src):  # the original folder was copied in again: the sorted copy stands
                os.remove(src)
        elif os.path.isfile(src):
            _move(src, dst)
        else:
            missing.append(name)
    if missing:
        raise RuntimeError(
            f"{len(missing)} validation images listed in val_annotations.txt are neither in {images} nor in their "
            f"class folder (e.g. {', '.join(missing[:5])}). The data is partial: delete {root} and re-run "
            "prepare_data()."
        )
    if os.path.isdir(images):
        extra = sorted(os.listdir(images))
        if extra:
            raise RuntimeError(
                f"{images} holds {len(extra)} files not listed in val_annotations.txt (e.g. {', '.join(extra[:5])}): "
                f"the annotations or the images are corrupt. Delete {root} and re-run prepare_data()."
            )
        os.rmdir(images)
    with open(marker + ".tmp", "w") as f:
        f.write(f"{len(pairs)}\n")
    os.replace(marker + ".tmp", marker)


def _move(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.replace(src, dst)


# ---------------------------------------------------------------------- reading
class _FixedClassesImageFolder(ImageFolder):
    """ImageFolder with a given class list (so train and test index the classes alike)."""

    def __init__(self, root: str, classes: Sequence[str]) -> None:
        self._fixed_classes = list(classes)
        super().__init__(root)

    def find_classes(self, directory: Any) -> tuple[list[str], dict[str, int]]:
        return self._fixed_classes, {wnid: i for i, wnid in enumerate(self._fixed_classes)}


def _class_folder(folder: str, wnids: list[str], split: str) -> ImageFolder:
    """An ImageFolder over ``folder/<wnid>/...`` that fails unless every class has the same, non-zero image count."""
    redo = f"The data is partial or corrupt: delete {os.path.dirname(folder)} and re-run prepare_data()."
    try:
        dataset = _FixedClassesImageFolder(folder, wnids)
    except FileNotFoundError as err:  # a class folder without images
        raise RuntimeError(f"Tiny ImageNet {split} images in {folder}: {err} {redo}") from err
    counts = np.bincount(np.asarray(dataset.targets, dtype=np.int64), minlength=len(wnids))
    empty = [wnids[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise RuntimeError(f"Tiny ImageNet {split} classes without images in {folder}: {empty[:5]}. {redo}")
    if counts.min() != counts.max():
        short = [f"{wnids[i]} ({counts[i]})" for i in np.flatnonzero(counts < counts.max())]
        raise RuntimeError(
            f"Tiny ImageNet {split} classes in {folder} should each hold {counts.max()} images (500 train / 50 val "
            f"in the official data), but {len(short)} hold fewer: {', '.join(short[:5])}. {redo}"
        )
    return dataset

