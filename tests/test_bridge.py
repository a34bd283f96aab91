"""Megatron-Bridge adapter (the `bridge` extra; `make install-nemo`), CPU tier.

Bridge's `pretrain` needs CUDA, so on CPU: the callback fires through Bridge's real
`CallbackManager` / `CallbackContext` / `GlobalState`, the Bridge-signature forward step gets its
state injected by Bridge's own `prepare_forward_step_func` and is driven by our loop (it must give
the losses, router and weights of our own elastic trainer, bit for bit), the recipes are real
`ConfigContainer`s (validate, YAML round trip, Bridge's override parser) and the provider builds
the same model as `build_elastic_model`.  The end-to-end Bridge run is examples/bridge/ (GPU).
"""

import json

import pytest
import torch

try:
    from nemo_elastic.integrations import bridge as nb
except ImportError as err:  # megatron-bridge or its pure-Python needs are not installed
    pytest.skip(f"Megatron-Bridge tier not installed ({err}); `make install-nemo`",
                allow_module_level=True)

from megatron.bridge.training.callbacks import CallbackContext, CallbackManager  # noqa: E402
from megatron.bridge.training.config import ConfigContainer  # noqa: E402
from megatron.bridge.training.state import GlobalState  # noqa: E402
from megatron.bridge.training.utils.train_utils import prepare_forward_step_func  # noqa: E402

from nemo_elastic import runtime  # noqa: E402
from nemo_elastic.training.elastic.trainer import parent_config  # noqa: E402
from nemo_elastic.training.loop import StopRequest  # noqa: E402
from nemo_elastic.training.train import build_trainer  # noqa: E402
from tests.test_train import _cfg, _parent  # noqa: E402


def _context(state, trainer, manager):
    return CallbackContext(state=state, model=[trainer.ddp], user_state=manager.user_state,
                           optimizer=trainer.optimizer, scheduler=trainer.scheduler)


def _train(cfg, bridge: bool):
    """3 iterations (stage 1: 2, stage 2: 1) of our elastic trainer; with `bridge`, its forward
    step is the Bridge-signature step (GlobalState injected by Bridge) and the schedule position
    and router step come from ElasticRouterCallback fired through Bridge's CallbackManager."""
    cfg, init, teacher = parent_config(cfg)
    with runtime.distributed(cfg.parallel) as info:
        trainer = build_trainer(cfg, init, teacher, info)
        if bridge:
            state, manager = GlobalState(), CallbackManager()
            callback = nb.ElasticRouterCallback(
                recipe=cfg, step=trainer.step, router_optimizer=trainer.router_optimizer,
                router_scheduler=trainer.router_scheduler)
            manager.add(callback)
            trainer.forward_step = prepare_forward_step_func(callback.forward_step, state)
            assert trainer.forward_step is not callback.forward_step  # state was injected

            def begin_iteration(iteration, seg):
                state.train_state.step = iteration - 1
                manager.fire("on_train_step_start", _context(state, trainer, manager))

            def after_step(iteration):
                state.train_state.step = iteration
                manager.fire("on_train_step_end", _context(state, trainer, manager))
                record = manager.user_state["nemo_elastic"]
                assert record["iteration"] == iteration
                return {k: record[k] for k in ("router_lr", "router_grad_norm", "tau")}

            trainer.begin_iteration, trainer.after_step = begin_iteration, after_step
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
        with StopRequest() as stop:
            trainer.run(stop, resume=False)
        result = {"history": trainer.history,
                  "router": {n: p.detach().clone() for n, p in trainer.router.named_parameters()},
                  "model": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                  "family": trainer.router.family_table()}
        if bridge:
            result.update(callback=callback, state=state, manager=manager, trainer=trainer)
            result["save"] = _save_through_callback(cfg, callback, state, trainer, manager)
    return result


def _save_through_callback(cfg, callback, state, trainer, manager):
    container = nb.recipe("tiny", bridge_overrides=[
        f"checkpoint.save={cfg.output_dir}/bridge_ckpt"])
    state.cfg = container
    manager.fire("on_checkpoint_save", _context(state, trainer, manager))
    return nb.checkpoint_folder(container.checkpoint.save, state.train_state.step)


