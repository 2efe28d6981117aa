"""Data sets checked as they load: image folders whose splits differ, empty classes, labels out of
range, and a model that does not fit the data, each refused or warned, naming them."""
import pickle
import warnings

import numpy as np
import pytest
import torch

from lopfast.pipeline.data import check_model_matches_data, load_data
from lopfast.pipeline.models import build_model


def _folder(root, layout, size=8, ext="png"):
    """``layout``: {"train": {"cat": 2, ...}, "test": {...}}: images per class folder (0: an empty folder)."""
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, classes in layout.items():
        for c, n in classes.items():
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.{ext}")
    return str(root)


TEN = {f"c{i}": 1 for i in range(10)}


def test_a_test_class_absent_from_train_is_refused_naming_it(tmp_path):
    """Was: its images were dropped silently."""
    root = _folder(tmp_path, {"train": dict(TEN), "test": {**TEN, "zebra": 1}})
    with pytest.raises(ValueError, match=r"test has class folders that .*train lacks: zebra"):
        load_data("cifar10", data_dir=root)


def test_an_empty_train_class_is_refused_naming_it(tmp_path):
    """Was: train/c3 empty trained 9 classes and tested 10, silently."""
    root = _folder(tmp_path, {"train": {**TEN, "c3": 0}, "test": dict(TEN)})
    with pytest.raises(ValueError, match=r"train: class folders with no image .*: c3;"):
        load_data("cifar10", data_dir=root)


def test_a_class_with_no_test_image_is_warned(tmp_path):
    root = _folder(tmp_path, {"train": dict(TEN), "test": {**{k: 1 for k in list(TEN)[:8]}, "c8": 0}})
    with pytest.warns(UserWarning, match=r"test: no test image of the classes c8, c9"):
        data = load_data("cifar10", data_dir=root)
    assert data.num_classes == 10 and data.test.num_samples == 8


def test_classes_with_no_training_image_are_warned(tmp_path):
    root = _folder(tmp_path, {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    with pytest.warns(UserWarning, match=r"no training image of the classes 2, 3, .* of 10"):
        data = load_data("cifar10", data_dir=root)
    assert data.num_classes == 10  # cifar10 keeps its 10 outputs


def test_a_complete_folder_loads_without_a_word(tmp_path):
    root = _folder(tmp_path, {"train": dict(TEN), "test": dict(TEN)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_data("cifar10", data_dir=root)
    assert data.num_classes == 10 and data.train.num_samples == 10


def test_labels_out_of_range_are_refused_naming_the_folder(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.RandomState(0)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = list(range(10)) if f != "test_batch" else [0, 1, 2, 3, 4, 5, 6, 7, 8, 12]
        with open(d / f, "wb") as fh:
            pickle.dump({b"data": rng.randint(0, 255, (10, 3072), dtype=np.uint8), b"labels": labels}, fh)
    with pytest.raises(ValueError, match=rf"cifar10 in {tmp_path}: test labels 12 are outside 0..9"):
        load_data("cifar10", data_dir=str(tmp_path))


def test_imagenet_val_classes_keep_the_train_numbers(tmp_path):
    """torchvision numbers each split's folders on its own: val/ lacking class b shifted c's label."""
    pytest.importorskip("torchvision")
    root = _folder(tmp_path, {"train": {"a": 1, "b": 1, "c": 1}, "val": {"a": 1, "c": 1}}, ext="jpg")
    with pytest.warns(UserWarning, match=r"val: no test image of the classes b"):
        data = load_data("imagenet", data_dir=root, workers=0)
    assert data.num_classes == 3 and sorted(data.test.dataset.targets) == [0, 2]
    (tmp_path / "val" / "d").mkdir()
    with pytest.raises(ValueError, match=r"val has class folders that .*train lacks: d"):
        load_data("imagenet", data_dir=root, workers=0)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", batch_size=64, train_subset=64, test_subset=32)


@pytest.mark.parametrize("kw, message", [
    ({"num_classes": 5}, r"model must be a model with 10 outputs, one per class of digits.*it gives 5: the labels "
                         r"above 4 would be out of range; build it with num_classes=10"),
    ({"in_channels": 3}, r"it takes 3 input channels \(its first layer 'conv1'\), but digits has 1: build it with "
                         r"in_channels=1"),
])
def test_a_model_that_does_not_fit_the_data_is_refused(digits, kw, message):
    model = build_model("digitsnet", **{"in_channels": 1, "num_classes": 10, "width": 4, **kw})
    with pytest.raises(ValueError, match=message):
        check_model_matches_data(model, digits)


def test_the_model_check_changes_nothing(digits):
    torch.manual_seed(0)
    model = build_model("digitsnet", in_channels=1, num_classes=10, width=4).train()
    model.bn1.eval()  # a mixed state survives
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_model_matches_data(model, digits)
    assert model.training and not model.bn1.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
