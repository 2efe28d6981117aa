"""The validation split carved from the training set: deterministic, seeded by val_seed only,
stratified, disjoint from the images trained on (train_subset included), and used by a run
with eval_split="val"."""
import numpy as np
import pytest
import torch

from lopfast.pipeline import runner
from lopfast.pipeline.config import RunConfig
from lopfast.pipeline.data import load_data, split_validation


def test_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), [50, 60, 40, 50, 50, 55, 45, 50, 50, 50])  # 500 labels, uneven classes
    tr, va = split_validation(labels, 100, seed=0)
    assert len(va) == 100 and len(tr) == 400
    assert not set(tr) & set(va) and sorted(np.concatenate([tr, va])) == list(range(500))
    assert (np.diff(va) > 0).all() and tr.dtype == va.dtype == np.int64
    counts = np.bincount(labels[va], minlength=10)
    want = np.bincount(labels, minlength=10) * 100 / 500
    assert (np.abs(counts - want) <= 1).all()  # each class gives its share
    tr2, va2 = split_validation(labels, 100, seed=0)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)  # deterministic
    assert not np.array_equal(va, split_validation(labels, 100, seed=1)[1])  # and seeded


@pytest.mark.parametrize("bad", [0, 500, -3, 2.5, True])
def test_split_size_is_checked(bad):
    with pytest.raises(ValueError, match="val_size"):
        split_validation(np.zeros(500, dtype=np.int64), bad)


def test_load_data_holds_the_split_out_of_training():
    full = load_data("digits", batch_size=64)
    a = load_data("digits", batch_size=64, val_size=200, seed=0)
    b = load_data("digits", batch_size=64, val_size=200, seed=7, train_subset=300)  # another training seed
    assert a.val.num_samples == b.val.num_samples == 200 and not a.val.train  # no shuffle, no augmentation
    # the same images, whatever the training seed or subset: val_seed alone picks them
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)
    assert a.train.num_samples == full.train.num_samples - 200 and b.train.num_samples == 300
    # disjoint, by position in the full training set and by content
    for d in (a, b):
        assert not set(d.extra["train_index"]) & set(d.extra["val_index"])
        torch.testing.assert_close(d.val.images, full.train.images[torch.from_numpy(d.extra["val_index"])])
        torch.testing.assert_close(d.train.images, full.train.images[torch.from_numpy(d.extra["train_index"])])
    assert set(a.extra["val_index"]) == set(b.extra["val_index"])
    assert not np.array_equal(load_data("digits", val_size=200, val_seed=1).extra["val_index"], a.extra["val_index"])
    # no split: the bundle is as before
    assert full.val is None and "val_index" not in full.extra
    with pytest.raises(ValueError, match="val_size"):
        load_data("digits", val_size=10 ** 6)


def test_run_config_checks_the_split_settings():
    base = dict(model="digitsnet", dataset="digits", device="cpu")
    for kw, what in (({"val_size": 0}, "val_size"), ({"eval_split": "train"}, "eval_split"),
                     ({"eval_split": "val"}, "needs val_size"), ({"val_seed": "a"}, "val_seed")):
        with pytest.raises(ValueError, match=what):
            RunConfig(**base, **kw).validate()


def test_eval_split_val_reports_on_the_held_out_images(tmp_path):
    cfg = RunConfig(model="digitsnet", model_kwargs={"width": 8}, dataset="digits", device="cpu", batch_size=64,
                    val_size=150, eval_split="val", test_subset=64)
    data, _ = runner.prepare(cfg)
    assert data.test is data.val and data.test.num_samples == 150 and data.extra["eval_split"] == "val"
    assert data.train.num_samples == 1437 - 150


def test_a_run_folder_from_before_the_new_settings_is_still_reusable(tmp_path):
    import json

    from lopfast.pipeline.runner import check_out_dir

    cfg = RunConfig(model="digitsnet", dataset="digits", device="cpu")
    old = {k: v for k, v in cfg.to_dict().items()
           if k not in ("schedule", "warmup_epochs", "label_smoothing", "nesterov", "val_size", "val_seed", "eval_split")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    check_out_dir(cfg, str(tmp_path))  # the missing keys had their defaults
    with pytest.raises(ValueError, match="schedule"):
        check_out_dir(RunConfig(**{**cfg.to_dict(), "schedule": "linear"}), str(tmp_path))