def test_bridge_forward_step_and_callback_in_our_loop_equal_our_elastic_trainer(tmp_path):
    _parent(tmp_path)
    ours = _train(_cfg(tmp_path, f"output_dir={tmp_path / 'ours'}", stage1=2, stage2=1), False)
    theirs = _train(_cfg(tmp_path, f"output_dir={tmp_path / 'bridge'}", stage1=2, stage2=1), True)
    assert len(ours["history"]) == 3
    for a, b in zip(ours["history"], theirs["history"]):
        for key in ("kd", "budget_loss", "kd_by_budget", "budgets_drawn", "router_lr", "tau",
                    "stage"):
            assert a[key] == b[key], (a["iteration"], key)
    # stage 2's probabilities reached the step at iteration 3 (curriculum position)
    assert theirs["callback"].step.budget_probs == pytest.approx([0.5, 0.3, 0.2])
    for name in ours["router"]:
        assert torch.equal(ours["router"][name], theirs["router"][name]), name
    for name in ours["model"]:
        assert torch.equal(ours["model"][name], theirs["model"][name]), name
    assert theirs["manager"].user_state["nemo_elastic"]["choices"]  # logged at iteration 1..

    # on_checkpoint_save: router state + family metadata next to the Bridge checkpoint
    folder = theirs["save"]
    assert folder.name == "iter_0000003"
    meta = json.loads((folder / nb.META_FILE).read_text())
    assert meta["family"] == theirs["family"] and meta["iteration"] == 3
    assert meta["budget_names"] == ["full", "75pct", "50pct"]
    saved = torch.load(folder / nb.ROUTER_FILE, weights_only=False)
    assert all(torch.equal(saved["router"][n], theirs["router"][n]) for n in theirs["router"])
    assert saved["router_scheduler"]["last_epoch"] == 3


def test_on_train_start_builds_router_and_teacher_and_loads_the_parent(tmp_path):
    """The GPU path: the callback builds router, teacher and router optimizer itself and loads
    the init checkpoint into Bridge's (here: our) fresh student."""
    _parent(tmp_path)
    cfg, init, teacher_ckpt = parent_config(_cfg(tmp_path, stage1=2, stage2=1))
    with runtime.distributed(cfg.parallel) as info:
        reference = build_trainer(cfg, init, teacher_ckpt, info)  # loads init itself
        fresh = build_trainer(cfg, init, teacher_ckpt, info, load_init=False)
        assert not all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(),
                                                          reference.model.parameters()))
        state, manager = GlobalState(), CallbackManager()
        step = nb.ElasticForwardStep()
        callback = nb.ElasticRouterCallback(step, recipe=cfg)
        manager.add(callback)
        manager.fire("on_train_start", _context(state, fresh, manager))
        for a, b in zip(fresh.model.parameters(), reference.model.parameters()):
            assert torch.equal(a, b)
        for a, b in zip(callback.router.parameters(), reference.router.parameters()):
            assert torch.equal(a, b)
        # router.init=zero_shot (conf/tiny.yaml): the same offsets as our trainer's search
        buffers = dict(reference.router.named_buffers())
        assert any(n.startswith("prior_") and b.abs().sum() > 0 for n, b in buffers.items())
        for name, b in callback.router.named_buffers():
            assert torch.equal(b, buffers[name]), name
        assert step.step is callback.step and callback.step.teacher is not None
        # one Bridge-signature micro-batch: the same loss as our step on the same batch
        manager.fire("on_train_step_start", _context(state, fresh, manager))
        reference.step.begin_iteration(1, callback.step.budget_probs)
        batch = next(iter(reference.segments[0].data.train_iter))
        with torch.no_grad():
            out, loss_fn = step(state, iter([batch]), fresh.ddp)
            ref_out, ref_loss_fn = reference.step(iter([batch]), reference.ddp)
        assert torch.equal(loss_fn(out)[0], ref_loss_fn(ref_out)[0])


