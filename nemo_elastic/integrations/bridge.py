"""Megatron-Bridge adapter (the `bridge` extra): elastic distillation inside Bridge's `pretrain`.

    from megatron.bridge.training.pretrain import pretrain
    from nemo_elastic.integrations.bridge import ElasticForwardStep, ElasticRouterCallback, recipe

    cfg = recipe("nemotron_nano_12b", ["elastic.init_checkpoint=/ckpt/prepared"])
    step = ElasticForwardStep()
    pretrain(cfg, step, callbacks=[ElasticRouterCallback(step)])

- `ElasticForwardStep`: Bridge's forward-step signature `(state, data_iterator, model,
  return_schedule_plan=False)` around the very `ElasticDistillationStep` functor our own loop
  runs (budget draw, router, masked student, frozen teacher, KD + budget loss);
- `ElasticRouterCallback` (a `megatron.bridge.training.callbacks.Callback`): builds router,
  teacher and router optimizer when training starts (and loads the init checkpoint into the
  student), sets the schedule position at `on_train_step_start` (iteration and the curriculum
  stage's budget probabilities), steps the router and logs its choices at `on_train_step_end`,
  and writes router state + the family metadata next to each Bridge checkpoint at
  `on_checkpoint_save`;
- `ElasticHybridModelProvider`: Bridge's `HybridModelProvider` whose `provide()` builds our
  elastic model (Megatron-Core `HybridModel` subclass, same specs and parameter names) with the
  provider as its config; it carries the whole nemo_elastic recipe in `elastic_recipe`;
- `recipe(name, overrides)`: a Bridge `ConfigContainer` from one of our YAML recipes; Bridge's
  own override parser (`apply_overrides`) and YAML round trip work on it.

Limits: Bridge runs one sequence length and batch size per run, so a curriculum's later stages
keep the first stage's shape (their budget probabilities do apply); pipeline stages must all
see the data iterator (our step reads the batch on every stage).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from nemo_elastic.config import Config, load_config, to_dict
from nemo_elastic.config_io import from_dict
from nemo_elastic.errors import ConfigError
from nemo_elastic.integrations.bridge_import import import_bridge

import_bridge()

from megatron.bridge.models.hybrid.hybrid_provider import HybridModelProvider  # noqa: E402
from megatron.bridge.training import config as bridge_config  # noqa: E402
from megatron.bridge.training.callbacks import Callback, CallbackContext  # noqa: E402
from megatron.bridge.training.utils.omegaconf_utils import (  # noqa: E402
    process_config_with_overrides)
from megatron.bridge.utils.instantiate_utils import register_allowed_target_prefix  # noqa: E402

# ConfigContainer.from_yaml only instantiates allow-listed `_target_`s: add our provider's.
register_allowed_target_prefix("nemo_elastic.")

logger = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
RECIPES = {"tiny": "tiny.yaml", "nemotron_nano_12b": "nemotron_nano_12b.yaml"}
ROUTER_FILE, META_FILE = "nemo_elastic_router.pt", "nemo_elastic.json"
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


# ------------------------------------------------------------------------------ forward step

def _our_batches(data_iterator: Iterator[dict]) -> Iterator[dict]:
    """Bridge's GPT batches -> the keys our step reads (None entries dropped; positions made
    when the dataset gives none)."""
    for batch in data_iterator:
        out = {k: batch[k] for k in BATCH_KEYS if batch.get(k) is not None}
        if "position_ids" not in out:
            tokens = out["tokens"]
            out["position_ids"] = torch.arange(tokens.shape[1]).expand_as(tokens)
        yield out


class ElasticForwardStep:
    """`forward_step(state, data_iterator, model, return_schedule_plan=False)` for Bridge's
    `pretrain`, calling `self.step` (an `ElasticDistillationStep`, set by
    `ElasticRouterCallback.on_train_start` or given here)."""

    def __init__(self, step=None) -> None:
        self.step = step

    def __call__(self, state, data_iterator, model, return_schedule_plan: bool = False):
        if return_schedule_plan:
            raise NotImplementedError("return_schedule_plan=True (combined 1F1B overlap of MoE "
                                      "models) is not supported by the elastic step")
        if self.step is None:
            raise RuntimeError("ElasticForwardStep has no elastic step yet: pass "
                               "ElasticRouterCallback(this_step) in pretrain(..., callbacks=)")
        return self.step(_our_batches(data_iterator), model)


# ------------------------------------------------------------------------------ callback

def budget_probs_at(cfg: Config, iteration: int) -> tuple[str, list[float]]:
    """(stage name, budget probabilities) of the curriculum stage running `iteration`
    (1-based); the last stage once past the end."""
    from nemo_elastic.training.elastic.schedule import Curriculum

    stage = Curriculum.of(cfg).stage_at(iteration)
    return stage.name, list(stage.budget_probs)


class ElasticRouterCallback(Callback):
    """Router and schedule side of elastic distillation in Bridge's loop (see module doc).

    `recipe` defaults to the provider's `elastic_recipe` (`state.cfg.model`).  Giving `step`,
    `router_optimizer` and `router_scheduler` skips the build at `on_train_start` (how our own
    loop drives this callback in the tests).  `sync_grads`: sum/average router gradients over
    pipeline / data-parallel ranks at step end (Bridge's grad finalize does not know the
    router); leave it on unless the model's finalize hook already does it.
    """

    def __init__(self, forward_step: Optional[ElasticForwardStep] = None, *,
                 recipe: Optional[Config] = None, step=None, router_optimizer=None,
                 router_scheduler=None, sync_grads: bool = True) -> None:
        self.forward_step = forward_step if forward_step is not None else ElasticForwardStep()
        self.recipe, self.step = recipe, step
        self.router_optimizer, self.router_scheduler = router_optimizer, router_scheduler
        self.sync_grads = sync_grads
        if step is not None:
            self.forward_step.step = step
        self.last_record: dict = {}

    @property
    def router(self):
        return self.step.router

    def _recipe(self, context: CallbackContext) -> Config:
        if self.recipe is None:
            provider = context.state.cfg.model
            if not getattr(provider, "elastic_recipe", None):
                raise ConfigError("model.elastic_recipe is empty: build the ConfigContainer "
                                  "with nemo_elastic.integrations.bridge.recipe(...) or pass "
                                  "ElasticRouterCallback(recipe=...)")
            self.recipe = from_dict(Config, provider.elastic_recipe)
        return self.recipe

    # ------------------------------------------------------------------ events
    def on_train_start(self, context: CallbackContext) -> None:
        if self.step is not None:
            return
        from megatron.core import parallel_state as ps

        from nemo_elastic.checkpoint import load_checkpoint
        from nemo_elastic.training.elastic.step import ElasticDistillationStep
        from nemo_elastic.training.elastic.trainer import build_router_optimizer, parent_config
        from nemo_elastic.training.train import build_teacher

        cfg, init, teacher_ckpt = parent_config(self._recipe(context))
        self.recipe = cfg
        student = _unwrap(context.model[0])
        if context.state.train_state.step == 0:  # fresh run: the student starts as the parent
            load_checkpoint(init, model=student, restore_rng=False)
            if context.optimizer is not None and hasattr(context.optimizer, "reload_model_params"):
                context.optimizer.reload_model_params()  # fp32 main copies of bf16 weights
        router = _build_router(cfg, init, next(student.parameters()).device)
        e = cfg.elastic
        if router.has_prior and context.state.train_state.step == 0:  # router.init=zero_shot
            _zero_shot_prior(cfg, router, context.model[0])
        teacher = None if e.distill.teacher_mode == "trainable" else build_teacher(cfg, teacher_ckpt)
        self.router_optimizer, self.router_scheduler = build_router_optimizer(cfg, router)
        self.step = ElasticDistillationStep(router=router, teacher=teacher, elastic_cfg=e,
                                            tp_group=ps.get_tensor_model_parallel_group())
        self.forward_step.step = self.step
        if context.state.train_state.step > 0:
            self._restore(context)

    def on_train_step_start(self, context: CallbackContext) -> None:
        iteration = context.state.train_state.step + 1  # Bridge counts finished iterations
        _, probs = budget_probs_at(self._recipe(context), iteration)
        self.router_optimizer.zero_grad(set_to_none=True)
        self.step.begin_iteration(iteration, probs)

    def on_train_step_end(self, context: CallbackContext) -> None:
        from nemo_elastic.training.elastic.trainer import choice_summary, sync_router_grads

        iteration = context.state.train_state.step
        if self.sync_grads:
            sync_router_grads(self.router)
        clip = self._recipe(context).elastic.router.clip_grad
        norm = torch.nn.utils.clip_grad_norm_(self.router.parameters(),
                                              clip if clip > 0 else float("inf"))
        self.router_optimizer.step()
        self.router_scheduler.step()
        record = {"iteration": iteration, "router_grad_norm": float(norm),
                  "router_lr": self.router_optimizer.param_groups[0]["lr"],
                  "tau": self.router.temperature(iteration),
                  "budgets_drawn": list(self.step.budgets_drawn)}
        log_interval = self._recipe(context).elastic.log_interval
        if iteration % log_interval == 0 or iteration == 1:
            record["choices"] = choice_summary(self.router)
            logger.info("iteration %d router choices: %s", iteration, {
                n: round(c["params_fraction"], 4) for n, c in record["choices"].items()})
        self.last_record = record
        context.user_state["nemo_elastic"] = record

    def on_checkpoint_save(self, context: CallbackContext) -> None:
        """Router + its optimizer/scheduler and the family metadata next to Bridge's
        checkpoint `<checkpoint.save>/iter_XXXXXXX/` (rank 0 writes; all ranks agree)."""
        folder = checkpoint_folder(context.state.cfg.checkpoint.save,
                                   context.state.train_state.step)
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"router": self.router.state_dict(),
                    "router_optimizer": self.router_optimizer.state_dict(),
                    "router_scheduler": self.router_scheduler.state_dict()}, folder / ROUTER_FILE)
        cfg = self.recipe
        meta = {"kind": "elastic", "iteration": context.state.train_state.step,
                "family": self.router.family_table(), "budget_names": self.router.names,
                "budget_type": cfg.elastic.budget_type, "config": to_dict(cfg)}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2))

    def _restore(self, context: CallbackContext) -> None:
        folder = checkpoint_folder(context.state.cfg.checkpoint.load or
                                   context.state.cfg.checkpoint.save,
                                   context.state.train_state.step)
        path = folder / ROUTER_FILE
        if not path.is_file():
            raise ConfigError(f"resuming at iteration {context.state.train_state.step} but "
                              f"{path} is missing: the Bridge checkpoint was not written with "
                              "ElasticRouterCallback; start in an empty checkpoint.save dir")
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.router.load_state_dict(state["router"])
        self.router_optimizer.load_state_dict(state["router_optimizer"])
        self.router_scheduler.load_state_dict(state["router_scheduler"])


def checkpoint_folder(root, iteration: int) -> Path:
    """Bridge's / Megatron's checkpoint folder of an iteration."""
    return Path(root) / f"iter_{iteration:07d}"


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _zero_shot_prior(cfg: Config, router, model) -> None:
    """router.init=zero_shot on a fresh Bridge run: the cuts are scored as `nemo-elastic train`
    scores them, on the first curriculum stage's shape of the recipe's own `data:` section (the
    indexed dataset Bridge trains on; with Bridge's mock data, the recipe's corpus)."""
    from nemo_elastic.elastic.router_prior import apply_zero_shot_prior
    from nemo_elastic.runtime import rank_info
    from nemo_elastic.training.elastic.trainer import training_segments

    info = rank_info()
    first = training_segments(cfg, info)[0]  # the stage config and data `build_trainer` scores on
    apply_zero_shot_prior(first.extra["config"], router, model, first.data, info)


def _build_router(cfg: Config, init, device):
    from nemo_elastic.checkpoint import read_meta
    from nemo_elastic.router import ElasticRouter

    e = cfg.elastic
    return ElasticRouter(cfg.model, e, total_iters=e.total_iters,
                         layer_ranking=read_meta(init).get("layer_ranking")).to(device)


# ------------------------------------------------------------------------------ provider

@dataclasses.dataclass
class ElasticHybridModelProvider(HybridModelProvider):
    """Bridge's hybrid provider building our elastic model; `elastic_recipe` is the whole
    nemo_elastic recipe (a dict, so YAML round-trips and Bridge overrides reach it)."""

    elastic_recipe: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_recipe(cls, cfg: Config, seq_length: Optional[int] = None
                    ) -> "ElasticHybridModelProvider":
        """The TransformerConfig fields are exactly those `nemo_elastic.model.build` uses;
        `seq_length`: the training sequence length (Bridge checks it against the data's; the
        model itself is built for the recipe's model.max_sequence_length)."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        from nemo_elastic.model.build import transformer_config

        m = cfg.model
        tc = transformer_config(m, cfg.parallel)
        provider_fields = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {f.name: getattr(tc, f.name) for f in dataclasses.fields(TransformerConfig)
                  if f.init and f.name in provider_fields and f.name != "num_layers"}
        kwargs.update(hybrid_layer_pattern=m.hybrid_layer_pattern, vocab_size=m.vocab_size,
                      seq_length=seq_length or m.max_sequence_length, mamba_chunk_size=m.mamba_chunk_size,
                      position_embedding_type="none", share_embeddings_and_output_weights=False,
                      should_pad_vocab=False, cross_entropy_loss_fusion=False,
                      elastic_recipe=to_dict(cfg))
        return cls(**kwargs)

    def recipe_config(self) -> Config:
        """The nemo_elastic recipe at this provider's parallel sizes."""
        data = dict(self.elastic_recipe)
        data["parallel"] = {**data.get("parallel", {}),
                            "tensor_model_parallel_size": self.tensor_model_parallel_size,
                            "pipeline_model_parallel_size": self.pipeline_model_parallel_size}
        return from_dict(Config, data)

    def provide(self, pre_process=None, post_process=None, vp_stage=None):
        from nemo_elastic.elastic.model import ElasticHybridModel
        from nemo_elastic.elastic.specs import elastic_hybrid_stack_spec
        from nemo_elastic.model.build import build_hybrid_model

        if vp_stage is not None:
            raise ConfigError(f"vp_stage={vp_stage}: virtual pipeline stages are not supported")
        cfg = self.recipe_config()
        m = cfg.model
        spec = elastic_hybrid_stack_spec(d_conv=m.mamba_conv_kernel, chunk_size=m.mamba_chunk_size)

        def model_cls(**kwargs):  # the provider is the model's config (Bridge's contract)
            return ElasticHybridModel(model_config=m, **{**kwargs, "config": self})

        return build_hybrid_model(cfg, spec=spec, model_cls=model_cls, pre_process=pre_process,
                                  post_process=post_process)


# ------------------------------------------------------------------------------ recipes

def recipe(name_or_path: str = "tiny", overrides: Sequence[str] = (), *,
           bridge_overrides: Sequence[str] = (), output_dir: Optional[str] = None,
           mock_data: Optional[bool] = None):
    """A Bridge `ConfigContainer` from a nemo_elastic recipe (`tiny`, `nemotron_nano_12b` or a
    YAML path) with `nemo-elastic`-style `overrides`, then Bridge/Hydra-style
    `bridge_overrides` (e.g. `train.train_iters=100`, `model.elastic_recipe.elastic.lr=1e-4`).

    Student iterations, LR schedule, batch and sequence length come from the recipe's elastic
    section (first curriculum stage's shape); the model provider carries the whole recipe.
    Data: the recipe's indexed dataset (`data.indexed.prefix`), or Bridge's mock GPT data when
    `mock_data` (default: when the recipe has no indexed data, e.g. tiny's synthetic corpus).
    """
    path = CONF_DIR / RECIPES[name_or_path] if name_or_path in RECIPES else Path(name_or_path)
    cfg = load_config(path, list(overrides))
    if cfg.elastic is None:
        raise ConfigError(f"recipe {str(path)!r} has no `elastic:` section")
    from nemo_elastic.training.elastic.schedule import Curriculum

    e, d = cfg.elastic, cfg.data
    first = Curriculum.of(cfg).stages[0]
    seq, gbs, mbs = first.seq_length, first.global_batch_size, first.micro_batch_size
    from nemo_elastic.run.run_dir import bridge_run_dir

    run = bridge_run_dir(cfg, output_dir)
    out = run.root
    bf16 = cfg.model.params_dtype == "bfloat16"
    if mock_data is None:
        mock_data = d.source != "indexed"
    dataset_kwargs = dict(random_seed=d.seed, seq_length=seq, reset_attention_mask=False,
                          reset_position_ids=False, eod_mask_loss=False,
                          num_dataset_builder_threads=1, split="98,2,0",
                          dataloader_type="single", skip_getting_attention_mask_from_dataset=True)
    if mock_data:
        dataset = bridge_config.MockGPTDatasetConfig(**dataset_kwargs)
        tokenizer = bridge_config.TokenizerConfig(tokenizer_type="NullTokenizer",
                                                  vocab_size=cfg.model.vocab_size)
    else:
        dataset = bridge_config.GPTDatasetConfig(blend=[[d.indexed.prefix], None],
                                                 **dataset_kwargs)
        tokenizer = bridge_config.TokenizerConfig(tokenizer_type="HuggingFaceTokenizer",
                                                  tokenizer_model=str(Path(d.indexed.tokenizer).parent))
    container = bridge_config.ConfigContainer(
        model=ElasticHybridModelProvider.from_recipe(cfg, seq_length=seq),
        train=bridge_config.TrainingConfig(train_iters=e.total_iters, global_batch_size=gbs,
                                           micro_batch_size=mbs),
        validation=bridge_config.ValidationConfig(eval_interval=e.eval_interval,
                                                  eval_iters=cfg.train.eval_iters),
        optimizer=bridge_config.OptimizerConfig(
            optimizer="adam", lr=e.lr, min_lr=e.min_lr, weight_decay=e.weight_decay,
            clip_grad=e.clip_grad, adam_beta1=cfg.train.adam_beta1,
            adam_beta2=cfg.train.adam_beta2, bf16=bf16, fp16=False,
            use_distributed_optimizer=False),
        scheduler=bridge_config.SchedulerConfig(lr_decay_style=e.lr_decay_style,
                                                lr_warmup_iters=e.warmup_iters),
        ddp=bridge_config.DistributedDataParallelConfig(use_distributed_optimizer=False,
                                                        grad_reduce_in_fp32=True),
        dataset=dataset,
        logger=bridge_config.LoggerConfig(log_interval=e.log_interval,
                                          tensorboard_dir=str(out / "tb")),
        tokenizer=tokenizer,
        checkpoint=bridge_config.CheckpointConfig(save=str(run.checkpoints),
                                                  load=str(run.checkpoints),
                                                  save_interval=e.save_interval,
                                                  ckpt_format="torch_dist"),
        rng=bridge_config.RNGConfig(seed=e.seed),
        mixed_precision="bf16_mixed" if bf16 else None,
    )
    return apply_overrides(container, bridge_overrides) if bridge_overrides else container


def apply_overrides(container, overrides: Sequence[str]):
    """Bridge's own Hydra/OmegaConf override parser on a ConfigContainer (in place)."""
    return process_config_with_overrides(container, cli_overrides=list(overrides))


def cpu_friendly(container):
    """Turn off the fusions Bridge defaults to (they need Transformer-Engine / CUDA) so that
    `validate()` and model building run on CPU."""
    model = container.model
    for name in ("bias_dropout_fusion", "apply_rope_fusion", "masked_softmax_fusion",
                 "gradient_accumulation_fusion", "bias_activation_fusion",
                 "cross_entropy_loss_fusion", "persist_layer_norm"):
        if hasattr(model, name):
            setattr(model, name, False)
    return container
