"""Elastic distillation inside Megatron-Bridge's own `pretrain` loop (GPU; a NeMo container or
the `bridge` extra with Transformer-Engine).  Bridge owns data, student optimizer, DDP, logging
and checkpoints; our adapter adds the elastic forward step and the router callback.

    # the paper's 12B -> {9B, 6B} on 2 nodes x 8 GPUs (see examples/slurm for srun + torchrun)
    torchrun --nproc_per_node=8 examples/bridge/train_bridge.py --recipe nemotron_nano_12b \
        elastic.init_checkpoint=/ckpt/nano12b_prepared data.indexed.prefix=/data/corpus \
        --bridge train.train_iters=2000 checkpoint.save=/ckpt/bridge_run

    # one-GPU smoke run of the tiny recipe on Bridge's mock data (after `make run`)
    torchrun --nproc_per_node=1 examples/bridge/train_bridge.py --recipe tiny \
        elastic.init_checkpoint=runs/tiny/prepared --bridge train.train_iters=20

Positional `key=value` arguments are nemo-elastic recipe overrides; those after `--bridge` are
Bridge's own Hydra-style overrides of the ConfigContainer.  `--yaml FILE` merges a Bridge YAML first;
`--dump-yaml FILE` writes the final ConfigContainer and exits.  Next to each Bridge checkpoint
`iter_XXXXXXX/` the callback writes `nemo_elastic_router.pt` and `nemo_elastic.json` (the family).
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="tiny", help="tiny, nemotron_nano_12b or a YAML path")
    parser.add_argument("--yaml", default=None, help="Bridge ConfigContainer YAML to merge")
    parser.add_argument("--dump-yaml", default=None, help="write the final config and exit")
    parser.add_argument("--bridge", nargs="*", default=[], metavar="key=value",
                        help="Bridge (Hydra-style) overrides of the ConfigContainer")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    bridge_args = args.bridge

    from nemo_elastic.integrations.bridge import (ElasticForwardStep, ElasticRouterCallback,
                                                  apply_overrides, recipe)

    cfg = recipe(args.recipe, args.overrides)
    if args.yaml:
        from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

        process_config_with_overrides(cfg, config_filepath=args.yaml)
    if bridge_args:
        apply_overrides(cfg, bridge_args)
    if args.dump_yaml:
        cfg.to_yaml(args.dump_yaml)
        return 0

    from megatron.bridge.training.pretrain import pretrain

    step = ElasticForwardStep()
    pretrain(cfg, step, callbacks=[ElasticRouterCallback(step)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