def test_recipes_build_validate_round_trip_yaml_and_take_bridge_overrides(tmp_path):
    container = nb.recipe("tiny", ["elastic.init_checkpoint=/ckpt/prepared"], bridge_overrides=[
        "train.train_iters=7", "model.elastic_recipe.elastic.router.lr=0.02",
        f"checkpoint.save={tmp_path}/ckpt"])
    assert isinstance(container, ConfigContainer)
    assert isinstance(container.model, nb.ElasticHybridModelProvider)
    assert container.train.train_iters == 7 and container.checkpoint.save == f"{tmp_path}/ckpt"
    recipe = container.model.recipe_config()
    assert recipe.elastic.router.lr == 0.02 and recipe.elastic.init_checkpoint == "/ckpt/prepared"
    assert container.model.hidden_size == recipe.model.hidden_size == 64
    assert container.train.global_batch_size == recipe.elastic.curriculum[0].global_batch_size
    nb.cpu_friendly(container).validate()
    assert container.model.num_layers == recipe.model.num_layers

    for name in ("tiny", "nemotron_nano_12b"):
        built = nb.recipe(name)
        first, second = tmp_path / f"{name}.yaml", tmp_path / f"{name}_again.yaml"
        built.to_yaml(str(first))
        loaded = ConfigContainer.from_yaml(str(first))
        assert isinstance(loaded.model, nb.ElasticHybridModelProvider)
        loaded.to_yaml(str(second))
        assert second.read_text() == first.read_text()
        assert loaded.model.recipe_config() == built.model.recipe_config()
    big = nb.recipe("nemotron_nano_12b")
    assert big.model.tensor_model_parallel_size == 8
    assert big.model.elastic_recipe["elastic"]["budgets"] == {"12b": 1.0, "9b": 0.7311, "6b": 0.4874}
    assert big.dataset.blend[0] == [big.model.elastic_recipe["data"]["indexed"]["prefix"]]

    from megatron.bridge.training.utils.omegaconf_utils import OverridesError

    with pytest.raises(OverridesError):
        nb.apply_overrides(nb.recipe("tiny"), ["train.no_such_field=1"])


def test_provider_builds_the_elastic_model_with_itself_as_config(tmp_path):
    from nemo_elastic.elastic.model import ElasticHybridModel
    from nemo_elastic.elastic.specs import build_elastic_model

    _parent(tmp_path)
    container = nb.cpu_friendly(nb.recipe("tiny"))
    provider = container.model
    with runtime.distributed(provider.recipe_config().parallel):
        torch.manual_seed(0)
        model = provider.provide()
        torch.manual_seed(0)
        ours = build_elastic_model(provider.recipe_config())
    assert isinstance(model, ElasticHybridModel) and model.config is provider
    assert [(n, p.shape) for n, p in model.named_parameters()] == \
        [(n, p.shape) for n, p in ours.named_parameters()]
    for a, b in zip(model.parameters(), ours.parameters()):
        assert torch.equal(a, b)


def test_gpu_example_assembles_the_config_from_both_kinds_of_overrides(tmp_path):
    import subprocess
    import sys

    from omegaconf import OmegaConf

    out = subprocess.run(
        [sys.executable, "examples/bridge/train_bridge.py", "--recipe", "tiny",
         "elastic.init_checkpoint=/ckpt/p", "--bridge", "train.train_iters=9",
         "--dump-yaml", str(tmp_path / "cfg.yaml")],
        cwd=nb.CONF_DIR.parent, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = OmegaConf.load(tmp_path / "cfg.yaml")
    assert cfg.train.train_iters == 9
    assert cfg.model.elastic_recipe.elastic.init_checkpoint == "/ckpt/p"


@pytest.mark.gpu
def test_bridge_pretrain_end_to_end_on_gpu(tmp_path):
    """Bridge's real `pretrain` (needs CUDA and Transformer-Engine): a tiny parent, then 4
    elastic iterations on Bridge's mock data; the callback's family lands next to the
    checkpoint."""
    import subprocess
    import sys

    from nemo_elastic.integrations.bridge_import import has_transformer_engine

    if not torch.cuda.is_available() or not has_transformer_engine():
        pytest.skip("needs CUDA and Transformer-Engine (Megatron-Bridge's pretrain)")
    root = nb.CONF_DIR.parent
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "4"}
    out = subprocess.run([sys.executable, "-m", "nemo_elastic.cli", "pretrain", "--config",
                          "conf/tiny.yaml", "train.iters=20", "train.warmup_iters=2",
                          f"output_dir={tmp_path / 'parent'}", "--no-progress"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
         "examples/bridge/train_bridge.py", "--recipe", "tiny",
         f"elastic.init_checkpoint={tmp_path / 'parent'}", "--bridge", "train.train_iters=4",
         "checkpoint.save_interval=4", f"checkpoint.save={tmp_path / 'bridge'}",
         f"checkpoint.load={tmp_path / 'bridge'}", f"logger.tensorboard_dir={tmp_path / 'tb'}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    meta = json.loads((tmp_path / "bridge" / "iter_0000004" / nb.META_FILE).read_text())
    assert [r["name"] for r in meta["family"]] == ["full", "75pct", "50pct"]
