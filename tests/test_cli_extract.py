"""`nemo-elastic extract`: uniform flags and a sub-network file, checked against slice_model."""

import json

import torch

from nemo_elastic import cli, runtime
from nemo_elastic.checkpoint import config_from_checkpoint, load_checkpoint, read_meta, save_checkpoint
from nemo_elastic.config import ParallelConfig
from nemo_elastic.elastic import SubNetwork
from nemo_elastic.model import build_hybrid_model
from tests.conftest import tiny_config


def _parent_checkpoint(path):
    cfg = tiny_config({"hybrid_layer_pattern": "M-*M-"})
    with runtime.distributed(ParallelConfig()):
        model = build_hybrid_model(cfg)
        save_checkpoint(path, cfg=cfg, model=model, kind="test")
    return cfg


def test_extract_with_uniform_flags_and_with_a_file(tmp_path):
    cfg = _parent_checkpoint(tmp_path / "parent")
    code = cli.main(["extract", "--ckpt", str(tmp_path / "parent"), "--out", str(tmp_path / "a"),
                     "--hidden-size", "24", "--ffn-hidden-size", "32", "--drop-layers", "2"])
    assert code == 0
    subnet = SubNetwork.uniform(cfg.model, hidden_size=24, ffn_hidden_size=32, drop_layers=[2])
    assert read_meta(tmp_path / "a")["subnetwork"] == subnet.to_dict()
    child = config_from_checkpoint(tmp_path / "a").model
    assert (child.hidden_size, child.ffn_hidden_size, child.hybrid_layer_pattern) == (24, 32, "M-M-")

    (tmp_path / "subnet.json").write_text(json.dumps(subnet.to_dict()))
    assert cli.main(["extract", "--ckpt", str(tmp_path / "parent"), "--out", str(tmp_path / "b"),
                     "--subnet", str(tmp_path / "subnet.json")]) == 0
    with runtime.distributed(ParallelConfig()):
        models = []
        for name in ("a", "b"):
            child_cfg = config_from_checkpoint(tmp_path / name)
            model = build_hybrid_model(child_cfg)
            load_checkpoint(tmp_path / name, model=model)
            models.append(model)
        for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            assert torch.equal(p, q), n


def test_extract_rejects_invalid_subnetwork_with_field_name(tmp_path, caplog):
    _parent_checkpoint(tmp_path / "parent")
    code = cli.main(["extract", "--ckpt", str(tmp_path / "parent"), "--out", str(tmp_path / "x"),
                     "--mamba-num-heads", "3"])
    assert code == 2
    assert "subnetwork.layers[0].mamba_num_heads=3" in caplog.text
    assert not (tmp_path / "x").exists()
