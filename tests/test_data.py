"""The data layer: look-up order, downloads, idx reading, subsets, splits, scaling, batching.

Every test that touches the look-up order runs in a clean data environment (`clean_data_env`):
the OS dataset folder and the download cache point into tmp_path and $BIOEXP_DATA is unset, so
the real /usr/share/datasets and ~/.cache are never read. The datasets are tiny idx files written
by `write_idx_dataset`; image i of a split has every pixel equal to i, so a loaded image tells
which file image it came from.
"""

from __future__ import annotations

import gzip
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from conftest import needs_fashion
from omegaconf import DictConfig, OmegaConf

from bioexp.data import Split, load_dataset, scale_pixels
from bioexp.data import sources as data_sources
from bioexp.data.sources import IDX_FILES, find_or_download, read_idx
from bioexp.data.synthetic import make_synthetic
from bioexp.errors import DataError

N_TRAIN = 30
N_TEST = 12
SIDE = 4


# --- helpers -------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx encoding of a uint8 array: magic 0, 0, 0x08, ndim; big-endian int32 dims; data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write `array` as an idx file; gzipped when `path` ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def identity_images(n: int, offset: int = 0) -> np.ndarray:
    """(n, SIDE, SIDE) images; every pixel of image i is offset + i."""
    values = (np.arange(n) + offset).astype(np.uint8)
    return np.repeat(values, SIDE * SIDE).reshape(n, SIDE, SIDE)


