"""What a new user sees: progress bars that end at 100 %, help texts that match behaviour, one
number format, plots whose labels and heights come from the same ranking."""

import math

import pytest

from nemo_elastic import cli


def _batches(cfg, n: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, cfg.model.vocab_size, (2, 16), generator=gen)}
            for _ in range(n)]


@pytest.mark.parametrize("cached", [True, False])
def test_depth_ranking_progress_ends_exactly_at_its_total(megatron_env, monkeypatch, cached):
    from nemo_elastic.elastic.specs import build_elastic_model
    from nemo_elastic.importance import depth
    from tests.conftest import perturb, tiny_config

    cfg = tiny_config()
    model = perturb(build_elastic_model(cfg)).eval()
    if not cached:  # real vocabularies: full logits recomputed every round
        monkeypatch.setattr(depth, "FULL_LOGITS_CACHE_BYTES", 0)
    seen = []
    close = depth._Progress.close

    def record(self):
        seen.append((self.bar.n, self.bar.total))
        close(self)

    monkeypatch.setattr(depth._Progress, "close", record)
    ranking = depth.iterative_ranking(model, _batches(cfg, 2), cfg.model, progress=True)
    assert sorted(ranking.order) == list(range(cfg.model.num_layers))
    assert len(seen) == 1 and seen[0][0] == seen[0][1] > 0, seen


def test_layer_importance_plot_heights_and_labels_come_from_one_ranking(tmp_path, monkeypatch):
    """Each panel: bar heights = that ranking's scores, label = position in its own drop order
    (the iterative and one-shot orders differ here, as they do on real models)."""
    import matplotlib.pyplot as plt

    from nemo_elastic.importance.depth import DepthRanking
    from nemo_elastic.report.importance import PANEL_TITLES, plot_layer_importance
    from tests.conftest import tiny_config

    cfg = tiny_config()  # 5 layers
    one_shot = DepthRanking("one_shot", order=[4, 1, 3, 0, 2],
                            scores={4: 0.01, 1: 0.02, 3: 0.05, 0: 0.3, 2: 0.9})
    iterative = DepthRanking("iterative", order=[1, 4, 0, 3, 2],
                             scores={1: 0.02, 4: 0.04, 0: 0.2, 3: 0.4, 2: 1.5})
    cosine = DepthRanking("cosine", order=[3, 4, 1, 2, 0],
                          scores={3: 0.1, 4: 0.2, 1: 0.3, 2: 0.4, 0: 0.5})
    rankings = {"iterative": iterative, "one_shot": one_shot, "cosine": cosine}
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    plot_layer_importance(rankings, cfg.model, tmp_path / "layers.png", selected="iterative")
    assert (tmp_path / "layers.png").stat().st_size > 0
    axes = figures[0].axes
    assert len(axes) == 3
    for ax, (name, ranking) in zip(axes, [(n, rankings[n]) for n in PANEL_TITLES]):
        assert ax.get_title().startswith(PANEL_TITLES[name])
        heights = [bar.get_height() for bar in ax.patches]
        labels = [int(t.get_text()) for t in ax.texts]
        assert heights == pytest.approx([ranking.scores[j] for j in range(5)])
        assert sorted(range(5), key=lambda j: labels[j]) == ranking.order
    assert "used by prepare" in axes[0].get_title()
    assert all("used by prepare" not in ax.get_title() for ax in axes[1:])


def test_help_texts_match_behaviour(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["pretrain"]).config is None  # defaults to the embedded recipe
    with pytest.raises(SystemExit):
        parser.parse_args(["preprocess", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "blank lines" in text and "one document per line) or .jsonl" not in text
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--help"])
    text = capsys.readouterr().out
    assert "--json" in text and "--out" in text


def test_one_number_format():
    from nemo_elastic.report.common import fmt_loss, fmt_pct

    assert fmt_pct(0.875) == "87.5%" and fmt_pct(0.0) == "0.0%" and fmt_pct(None) == "n/a"
    assert fmt_loss(0.39421) == "0.3942" and fmt_loss(None) == "n/a"
    assert fmt_loss(math.nan) == "n/a" and fmt_pct(math.nan) == "n/a"


def test_pretrain_progress_shows_no_nan_before_the_first_evaluation():
    from nemo_elastic.training.pretrain import PretrainTrainer

    trainer = object.__new__(PretrainTrainer)
    trainer.val_loss = math.nan
    assert trainer.postfix({"train_loss": 1.2345}) == {"loss": "1.234"}
    trainer.val_loss = 0.5
    assert trainer.postfix({"train_loss": 1.2345}) == {"loss": "1.234", "val": "0.500"}
