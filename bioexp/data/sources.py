"""Finding, reading and downloading the image datasets bioexp knows.

Look-up order for a dataset's files: `data.root`, then `$BIOEXP_DATA`, then the operating
system's dataset packages (Debian's `dataset-fashion-mnist` puts Fashion-MNIST under
/usr/share/datasets/fashion-mnist), then bioexp's download cache. Only when all of those miss, and
`data.download` is true, does torchvision download the files. The readers are plain numpy: the idx
format is described at http://yann.lecun.com/exdb/mnist/ and CIFAR-10's pickled batches at
https://www.cs.toronto.edu/~kriz/cifar.html.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bioexp.cache import user_cache_dir
from bioexp.errors import DataError

log = logging.getLogger(__name__)

OS_DATASET_ROOT = Path("/usr/share/datasets")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


@dataclass(frozen=True)
class ImageSource:
    """A dataset of images on disk: its name, file format and where it may be found."""

    name: str
    torchvision_class: str
    file_format: str  # "idx" or "cifar"
    folder_names: tuple[str, ...]  # folder names searched inside every root
    image_shape: tuple[int, int, int]  # (C, H, W) of every image
    n_train: int  # training images in the published split
    os_package: str | None = None
    class_names: tuple[str, ...] = ()

    def candidate_dirs(self, root: Path) -> list[Path]:
        """Folders under `root` that may hold this dataset's files, most specific first."""
        if self.file_format == "cifar":
            return [root / CIFAR_FOLDER, root]
        dirs = [root / self.torchvision_class / "raw", *(root / n for n in self.folder_names), root]
        return dirs

    def files_in(self, folder: Path) -> dict[str, Path] | None:
        """The dataset's files inside `folder`, or None when any is missing."""
        if self.file_format == "cifar":
            names = (*CIFAR_TRAIN, "test_batch")
            found = {n: folder / n for n in names}
            return found if all(p.is_file() for p in found.values()) else None
        found = {}
        for key, stem in IDX_FILES.items():
            path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
            if path is None:
                return None
            found[key] = path
        return found


SOURCES = {
    "mnist": ImageSource("mnist", "MNIST", "idx", ("mnist", "MNIST"), (1, 28, 28), 60_000,
                         class_names=tuple(str(digit) for digit in range(10))),
    "fashion_mnist": ImageSource(
        "fashion_mnist", "FashionMNIST", "idx", ("fashion-mnist", "fashion_mnist", "FashionMNIST"),
        (1, 28, 28), 60_000, os_package="dataset-fashion-mnist",
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                     "Sneaker", "Bag", "Ankle boot"),
    ),
    "cifar10": ImageSource(
        "cifar10", "CIFAR10", "cifar", ("cifar10", "cifar-10"), (3, 32, 32), 50_000,
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                     "ship", "truck"),
    ),
}


def cache_root() -> Path:
    """Where downloads go when neither data.root nor $BIOEXP_DATA is set."""
    return user_cache_dir() / "data"


def search_roots(root: str | None) -> list[tuple[str, Path]]:
    """(label, folder) pairs in look-up order; the label says where the folder came from."""
    roots = []
    if root:
        roots.append(("data.root", Path(root).expanduser()))
    if os.environ.get("BIOEXP_DATA"):
        roots.append(("$BIOEXP_DATA", Path(os.environ["BIOEXP_DATA"]).expanduser()))
    roots.append(("OS dataset packages", OS_DATASET_ROOT))
    roots.append(("download cache", cache_root()))
    return roots


def locate(source: ImageSource, root: str | None) -> dict[str, Path] | None:
    """The dataset's files from the first root that holds all of them, or None."""
    for _, base in search_roots(root):
        for folder in source.candidate_dirs(base):
            files = source.files_in(folder)
            if files:
                return files
    return None


def download_urls(source: ImageSource) -> list[str]:
    """The URLs torchvision downloads the dataset's first file from, one per mirror."""
    import torchvision.datasets as tvd

    dataset_class = getattr(tvd, source.torchvision_class)
    mirrors = getattr(dataset_class, "mirrors", None)
    if mirrors:
        first = dataset_class.resources[0]
        return [f"{mirror}{first[0] if isinstance(first, tuple) else first}"
                for mirror in mirrors]
    return [dataset_class.url]


def download_problem(source: ImageSource) -> str | None:
    """Why the dataset cannot be downloaded from here, found in a couple of seconds by asking
    each mirror for its first file (no mirror answers: no network, or a firewall); None when
    one answers."""
    from concurrent.futures import ThreadPoolExecutor

    from bioexp.net import http_answer

    urls = download_urls(source)
    with ThreadPoolExecutor(len(urls)) as pool:  # all mirrors at once: one wait, not one each
        answers = list(pool.map(lambda url: http_answer(url, "HEAD"), urls))
    reasons = []
    for url, answer in zip(urls, answers, strict=True):
        if isinstance(answer, tuple) and (answer[0] < 400 or answer[0] == 405):
            return None
        host = urllib.parse.urlsplit(url).hostname
        reasons.append(f"{host}: {answer if isinstance(answer, str) else f'HTTP {answer[0]}'}")
    return f"no download mirror answers ({'; '.join(reasons)})"


