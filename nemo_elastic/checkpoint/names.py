"""File names inside one checkpoint folder and inside a run's `checkpoints/` folder.

    CKPT/
      .metadata, __*_*.distcp, metadata.json   Megatron dist_checkpointing (torch_dist)
      nemo_elastic.json                         typed metadata (`meta.CheckpointMeta`), sealed
    checkpoints/
      iter_0000100/ ...                         one checkpoint per save
      latest                                    text: the newest complete checkpoint's name
"""

META_FILE = "nemo_elastic.json"
LATEST_FILE = "latest"
CHECKPOINTS_DIR = "checkpoints"  # a training run's series of checkpoints, in its run folder
MEGATRON_FILES = ("metadata.json", ".metadata")  # Megatron's sharded-checkpoint files


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"