def write_idx_dataset(folder: Path, *, gz: bool = True, n_train: int = N_TRAIN,
                      n_test: int = N_TEST) -> dict[str, Path]:
    """The four idx files of an MNIST-like set in `folder`. Test pixels start at 100."""
    arrays = {
        "train_images": identity_images(n_train),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": identity_images(n_test, offset=100),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    suffix = ".gz" if gz else ""
    return {key: write_idx(folder / f"{IDX_FILES[key]}{suffix}", arrays[key])
            for key in IDX_FILES}


def data_cfg(name: str = "fashion_mnist", **overrides) -> DictConfig:
    """A data config with the shared data keys (train.yaml's `data:` defaults) plus `name`."""
    cfg = {"name": name, "root": None, "download": False, "train_limit": None,
           "test_limit": None, "val_size": 0, "labels_per_class": None, "seed": 0}
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def synthetic_cfg(**overrides) -> DictConfig:
    cfg = {"n_train": 40, "n_test": 20, "num_classes": 4, "channels": 1, "image_size": 8,
           "noise": 0.3}
    cfg.update(overrides)
    return data_cfg("synthetic", **cfg)


def pixel_ids(split: Split) -> list[int]:
    """Which file image each loaded image is (its first pixel, back in bytes)."""
    return [round(v) for v in (split.x[:, 0, 0, 0] * 255).tolist()]


@pytest.fixture
def clean_data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """OS dataset folder and download cache inside tmp_path, $BIOEXP_DATA unset."""
    os_root = tmp_path / "os-datasets"
    xdg = tmp_path / "xdg-cache"
    monkeypatch.setattr(data_sources, "OS_DATASET_ROOT", os_root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.delenv("BIOEXP_DATA", raising=False)
    return {"os": os_root, "cache": xdg / "bioexp" / "data", "tmp": tmp_path}


def folder_of(files: dict[str, Path]) -> Path:
    folders = {p.parent for p in files.values()}
    assert len(folders) == 1, folders
    return folders.pop()


# --- look-up order -------------------------------------------------------------------------


@pytest.mark.parametrize("winner", ["data.root", "$BIOEXP_DATA", "os", "cache"])
def test_lookup_order(clean_data_env, monkeypatch, winner):
    """data.root, then $BIOEXP_DATA, then the OS dataset folder, then the download cache."""
    tmp = clean_data_env["tmp"]
    folders = {
        "data.root": tmp / "user-root",
        "$BIOEXP_DATA": tmp / "env-root",
        "os": clean_data_env["os"] / "fashion-mnist",
        "cache": clean_data_env["cache"] / "FashionMNIST" / "raw",
    }
    order = list(folders)
    # Only the winner and the places after it hold the dataset.
    for place in order[order.index(winner):]:
        write_idx_dataset(folders[place])
    root = str(folders["data.root"]) if winner == "data.root" else None
    # $BIOEXP_DATA is set (and holds the data) only when it is at or after the winner.
    if order.index(winner) <= order.index("$BIOEXP_DATA"):
        monkeypatch.setenv("BIOEXP_DATA", str(folders["$BIOEXP_DATA"]))
    files = find_or_download("fashion_mnist", root, allow_download=False)
    assert folder_of(files) == folders[winner]
    assert set(files) == set(IDX_FILES)


def test_root_beats_everything_even_when_all_hold_the_data(clean_data_env, monkeypatch):
    tmp = clean_data_env["tmp"]
    for folder in (tmp / "user-root", tmp / "env-root", clean_data_env["os"] / "fashion-mnist",
                   clean_data_env["cache"]):
        write_idx_dataset(folder)
    monkeypatch.setenv("BIOEXP_DATA", str(tmp / "env-root"))
    assert folder_of(find_or_download("fashion_mnist", str(tmp / "user-root"), False)) == \
        tmp / "user-root"
    assert folder_of(find_or_download("fashion_mnist", None, False)) == tmp / "env-root"
    monkeypatch.delenv("BIOEXP_DATA")
    assert folder_of(find_or_download("fashion_mnist", None, False)) == \
        clean_data_env["os"] / "fashion-mnist"


def test_incomplete_folder_is_skipped(clean_data_env):
    """A root holding only some of the four files does not stop the search."""
    tmp = clean_data_env["tmp"]
    partial = write_idx_dataset(tmp / "user-root")
    partial["test_labels"].unlink()
    write_idx_dataset(clean_data_env["os"] / "fashion-mnist")
    files = find_or_download("fashion_mnist", str(tmp / "user-root"), False)
    assert folder_of(files) == clean_data_env["os"] / "fashion-mnist"


@pytest.mark.parametrize(("name", "tv_folder"), [("fashion_mnist", "FashionMNIST"),
                                                 ("mnist", "MNIST")])
@pytest.mark.parametrize("gz", [True, False])
def test_torchvision_layout_is_found(clean_data_env, name, tv_folder, gz):
    root = clean_data_env["tmp"] / "tv"
    write_idx_dataset(root / tv_folder / "raw", gz=gz)
    files = find_or_download(name, str(root), False)
    assert folder_of(files) == root / tv_folder / "raw"
    assert all(p.name.endswith(".gz") == gz for p in files.values())
    ds = load_dataset(data_cfg(name, root=str(root)), "unit")
    assert len(ds.train) == N_TRAIN and len(ds.test) == N_TEST
    assert ds.origin == str(root / tv_folder / "raw")


def test_missing_dataset_without_download_names_folders_and_remedy(clean_data_env):
    root = clean_data_env["tmp"] / "empty-root"
    root.mkdir()
    with pytest.raises(DataError) as excinfo:
        load_dataset(data_cfg(root=str(root)), "unit")
    message = str(excinfo.value)
    assert "fashion_mnist" in message
    for folder in (root, clean_data_env["os"], clean_data_env["cache"]):
        assert str(folder) in message
    assert "$BIOEXP_DATA" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data.download" in message


def test_missing_dataset_message_names_bioexp_data_folder(clean_data_env, monkeypatch):
    env_root = clean_data_env["tmp"] / "env-root"
    monkeypatch.setenv("BIOEXP_DATA", str(env_root))
    with pytest.raises(DataError, match="mnist") as excinfo:
        find_or_download("mnist", None, allow_download=False)
    message = str(excinfo.value)
    assert str(env_root) in message
    assert "data.download=true" in message
    assert "apt-get" not in message  # no OS package ships MNIST


# --- downloads -----------------------------------------------------------------------------


def _failing_dataset(exc: Exception) -> type:
    class Failing:
        calls = 0

        def __init__(self, root, train=True, download=False, **kwargs):
            type(self).calls += 1
            raise exc

    return Failing


@pytest.mark.parametrize(("name", "tv_class"), [("fashion_mnist", "FashionMNIST"),
                                                ("mnist", "MNIST")])
def test_failed_download_raises_data_error(clean_data_env, monkeypatch, name, tv_class):
    failing = _failing_dataset(urllib.error.URLError("no route to host"))
    monkeypatch.setattr(torchvision.datasets, tv_class, failing)
    with pytest.raises(DataError) as excinfo:
        load_dataset(data_cfg(name, download=True), "unit")
    assert failing.calls == 1
    message = str(excinfo.value)
    assert "download failed" in message
    assert "no route to host" in message
    assert str(clean_data_env["cache"]) in message
    assert not isinstance(excinfo.value, urllib.error.URLError)
    assert excinfo.value.__cause__ is None


def test_failed_download_of_runtime_error_is_data_error(clean_data_env, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST",
                        _failing_dataset(RuntimeError("File not found or corrupted.")))
    with pytest.raises(DataError, match="corrupted"):
        find_or_download("fashion_mnist", None, allow_download=True)


def _fake_download(written: list[Path]) -> type:
    """A torchvision-like dataset class that 'downloads' tiny idx files into root/X/raw."""

    class Fake:
        def __init__(self, root, train=True, download=False, **kwargs):
            assert download is True
            raw = Path(root) / "FashionMNIST" / "raw"
            if not written:
                write_idx_dataset(raw, gz=False)
            written.append(raw)

    return Fake


@pytest.mark.parametrize("where", ["data.root", "$BIOEXP_DATA", "cache"])
def test_download_goes_to_root_then_env_then_cache(clean_data_env, monkeypatch, where):
    tmp = clean_data_env["tmp"]
    written: list[Path] = []
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _fake_download(written))
    root = None
    if where == "data.root":
        root = str(tmp / "user-root")
        monkeypatch.setenv("BIOEXP_DATA", str(tmp / "env-root"))
        expected = tmp / "user-root"
    elif where == "$BIOEXP_DATA":
        monkeypatch.setenv("BIOEXP_DATA", str(tmp / "env-root"))
        expected = tmp / "env-root"
    else:
        expected = clean_data_env["cache"]
    files = find_or_download("fashion_mnist", root, allow_download=True)
    assert folder_of(files) == expected / "FashionMNIST" / "raw"
    assert len(written) == 2  # the train and the test split were each requested


def test_no_download_when_the_data_is_on_disk(clean_data_env, monkeypatch):
    failing = _failing_dataset(AssertionError("download must not be attempted"))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", failing)
    write_idx_dataset(clean_data_env["os"] / "fashion-mnist")
    ds = load_dataset(data_cfg(download=True), "unit")
    assert failing.calls == 0
    assert len(ds.train) == N_TRAIN


def test_a_failed_download_names_its_reason_and_no_switch_already_on(clean_data_env,
                                                                      monkeypatch):
    """torchvision's MNIST error spans lines (`Error downloading X:`, then `Tried <mirror>, got:`
    and the error); the sentence keeps all of it, and does not ask for data.download=true."""
    monkeypatch.setattr(torchvision.datasets, "MNIST", _failing_dataset(RuntimeError(
        "Error downloading train-images-idx3-ubyte.gz:\nTried https://a.example/, got:\n"
        "<urlopen error [Errno -2] Name or service not known>\n")))
    with pytest.raises(DataError) as excinfo:
        load_dataset(data_cfg("mnist", download=True), "unit")
    message = str(excinfo.value)
    assert "\n" not in message
    assert ("the download failed (RuntimeError: Error downloading train-images-idx3-ubyte.gz; "
            "tried https://a.example/: <urlopen error [Errno -2] Name or service not known>)"
            ) in message
    assert "data.download=true" not in message
    assert "download them where there is internet (bioexp data mnist --download" in message


def serve(status: int):
    """A local HTTP server answering every HEAD and GET with `status`; (url, stop)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802  (http.server's name)
            self.send_response(status)
            self.end_headers()

        do_GET = do_HEAD  # noqa: N815

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/mnist/x.gz", server.shutdown


def test_the_preflight_knows_a_download_cannot_work_before_any_folder(clean_data_env,
                                                                      monkeypatch, tmp_path):
    """No mirror answers (here: a refused port and a server without the file): one line, exit 2,
    no run folder, nothing downloaded, within the probe's couple of seconds."""
    from conftest import TINY, train_here

    from bioexp.data import dataset_plan

    missing, stop = serve(404)
    try:
        monkeypatch.setattr(data_sources, "download_urls",
                            lambda source: ["http://127.0.0.1:9/mnist/x.gz", missing])
        with pytest.raises(DataError) as excinfo:
            dataset_plan(data_cfg("mnist", download=True))
        run_dir = tmp_path / "run"
        args = [a for a in TINY if not a.startswith("data")]
        assert train_here(*args, "data=mnist", f"hydra.run.dir={run_dir}") == 2
    finally:
        stop()
    message = str(excinfo.value)
    assert "it cannot be downloaded here: no download mirror answers (127.0.0.1: Connection " \
           "refused; 127.0.0.1: HTTP 404)" in message
    assert "data.download=true" not in message and "bioexp data mnist --download" in message
    assert not run_dir.exists() and not clean_data_env["cache"].exists()


def test_the_preflight_lets_a_download_start_when_a_mirror_answers(clean_data_env,
                                                                   monkeypatch):
    from bioexp.data import dataset_plan

    url, stop = serve(200)
    try:
        monkeypatch.setattr(data_sources, "download_urls", lambda source: [url])
        assert dataset_plan(data_cfg("mnist", download=True)) == ((1, 28, 28), 10)
    finally:
        stop()
    assert not clean_data_env["cache"].exists()  # nothing downloaded yet


def test_the_download_urls_are_torchvision_s(clean_data_env):
    urls = data_sources.download_urls(data_sources.SOURCES["mnist"])
    assert urls == [f"{mirror}train-images-idx3-ubyte.gz"
                    for mirror in torchvision.datasets.MNIST.mirrors]
    assert data_sources.download_urls(data_sources.SOURCES["cifar10"]) == \
        [torchvision.datasets.CIFAR10.url]


# --- reading idx files ---------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), array)
    out = read_idx(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_idx_raises_data_error_naming_the_file(clean_data_env, gz):
    root = clean_data_env["tmp"] / "root"
    files = write_idx_dataset(root, gz=False)
    bad = files["train_images"]
    raw = bad.read_bytes()[:-7]
    if gz:
        bad.unlink()
        bad = bad.with_name(bad.name + ".gz")
        bad.write_bytes(gzip.compress(raw))
    else:
        bad.write_bytes(raw)
    with pytest.raises(DataError) as excinfo:
        load_dataset(data_cfg(root=str(root)), "unit")
    assert str(bad) in str(excinfo.value)
    assert "truncated" in str(excinfo.value)


def test_cut_gzip_stream_raises_data_error_naming_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = gzip.compress(idx_bytes(identity_images(20)))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as excinfo:
        read_idx(path)
    assert str(path) in str(excinfo.value)


def test_header_cut_short_raises_data_error(tmp_path):
    path = tmp_path / "short.idx"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + (5).to_bytes(4, "big"))
    with pytest.raises(DataError, match="truncated") as excinfo:
        read_idx(path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize("header", [bytes([0, 0, 0x09, 1]), bytes([1, 0, 0x08, 1]),
                                    bytes([0, 0, 0x08, 0]), bytes([0, 0])])
def test_bad_header_raises_data_error_naming_the_file(clean_data_env, header):
    root = clean_data_env["tmp"] / "root"
    files = write_idx_dataset(root, gz=True)
    bad = files["test_labels"]
    bad.write_bytes(gzip.compress(header + (N_TEST).to_bytes(4, "big") + bytes(N_TEST)))
    with pytest.raises(DataError, match="bad header") as excinfo:
        load_dataset(data_cfg(root=str(root)), "unit")
    assert str(bad) in str(excinfo.value)


def test_images_and_labels_of_different_length_raise_data_error(clean_data_env):
    root = clean_data_env["tmp"] / "root"
    files = write_idx_dataset(root, gz=False)
    write_idx(files["train_labels"], np.zeros(N_TRAIN - 1, dtype=np.uint8))
    with pytest.raises(DataError) as excinfo:
        load_dataset(data_cfg(root=str(root)), "unit")
    assert str(files["train_labels"]) in str(excinfo.value)


def test_loaded_arrays_keep_images_and_labels_together(clean_data_env):
    root = clean_data_env["tmp"] / "root"
    write_idx_dataset(root)
    ds = load_dataset(data_cfg(root=str(root)), "unit")
    assert ds.input_shape == (1, SIDE, SIDE)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert pixel_ids(ds.train) == list(range(N_TRAIN))
    assert ds.train.y.tolist() == [i % 10 for i in range(N_TRAIN)]
    assert pixel_ids(ds.test) == [100 + i for i in range(N_TEST)]
    assert ds.num_classes == 10 and len(ds.class_names) == 10
    assert ds.val is None


# --- subsets and the validation split ------------------------------------------------------


@pytest.fixture
def idx_root(clean_data_env) -> str:
    root = clean_data_env["tmp"] / "root"
    write_idx_dataset(root)
    return str(root)


def test_limits_take_seeded_subsets(idx_root):
    def ids(seed: int) -> tuple[list[int], list[int]]:
        ds = load_dataset(data_cfg(root=idx_root, train_limit=10, test_limit=5, seed=seed),
                          "unit")
        assert len(ds.train) == 10 and len(ds.test) == 5
        assert ds.train.y.tolist() == [i % 10 for i in pixel_ids(ds.train)]
        return pixel_ids(ds.train), pixel_ids(ds.test)

    train_a, test_a = ids(seed=0)
    assert len(set(train_a)) == 10 and set(train_a) <= set(range(N_TRAIN))
    assert len(set(test_a)) == 5 and set(test_a) <= set(range(100, 100 + N_TEST))
    assert ids(seed=0) == (train_a, test_a)
    train_b, test_b = ids(seed=1)
    assert sorted(train_b) != sorted(train_a)
    assert sorted(test_b) != sorted(test_a)


def test_limit_at_or_above_the_split_size_keeps_everything(idx_root):
    ds = load_dataset(data_cfg(root=idx_root, train_limit=N_TRAIN, test_limit=1000), "unit")
    assert pixel_ids(ds.train) == list(range(N_TRAIN))
    assert len(ds.test) == N_TEST


def test_test_subset_does_not_depend_on_train_limit(idx_root):
    a = load_dataset(data_cfg(root=idx_root, test_limit=5), "unit")
    b = load_dataset(data_cfg(root=idx_root, test_limit=5, train_limit=10), "unit")
    assert pixel_ids(a.test) == pixel_ids(b.test)


def test_validation_split_does_not_depend_on_test_limit(idx_root):
    a = load_dataset(data_cfg(root=idx_root, val_size=5), "unit")
    b = load_dataset(data_cfg(root=idx_root, val_size=5, test_limit=5), "unit")
    assert pixel_ids(a.val) == pixel_ids(b.val)
    assert pixel_ids(a.train) == pixel_ids(b.train)


def test_val_size_holds_out_a_disjoint_split(idx_root):
    ds = load_dataset(data_cfg(root=idx_root, val_size=8), "unit")
    assert ds.val is not None
    train, val = pixel_ids(ds.train), pixel_ids(ds.val)
    assert len(val) == 8 and len(train) == N_TRAIN - 8
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(range(N_TRAIN))
    assert ds.val.y.tolist() == [i % 10 for i in val]
    assert ds.val.x.shape[1:] == ds.train.x.shape[1:]
    again = load_dataset(data_cfg(root=idx_root, val_size=8), "unit")
    assert pixel_ids(again.val) == val
    other = load_dataset(data_cfg(root=idx_root, val_size=8, seed=3), "unit")
    assert sorted(pixel_ids(other.val)) != sorted(val)


def test_val_size_is_taken_from_the_limited_training_split(idx_root):
    ds = load_dataset(data_cfg(root=idx_root, train_limit=12, val_size=4), "unit")
    assert len(ds.train) == 8 and len(ds.val) == 4
    assert not set(pixel_ids(ds.train)) & set(pixel_ids(ds.val))


@pytest.mark.parametrize(("train_limit", "val_size"), [(None, N_TRAIN), (None, N_TRAIN + 5),
                                                       (10, 10)])
def test_val_size_that_leaves_no_training_images_is_rejected(idx_root, train_limit, val_size):
    with pytest.raises(DataError, match="data.val_size"):
        load_dataset(data_cfg(root=idx_root, train_limit=train_limit, val_size=val_size), "unit")


def test_val_size_leaving_one_training_image_is_accepted(idx_root):
    ds = load_dataset(data_cfg(root=idx_root, val_size=N_TRAIN - 1), "unit")
    assert len(ds.train) == 1 and len(ds.val) == N_TRAIN - 1


# --- pixel scaling -------------------------------------------------------------------------


def test_scale_pixels_unit_and_symmetric():
    images = np.array([[[0, 51, 255]]], dtype=np.uint8)
    unit = scale_pixels(images, "unit")
    sym = scale_pixels(images, "symmetric")
    assert unit.dtype == torch.float32 and sym.dtype == torch.float32
    torch.testing.assert_close(unit, torch.tensor([[[0.0, 0.2, 1.0]]]))
    torch.testing.assert_close(sym, torch.tensor([[[-1.0, 51 / 127.5 - 1.0, 1.0]]]))
    assert images.tolist() == [[[0, 51, 255]]]  # the input is not modified


def test_scale_pixels_accepts_read_only_arrays():
    images = np.frombuffer(bytes([0, 255, 128, 64]), dtype=np.uint8).reshape(1, 2, 2)
    assert not images.flags.writeable
    assert scale_pixels(images, "unit").max().item() == 1.0


@pytest.mark.parametrize(("scale", "low", "high"), [("unit", 0.0, 1.0),
                                                     ("symmetric", -1.0, 1.0)])
def test_loaded_pixels_are_scaled(clean_data_env, scale, low, high):
    root = clean_data_env["tmp"] / "root"
    folder = root / "fashion-mnist"
    write_idx_dataset(folder)
    # One training image of pure 0 and one of pure 255 pin the ends of the range.
    images = identity_images(N_TRAIN)
    images[1] = 255
    write_idx(folder / f"{IDX_FILES['train_images']}.gz", images)
    ds = load_dataset(data_cfg(root=str(root), val_size=3), scale)
    x = torch.cat([ds.train.x, ds.val.x])
    assert x.min().item() == low and x.max().item() == high
    assert ds.test.x.min().item() >= low and ds.test.x.max().item() <= high


# --- synthetic data ------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_seeded():
    a = load_dataset(synthetic_cfg(seed=5), "unit")
    b = load_dataset(synthetic_cfg(seed=5), "unit")
    c = load_dataset(synthetic_cfg(seed=6), "unit")
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)
    assert a.origin == "generated (seed 5)"


def test_synthetic_shapes_classes_and_range():
    ds = load_dataset(synthetic_cfg(channels=3, image_size=12, num_classes=5, n_train=50,
                                    n_test=30, val_size=10), "symmetric")
    assert ds.input_shape == (3, 12, 12)
    assert ds.num_classes == 5
    assert (len(ds.train), len(ds.val), len(ds.test)) == (40, 10, 30)
    assert ds.train.y.min().item() >= 0 and ds.train.y.max().item() < 5
    assert ds.train.x.min().item() >= -1.0 and ds.train.x.max().item() <= 1.0
    assert ds.train.x.min().item() < 0  # symmetric scaling really reaches below zero


def test_make_synthetic_returns_bytes_and_labels():
    train_x, train_y, test_x, test_y = make_synthetic(16, 8, 3, 2, 10, 0.2, seed=1)
    assert train_x.shape == (16, 2, 10, 10) and train_x.dtype == np.uint8
    assert test_x.shape == (8, 2, 10, 10)
    assert train_y.shape == (16,) and test_y.shape == (8,)
    assert set(np.unique(np.concatenate([train_y, test_y]))) <= {0, 1, 2}


def test_synthetic_via_the_composed_config(make_cfg):
    cfg = make_cfg("data=synthetic", "data.n_train=32", "data.n_test=16")
    ds = load_dataset(cfg.data, cfg.model.input_scale)
    assert (len(ds.train), len(ds.test)) == (32, 16)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10


def test_hand_built_config_has_the_composed_keys(make_cfg):
    """data_cfg above mirrors the composed config, so these tests see what a run sees."""
    assert set(data_cfg()) == set(make_cfg("data=fashion_mnist").data)
    assert set(synthetic_cfg()) == set(make_cfg("data=synthetic").data)


def test_unknown_dataset_is_a_data_error():
    with pytest.raises(DataError, match="available: .*mnist"):
        load_dataset(data_cfg("imagenet"), "unit")


# --- batches -------------------------------------------------------------------------------


def _numbered_split(n: int) -> Split:
    return Split(torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1),
                 torch.arange(n, dtype=torch.int64))