def download(source: ImageSource, root: str | None) -> dict[str, Path]:
    """Download with torchvision into data.root, $BIOEXP_DATA or the cache; return the files."""
    import torchvision.datasets as tvd

    dest = Path(root or os.environ.get("BIOEXP_DATA") or cache_root()).expanduser()
    dataset_class = getattr(tvd, source.torchvision_class)
    log.info("downloading %s into %s", source.name, dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            dataset_class(str(dest), train=train, download=True)
    except Exception as exc:  # torchvision raises many kinds (URLError, RuntimeError, OSError)
        raise DataError(_missing_message(source, root, f"the download failed "
                                         f"({_root_cause(exc)})", tried=True)) from None
    files = locate(source, str(dest))
    if files is None:
        raise DataError(f"{source.name} was downloaded into {dest} but its files are not there")
    return files


def _root_cause(exc: BaseException) -> str:
    """The innermost exception of a chain, in one line (e.g. the network error under a wrapper).
    A message of several lines (torchvision's `Error downloading X:` then one `Tried <mirror>,
    got:` and its error per mirror) is joined into one."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = re.sub(r":? Tried (\S+), got: ", r"; tried \1: ", " ".join(lines))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# How a user turns downloads on: the config key (bioexp train), or a flag (bioexp data).
DOWNLOAD_KEY = "data.download=true"


def _missing_message(source: ImageSource, root: str | None, why: str,
                    download: str = DOWNLOAD_KEY, tried: bool = False) -> str:
    """The dataset is not on disk, because `why`: where bioexp looked and how to get it.
    `tried`: downloads were on, so the remedy is a machine with internet, not the switch."""
    roots = [(label, str(base)) for label, base in search_roots(root)]
    if not os.environ.get("BIOEXP_DATA"):
        roots.insert(1 if root else 0, ("$BIOEXP_DATA", "not set"))
    looked = "; ".join(f"{label}: {where}" for label, where in roots)
    how = []
    if source.os_package:
        how.append(f"install the OS package (apt-get install {source.os_package})")
    how.append("put the files in data.root or $BIOEXP_DATA")
    if tried:
        how.append(f"download them where there is internet (bioexp data {source.name} "
                   "--download --root DIR) and copy DIR here as data.root")
    else:
        how.append(f"run with {download} where there is internet")
    return f"dataset {source.name} not found ({looked}) and {why}; to get it: " + ", or ".join(how)


def find_or_download(name: str, root: str | None, allow_download: bool,
                     download_option: str = DOWNLOAD_KEY) -> dict[str, Path]:
    """Resolve a dataset's files by the look-up order above; DataError if that is impossible.
    `download_option` is how the user turns downloads on, named in that error."""
    source = SOURCES[name]
    files = locate(source, root)
    if files is not None:
        return files
    if not allow_download:
        why = ("data.download is false" if download_option == DOWNLOAD_KEY
               else f"{download_option} was not given")
        raise DataError(_missing_message(source, root, why, download_option))
    return download(source, root)


def check_available(name: str, root: str | None, allow_download: bool) -> None:
    """Before a run: DataError unless the dataset is on disk, or may be downloaded and a
    download mirror answers (a couple of seconds at most). Reads and writes nothing."""
    source = SOURCES[name]
    if locate(source, root) is not None:
        return
    if not allow_download:
        raise DataError(_missing_message(source, root, "data.download is false"))
    problem = download_problem(source)
    if problem:
        raise DataError(_missing_message(source, root, f"it cannot be downloaded here: {problem}",
                                         tried=True))


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a uint8 array; DataError when it is damaged."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataError(f"{path} is not an idx file of unsigned bytes (bad header)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header cut short)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(
            f"{path} is truncated or corrupt: its header promises {expected} bytes of data "
            f"for shape {shape}, the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:  # a damaged pickle can raise almost anything
        raise DataError(f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__})") from None
    return images, labels


def read_arrays(name: str, files: dict[str, Path]) -> tuple[np.ndarray, ...]:
    """(train_images (N, C, H, W) uint8, train_labels, test_images, test_labels)."""
    if SOURCES[name].file_format == "cifar":
        train = [read_cifar_batch(files[n]) for n in CIFAR_TRAIN]
        test_x, test_y = read_cifar_batch(files["test_batch"])
        train_x = np.concatenate([x for x, _ in train])
        train_y = np.concatenate([y for _, y in train])
        return train_x, train_y, test_x, test_y
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{files[f'{split}_images']} and {files[f'{split}_labels']} do not match: "
                f"{images.shape} images, {labels.shape} labels"
            )
    return (
        arrays["train_images"][:, None],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"][:, None],
        arrays["test_labels"].astype(np.int64),
    )
