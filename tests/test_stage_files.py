"""Stage files (issue 12): the pipeline hands pruned models between stages with lopfast.save / lopfast.load.

A timm ViT pruned by the prune stage changes attributes a state dict does not hold (the
attention's ``num_heads`` / ``head_dim``, LayerNorm's ``normalized_shape``): a run resumed after
the prune stage, which loads ``prune/model.pt`` instead of keeping the model in memory, must
rebuild them and recover exactly as the uninterrupted run did.
"""
import json
import os
import shutil

import pytest
import torch

import lopfast
from lopfast.pipeline import runner
from lopfast.pipeline.config import RunConfig

pytest.importorskip("timm")
pytest.importorskip("torch_pruning")

# a 2-block ViT-Tiny variant on 8x8 digits: 4x4 patches, 3 heads of 16
VIT = dict(model="timm:vit_tiny_patch16_224",
           model_kwargs={"img_size": 8, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3},
           dataset="digits", train_subset=64, test_subset=32, batch_size=32, pretrain_epochs=1, epochs=1,
           scratch_epochs=1, target=0.5, gamma=10.0, device="cpu", methods=["lop"])


def test_timm_vit_run_resumes_from_stage_files(tmp_path):
    out = str(tmp_path / "run")
    cfg = RunConfig(**VIT)
    first = runner.run_pipeline(cfg, out, quiet=True)
    lop = first["methods"]["lop"]
    assert lop["contract_max_rel_diff"] < 1e-4
    assert lop["params"] == first["pruned"]["params"] < first["teacher"]["params"]

    # rerun the recovery only: pretrain and prune are loaded from their files, never recomputed
    with open(os.path.join(out, "lop", "result.json")) as f:
        history = [{k: v for k, v in e.items() if k != "seconds"} for e in json.load(f)["history"]]
    shutil.rmtree(os.path.join(out, "lop"))
    stamp = {s: os.path.getmtime(os.path.join(out, s, "model.pt")) for s in ("pretrain", "prune")}
    second = runner.run_pipeline(cfg, out, quiet=True)
    assert {s: os.path.getmtime(os.path.join(out, s, "model.pt")) for s in stamp} == stamp
    for key in ("acc", "loss", "params"):
        assert second["methods"]["lop"][key] == lop[key], key
    with open(os.path.join(out, "lop", "result.json")) as f:
        again = [{k: v for k, v in e.items() if k != "seconds"} for e in json.load(f)["history"]]
    assert again == history  # the same training, epoch by epoch

    # the stage file holds the pruned ViT, heads included, and loads with weights_only=True
    path = os.path.join(out, "prune", "model.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["metadata"]["arch"] == cfg.model
    heads = {k: v["num_heads"] for k, v in payload["attributes"].items() if "num_heads" in v and k.endswith("attn")}
    assert heads and all(h < 3 for h in heads.values())  # the prune stage did remove heads
    pruned = runner.load_model_file(path).eval()
    assert sum(p.numel() for p in pruned.parameters()) == first["pruned"]["params"]
    assert pruned(torch.randn(2, 1, 8, 8)).shape == (2, 10)

    final = lopfast.load(os.path.join(out, "lop", "model.pt"))
    assert sum(p.numel() for p in final.parameters()) == lop["params"]


def test_old_stage_files_give_a_clear_error(tmp_path):
    """Stage files of lopfast versions before the stages used lopfast.save (arch + state dict only)."""
    from lopfast.pipeline.models import build_model

    model = build_model("digitsnet", width=8)
    path = str(tmp_path / "prune" / "model.pt")
    os.makedirs(os.path.dirname(path))
    torch.save({"arch": "digitsnet", "arch_kwargs": {"width": 8}, "state_dict": model.state_dict()}, path)
    with pytest.raises(lopfast.ModelFileError, match="older lopfast.*delete .*prune"):
        runner.load_model_file(path)
    with open(tmp_path / "junk.pt", "w") as f:
        json.dump({"not": "a model"}, f)
    with pytest.raises(lopfast.ModelFileError, match="junk.pt"):
        runner.load_model_file(str(tmp_path / "junk.pt"))