def test_unshuffled_batches_keep_order():
    batches = list(_numbered_split(10).batches(4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))
    assert torch.cat([x.flatten() for x, _ in batches]).tolist() == list(range(10))


def test_shuffled_batches_cover_every_index_once():
    split = _numbered_split(23)
    batches = list(split.batches(5, generator=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    order = torch.cat([y for _, y in batches]).tolist()
    assert sorted(order) == list(range(23))
    assert order != list(range(23))
    for x, y in batches:  # images stay with their labels
        assert x.flatten().long().tolist() == y.tolist()
    again = list(split.batches(5, generator=torch.Generator().manual_seed(0)))
    assert torch.cat([y for _, y in again]).tolist() == order
    other = list(split.batches(5, generator=torch.Generator().manual_seed(1)))
    assert torch.cat([y for _, y in other]).tolist() != order


def test_batch_larger_than_split_is_one_batch():
    batches = list(_numbered_split(3).batches(100, generator=torch.Generator().manual_seed(0)))
    assert len(batches) == 1 and sorted(batches[0][1].tolist()) == [0, 1, 2]


# --- the real Fashion-MNIST ----------------------------------------------------------------


@needs_fashion
def test_real_fashion_mnist_subset():
    ds = load_dataset(data_cfg(train_limit=200, test_limit=100, val_size=20), "unit")
    assert ds.input_shape == (1, 28, 28)
    assert ds.num_classes == 10 and len(ds.class_names) == 10
    assert (len(ds.train), len(ds.val), len(ds.test)) == (180, 20, 100)
    labels = torch.cat([ds.train.y, ds.val.y, ds.test.y])
    assert labels.min().item() >= 0 and labels.max().item() <= 9
    assert len(labels.unique()) == 10
    assert ds.train.x.min().item() >= 0.0 and ds.train.x.max().item() <= 1.0
    assert ds.train.x.max().item() > 0.5


def write_cifar_batch(path: Path, first_label: int, n: int) -> None:
    """A CIFAR-10 python batch whose image i has every byte equal to first_label + i."""
    import pickle

    labels = [(first_label + i) % 10 for i in range(n)]
    data = np.repeat(np.array(labels, dtype=np.uint8)[:, None], 3 * 32 * 32, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f)


def test_cifar10_batches_are_read_in_the_torchvision_layout(clean_data_env):
    folder = clean_data_env["tmp"] / "root" / "cifar-10-batches-py"
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", i, 4)
    write_cifar_batch(folder / "test_batch", 7, 3)
    data = load_dataset(data_cfg("cifar10", root=str(folder.parent)), "unit")
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10
    assert len(data.train) == 20 and len(data.test) == 3
    assert data.train.y[:4].tolist() == [1, 2, 3, 4] and data.test.y.tolist() == [7, 8, 9]
    # Pixels follow their labels through reading and scaling.
    assert torch.allclose(data.train.x[:, 2, 31, 31] * 255, data.train.y.float())
    assert data.class_names[0] == "airplane"


def test_damaged_cifar10_batch_is_a_data_error(clean_data_env):
    folder = clean_data_env["tmp"] / "root" / "cifar-10-batches-py"
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", i, 2)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch"):
        load_dataset(data_cfg("cifar10", root=str(folder.parent)), "unit")


# --- the label-scarce track: data.labels_per_class --------------------------------------------


@pytest.fixture
def wide_root(clean_data_env) -> str:
    """90 training images, 9 per class (pixel ids 0..89, label id % 10)."""
    root = clean_data_env["tmp"] / "wide"
    write_idx_dataset(root, n_train=90)
    return str(root)


def test_labels_per_class_keeps_a_balanced_labelled_few_apart_from_validation(wide_root):
    ds = load_dataset(data_cfg(root=wide_root, val_size=20, labels_per_class=3), "unit")
    labelled, val, pool = pixel_ids(ds.train), pixel_ids(ds.val), pixel_ids(ds.unsupervised)
    assert len(labelled) == 30 and len(set(labelled)) == 30
    assert sorted(ds.train.y.tolist()) == sorted(list(range(10)) * 3)  # 3 of every class
    assert ds.train.y.tolist() == [i % 10 for i in labelled]  # images keep their labels
    assert not set(labelled) & set(val)  # no labelled image is a validation image
    assert not set(pool) & set(val)  # phase 1 never sees the validation images
    assert set(pool) | set(val) == set(range(90)) and len(pool) == 70
    assert set(labelled) <= set(pool)  # phase 1 learns from every training image ...
    assert ds.unsupervised.y.tolist() == [-1] * 70  # ... and is given none of their labels


def test_the_label_draw_depends_on_data_seed_only(wide_root):
    def labelled(**cfg) -> list[int]:
        return pixel_ids(load_dataset(data_cfg(root=wide_root, val_size=20, **cfg),
                                      "unit").train)

    first = labelled(labels_per_class=2)
    assert labelled(labels_per_class=2) == first
    assert labelled(labels_per_class=2, seed=1) != first
    assert labelled(labels_per_class=2, test_limit=5) == first


def test_phase_1_sees_the_same_images_whatever_the_label_budget(wide_root):
    """The phase-1 cache key leaves labels_per_class out: that is only right if phase 1 sees
    exactly the images, in the same order, that a run with every label trains on."""
    full = load_dataset(data_cfg(root=wide_root, val_size=20), "unit")
    few = load_dataset(data_cfg(root=wide_root, val_size=20, labels_per_class=1), "unit")
    assert torch.equal(few.unsupervised.x, full.unsupervised.x)
    assert full.unsupervised is full.train and full.label_free is None


def test_more_labels_per_class_than_a_class_has_is_a_data_error(wide_root):
    with pytest.raises(DataError, match=r"data.labels_per_class=8 is more than the \d training "
                                        r"images of class \d"):
        load_dataset(data_cfg(root=wide_root, val_size=20, labels_per_class=8), "unit")


def test_phase_1_learns_from_every_image_and_phase_2_from_the_labelled_few(tmp_path, make_cfg):
    from conftest import TINY

    from bioexp.records import read_metrics
    from bioexp.train import run

    cfg = make_cfg(*TINY, "model=semihebb", "model.hebbian=[16]", "data.labels_per_class=2",
                   "schedule.unsupervised.batch_size=64")
    assert run(cfg, tmp_path)["status"] == "completed"
    rows = read_metrics(tmp_path / "metrics.jsonl")
    unsupervised = [r for r in rows if r["phase"] == "unsupervised"]
    supervised = [r for r in rows if r["phase"] == "supervised" and r.get("train_loss")]
    assert unsupervised[-1]["step"] == 256 // 64  # every one of the 256 training images
    assert [r["step"] for r in supervised] == [5, 6]  # then 20 labelled images: one batch
